"""The rest of the model around compressed embeddings: its bytes, and its dtype on the way out.

A compressed model is saved with its other weights in the source's dtype (bf16 / fp16 from hub
folders, bf16 for a GGUF source; lmembed.models.sizes), not in the fp32 it was computed in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.base import CompressedEmbedding


def state_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the model holds (a tied matrix once), as stored now."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.data_ptr()) if t.device.type != "meta" else (id(t), 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def cast_body(model: nn.Module, dtype: torch.dtype) -> None:
    """Every float parameter and buffer outside the compressed embedding modules to `dtype` (the
    compressed modules keep their stored dtypes: codes, fp16 scales), and the rows those modules
    look up come out in `dtype`, so the model runs in one dtype."""
    inside: set[int] = set()
    for m in model.modules():
        if isinstance(m, CompressedEmbedding):
            m.out_dtype = dtype
            inside.update(id(t) for t in [*m.parameters(), *m.buffers()])
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.is_floating_point() and id(p) not in inside and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in list(m.named_buffers(recurse=False)):  # derived ones (rotary frequencies) stay fp32
            if (b is not None and b.is_floating_point() and id(b) not in inside and b.dtype != dtype
                    and name not in m._non_persistent_buffers_set):
                setattr(m, name, b.to(dtype))
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.dtype = dtype
