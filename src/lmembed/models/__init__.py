"""lmembed's own language models."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import RunConfig
from ..errors import LmembedError
from .heads import LMHead
from .lstm import LSTMLM
from .transformer import TransformerLM

ARCH_CLASSES: dict[str, type[nn.Module]] = {"lstm": LSTMLM, "transformer": TransformerLM}


def build_model(cfg: RunConfig, vocab_size: int) -> nn.Module:
    cfg.validate()
    model = ARCH_CLASSES[cfg.arch](cfg, vocab_size)
    model.run_config = cfg  # lets lmembed.save write the architecture of a compressed run
    return model


def param_estimate(cfg: RunConfig, vocab_size: int) -> int:
    """Parameters the model will have (an upper bound within a few percent)."""
    e, h, n = cfg.emb_dim, cfg.hidden, cfg.layers
    emb = vocab_size * e * (1 if cfg.tie == "tied" else 2) + (h * e + e if cfg.proj_reg else 0)
    if cfg.arch == "lstm":
        body = sum(4 * h * ((e if i == 0 else h) + h + 2) for i in range(n))
    else:
        body = n * (4 * h * h + 2 * h * cfg.ff + 9 * h)
    return emb + body + vocab_size


def available_memory() -> int | None:
    """Bytes the OS says a new allocation can use (MemAvailable), or None where it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits_memory(cfg: RunConfig, vocab_size: int) -> None:
    """Refuse a model that cannot fit before allocating it: a typo (--emb-dim 1000000000) is a
    one-line error, not a 52 GB allocation. Counts weights, gradients and two optimizer states,
    and the logits of one batch (unless --ce-chunk bounds them)."""
    params = param_estimate(cfg, vocab_size)
    tokens = cfg.batch_size * cfg.bptt
    logits = 3 * 4 * vocab_size * (min(tokens, cfg.ce_chunk) if cfg.ce_chunk else tokens)
    need = 4 * 4 * params + logits
    have = available_memory()
    if have is not None and need > have:
        raise LmembedError(f"the model ({params:,} parameters, vocab {vocab_size:,}) needs about {need / 2**30:.1f} GB "
                           f"for weights, gradients, optimizer state and logits; {have / 2**30:.1f} GB are available. "
                           "Lower --emb-dim, --hidden, --layers or --batch-size (or --ce-chunk for a large vocabulary)")


__all__ = ["build_model", "check_fits_memory", "param_estimate", "LMHead", "LSTMLM", "TransformerLM", "ARCH_CLASSES"]
