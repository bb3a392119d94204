"""What a model weighs where the user has it: its weight files on disk, the dtype they store.

The embedding's own ratio says little about what a user ships: a 7x smaller matrix inside a model
whose other weights went from bf16 to fp32 makes a bigger folder. So reports give the whole
model's bytes too, and the rest of the model keeps the source's dtype unless asked otherwise
(lmembed.compression.integration.body).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
