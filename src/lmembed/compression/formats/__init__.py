"""Storage kinds: how a compressed matrix is stored, looked up and multiplied (lmembed's formats).

Each kind is one class in one file of this package, registered under its `kind` name: its tensors,
its spec (with a version), its exact stored bytes, its lookup and tied-head logits (read in place
by the C engine in `kernels`), and what it answers for itself: what trains, what GGUF holds it.
Importing this package registers every kind, so `build_module(spec)` can rebuild any of them.
"""

from . import dense, grouped, mixed, quantized, rowrank, superblock, transform, trimmed  # noqa: F401 (registers)
from .base import MODULE_KINDS, CompressedEmbedding, CompressedHead, build_module, register_module

__all__ = ["MODULE_KINDS", "CompressedEmbedding", "CompressedHead", "build_module", "register_module"]
