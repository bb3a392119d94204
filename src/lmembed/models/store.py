"""lmembed's own models on disk: the run directories that `lmembed train` and `lmembed
train-seq2seq` write, read back here (training writes them, evaluation and compression read them).

    config.json        RunConfig or Seq2SeqConfig
    tokenizer.json     the vocabulary (seq2seq: tokenizer.src.json + tokenizer.tgt.json)
    checkpoint.pt      last finished epoch: weights, optimizer, history (for --resume)
    model.safetensors  weights with the best validation perplexity (tied matrices stored once)
    metrics.json       params, perplexities, tokens/s, per-epoch history
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ..common.files import atomic_write_with, read_json
from ..common.runtime import pick_device
from ..config import RunConfig, Seq2SeqConfig
from ..data.vocab import BPETokenizer, Tokenizer, load_tokenizer
from ..errors import LmembedError
from . import build_model
from .seq2seq import Seq2SeqTransformer, build_seq2seq

CONFIG, TOKENIZER, CHECKPOINT, WEIGHTS, METRICS = (
    "config.json", "tokenizer.json", "checkpoint.pt", "model.safetensors", "metrics.json")
TOKENIZER_SRC, TOKENIZER_TGT = "tokenizer.src.json", "tokenizer.tgt.json"
COMPRESSED_MANIFEST = "lmembed.json"  # a folder written by lmembed.save (lmembed.compression.integration.io)
# Every entry a training run writes in its folder (what --force may replace; nothing else is touched).
RUN_FILES = (CONFIG, TOKENIZER, TOKENIZER_SRC, TOKENIZER_TGT, CHECKPOINT, WEIGHTS, METRICS, "report.md", "curves.png",
             "eval-*.json", "eval-*.md", "test.greedy.txt", "test.beam.txt")


def run_kind(folder: str | Path) -> str | None:
    """"lm" or "seq2seq" for a run directory, None for anything else (a compressed save of a run
    holds a run's config.json too, but also lmembed.json: that is not a run directory)."""
    p = Path(folder)
    if not (p.is_dir() and (p / CONFIG).is_file()) or (p / COMPRESSED_MANIFEST).exists():
        return None
    try:
        cfg = json.loads((p / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    if (p / TOKENIZER).is_file() and {"arch", "preset", "tie"} <= cfg.keys():
        return "lm"
    if (p / TOKENIZER_SRC).is_file() and (p / TOKENIZER_TGT).is_file() and {"d_model", "tie"} <= cfg.keys():
        return "seq2seq"
    return None


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """safetensors of the model, shared (tied) tensors written once; atomic."""
    atomic_write_with(path, lambda tmp: save_model(model, tmp))


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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LmembedError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as e:
        detail = " ".join(str(e).split())[:120]
        raise LmembedError(f"{path}: holds pickled objects other than tensors (code can hide in them), which lmembed "
                           f"refuses to load ({detail}); delete it or rerun with --force") from None
    except Exception as e:
        raise LmembedError(f"{path}: checkpoint is corrupt or truncated ({type(e).__name__}); "
                           "delete it or rerun with --force to start over") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise LmembedError(f"{path}: not an lmembed checkpoint (missing 'model'/'epoch')")
    return state


def _load_best(model: torch.nn.Module, run: Path, weights: str = WEIGHTS) -> None:
    """The best-validation weights, or the last checkpoint's when none were kept yet."""
    if (run / weights).exists():
        load_weights(model, run / weights)
    elif (run / CHECKPOINT).exists():
        model.load_state_dict(load_checkpoint(run / CHECKPOINT)["model"])
    else:
        raise LmembedError(f"{run}: no {weights} or {CHECKPOINT} (did training finish an epoch?)")


def _run_dir(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    if not run.is_dir():
        raise LmembedError(f"{run}: run directory not found")
    return run


def load_run(
    run_dir: str | Path, device: str = "auto", weights: str = WEIGHTS
) -> tuple[torch.nn.Module, Tokenizer, RunConfig]:
    """Model (best weights, eval mode), tokenizer and config of a finished or running LM run."""
    run = _run_dir(run_dir)
    cfg = RunConfig.from_dict(read_json(run / CONFIG, "run config"), str(run / CONFIG))
    tok = load_tokenizer(run / TOKENIZER)
    model = build_model(cfg, tok.vocab_size).to(pick_device(device))
    _load_best(model, run, weights)
    return model.eval(), tok, cfg


def load_seq2seq_tokenizers(run: Path) -> tuple[BPETokenizer, BPETokenizer]:
    """(source, target) tokenizers of a seq2seq run; one object when the vocabulary is shared."""
    src, tgt = load_tokenizer(run / TOKENIZER_SRC), load_tokenizer(run / TOKENIZER_TGT)
    if not isinstance(src, BPETokenizer) or not isinstance(tgt, BPETokenizer):
        raise LmembedError(f"{run}: seq2seq runs use BPE tokenizers")
    return (src, src) if src.fingerprint() == tgt.fingerprint() else (src, tgt)


def load_seq2seq_run(run_dir: str | Path, device: str = "auto"
                     ) -> tuple[Seq2SeqTransformer, BPETokenizer, BPETokenizer, Seq2SeqConfig]:
    """Model (best weights, eval mode, ties restored), source/target tokenizers and config of a run."""
    run = _run_dir(run_dir)
    cfg = Seq2SeqConfig.from_dict(read_json(run / CONFIG, "run config"), str(run / CONFIG))
    src_tok, tgt_tok = load_seq2seq_tokenizers(run)
    model = build_seq2seq(cfg, src_tok.vocab_size, tgt_tok.vocab_size).to(pick_device(device))
    _load_best(model, run)
    model.tie_weights()
    return model.eval(), src_tok, tgt_tok, cfg
