"""A run directory: what a training run leaves behind, and how to load it back.

    config.json      RunConfig
    tokenizer.json   the vocabulary (word list or BPE model)
    checkpoint.pt    last finished epoch: weights, optimizer, history (for --resume)
    model.safetensors  weights with the best validation perplexity (tied matrices stored once)
    metrics.json     params, perplexities, tokens/s, per-epoch history
    report.md, curves.png
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from .config import RunConfig
from .data.vocab import Tokenizer, load_tokenizer
from .errors import LmembedError
from .models import build_model
from .utils import _publish, atomic_torch_save, pick_device, read_json

CONFIG, TOKENIZER, CHECKPOINT, WEIGHTS, METRICS = (
    "config.json", "tokenizer.json", "checkpoint.pt", "model.safetensors", "metrics.json")


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """safetensors of the model, shared (tied) tensors written once; atomic."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_model(model, tmp)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        raise LmembedError(f"{path}: weights file not found")
    try:
        missing, unexpected = load_model(model, path, strict=False, device=str(next(model.parameters()).device))
    except Exception as e:  # safetensors raises its own types for truncated/corrupt headers
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise LmembedError(f"{path}: cannot read weights ({type(e).__name__}: {detail})") from None
    if missing or unexpected:
        raise LmembedError(f"{path}: weights do not match the model (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]})")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_torch_save(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LmembedError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise LmembedError(f"{path}: checkpoint is corrupt or truncated ({type(e).__name__}); "
                           "delete it or rerun with --force to start over") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise LmembedError(f"{path}: not an lmembed checkpoint (missing 'model'/'epoch')")
    return state


def load_run(
    run_dir: str | Path, device: str = "auto", weights: str = WEIGHTS
) -> tuple[torch.nn.Module, Tokenizer, RunConfig]:
    """Model (best weights, eval mode), tokenizer and config of a finished or running run."""
    run = Path(run_dir)
    if not run.is_dir():
        raise LmembedError(f"{run}: run directory not found")
    cfg = RunConfig.from_dict(read_json(run / CONFIG, "run config"), str(run / CONFIG))
    tok = load_tokenizer(run / TOKENIZER)
    model = build_model(cfg, tok.vocab_size).to(pick_device(device))
    if (run / weights).exists():
        load_weights(model, run / weights)
    elif (run / CHECKPOINT).exists():
        model.load_state_dict(load_checkpoint(run / CHECKPOINT)["model"])
    else:
        raise LmembedError(f"{run}: no {weights} or {CHECKPOINT} (did training finish an epoch?)")
    model.eval()
    return model, tok, cfg
