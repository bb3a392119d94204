"""How big a model is, before and after: what the user started from on disk, what a model holds.

The embedding's own ratio says little about what a user ships: a 7x smaller matrix inside a model
whose other weights went from bf16 to fp32 makes a bigger folder. So reports give the whole
model's bytes too, and the rest of the model keeps the source's dtype unless asked otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GGUF_BODY = torch.bfloat16  # a GGUF's block types have no transformers dtype: its body is written as bf16


def weight_files(folder: Path, gguf_file: str | None = None) -> list[Path]:
    """The files that hold a model's weights (the one GGUF file, or the folder's weight files)."""
    if gguf_file:
        return [folder / gguf_file]
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def files_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def source_dtype(folder: Path, gguf_file: str | None = None) -> torch.dtype | None:
    """The dtype a model's float weights are stored in: bf16 for a GGUF source (see GGUF_BODY), the
    config's `dtype` / `torch_dtype` for a transformers folder; None when it does not say."""
    if gguf_file or (folder / "lmembed_source.json").is_file():  # lmembed's fp32 copy of a bundled GGUF
        return GGUF_BODY
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype") if isinstance(cfg, dict) else None
    return DTYPES.get(name) if isinstance(name, str) else None


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
    from ..compression.modules import CompressedEmbedding

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
