"""Compressed models in the file formats other runtimes read.

    from lmembed.export import compress_gguf, export_hf
    compress_gguf("model.gguf", "int4:g32", "model-emb-q4.gguf")   # llama.cpp's GGUF
    export_hf("out/model-int4", "out/model-plain")                 # a transformers folder, dense
"""

from .block_fit import encode_matrix
from .blocks import BLOCK_TYPES, BlockType, types_for_row
from .gguf import compress_gguf, encode_module
from .gguf_file import read_token_embd
from .hf import export_hf

__all__ = ["export_hf", "compress_gguf", "read_token_embd", "encode_matrix", "encode_module", "types_for_row",
           "BLOCK_TYPES", "BlockType"]
