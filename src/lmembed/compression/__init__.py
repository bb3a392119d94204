"""Compression of token-embedding matrices: one registry of typed methods, drop-in modules, save/load.

    lmembed.compress(model, "int4:g32")          # a method string or pipeline ("trim:lee > int8")
    lmembed.compress(model, Int4(group=32))      # the same, typed
    lmembed.compress(model, [Trim("lee"), Int8()])
"""

from .api import check_method, compress
from .calibration.calibrate import CalibStats
from .formats.base import CompressedEmbedding, CompressedHead, build_module
from .formats.dense import DenseEmbedding, FactorizedEmbedding
from .formats.grouped import GroupedEmbedding
from .formats.mixed import MixedQuantizedEmbedding, MixedSuperBlockEmbedding
from .formats.quantized import QuantizedEmbedding
from .formats.rowrank import RowRankEmbedding
from .formats.superblock import SuperBlockEmbedding
from .formats.transform import TransformCodedEmbedding
from .formats.trimmed import TrimmedEmbedding
from .integration.io import load, save
from .methods.autoencoder import AutoEncoder
from .methods.calibrated import GPTQ, GPTQInt2, GPTQInt3, GPTQInt4, GPTQInt8, WeightedAutoEncoder, WeightedSVD
from .methods.counts import token_counts
from .methods.groupreduce import GroupReduce
from .methods.kl import KLFinetune
from .methods.kmixed import KMixed
from .methods.mixed import Mixed
from .methods.quantize import RTN, Int2, Int3, Int4, Int8
from .methods.remap import remap_tokenizer
from .methods.superblock import KQ2, KQ3, KQ4, KQ5, KQ6, KQ7, KQ8, SuperBlockQuant
from .methods.svd import SVD
from .methods.transform import TransformCoding
from .methods.trim import Trim
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
