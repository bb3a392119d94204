"""Compression of token-embedding matrices: one registry of typed methods, drop-in modules, save/load.

    lmembed.compress(model, "int4:g32")          # a method string or pipeline ("trim:lee > int8")
    lmembed.compress(model, Int4(group=32))      # the same, typed
    lmembed.compress(model, [Trim("lee"), Int8()])
"""

from .api import check_method, compress
from .autoencoder import AutoEncoder
from .calibrate import CalibStats
from .calibrated import GPTQ, GPTQInt2, GPTQInt3, GPTQInt4, GPTQInt8, WeightedAutoEncoder, WeightedSVD
from .counts import token_counts
from .groupreduce import GroupedEmbedding, GroupReduce
from .io import load, save
from .kl import KLFinetune
from .kmixed import KMixed, MixedSuperBlockEmbedding
from .mixed import Mixed, MixedQuantizedEmbedding
from .modules import (
    CompressedEmbedding,
    CompressedHead,
    DenseEmbedding,
    FactorizedEmbedding,
    QuantizedEmbedding,
    build_module,
)
from .quantize import RTN, Int2, Int3, Int4, Int8
from .registry import (
    REGISTRY,
    FitContext,
    Method,
    as_pipeline,
    method_names,
    parse_method,
    parse_pipeline,
    pipeline_text,
    register,
)
from .remap import remap_tokenizer
from .rowrank import RowRankEmbedding
from .superblock import KQ2, KQ3, KQ4, KQ5, KQ6, KQ7, KQ8, SuperBlockEmbedding, SuperBlockQuant
from .svd import SVD
from .transform import TransformCodedEmbedding, TransformCoding
from .trim import Trim, TrimmedEmbedding

__all__ = [
    "compress", "check_method", "save", "load", "CalibStats", "build_module", "REGISTRY", "FitContext", "Method",
    "as_pipeline", "method_names", "parse_method", "parse_pipeline", "pipeline_text", "register", "remap_tokenizer",
    "token_counts",
    # the modules a compressed matrix is stored as
    "CompressedEmbedding", "CompressedHead", "DenseEmbedding", "FactorizedEmbedding", "QuantizedEmbedding",
    "MixedQuantizedEmbedding", "MixedSuperBlockEmbedding", "GroupedEmbedding", "TrimmedEmbedding",
    "SuperBlockEmbedding", "TransformCodedEmbedding", "RowRankEmbedding",
    # the methods, typed
    "SVD", "AutoEncoder", "RTN", "Int8", "Int4", "Int3", "Int2", "WeightedSVD", "WeightedAutoEncoder", "GPTQ",
    "GPTQInt8", "GPTQInt4", "GPTQInt3", "GPTQInt2", "Mixed", "KLFinetune", "Trim", "GroupReduce", "SuperBlockQuant",
    "KQ2", "KQ3", "KQ4", "KQ5", "KQ6", "KQ7", "KQ8", "KMixed", "TransformCoding",
]
