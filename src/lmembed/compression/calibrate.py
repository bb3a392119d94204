"""Calibration statistics: what a tied matrix's two roles see when the original model runs.

One forward pass of the *original* model over a calibration text collects:

- ``hidden_moment`` H = E[h hᵀ] (d x d) of the final hidden states h that feed the output layer.
  An error ΔE in the output matrix changes the logits by h·ΔEᵀ, so its expected squared size is
  Σ_v ΔE_v H ΔE_vᵀ: directions in which h has large energy matter, the others hardly do.
- ``out_prob`` (V,): the mean predicted probability of each token. The logit error of a token
  the model never predicts barely moves the softmax; a token with probability p weighs ~p.
- ``in_freq`` (V,): how often each token is an input, i.e. how often its row is looked up.

Statistics are cached on disk, keyed by the matrix, the text's token ids and the budget, so a
bench that calibrates ten methods runs the model once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import LmembedError
from .fit_quality import content_hash
from .hf import find_sites

DEFAULT_TOKENS = 16_384


@dataclass
class CalibStats:
    hidden_moment: torch.Tensor | None  # d x d float64, None without an output layer
    out_prob: torch.Tensor | None  # (V,) float64
    in_freq: torch.Tensor  # (V,) float64 token counts
    tokens: int
    source: str
    dim: int
    hidden_sample: torch.Tensor | None = None  # (n, d) float32: a sample of h for fine-tuning

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row_weights(self, side: str, *, mix: float = 0.5, floor: float = 0.1) -> torch.Tensor:
        """Importance of each row for the given role, normalised to mean 1.

        output: mean predicted probability; input: frequency; tied: `mix` of both. `floor` (a
        fraction of the mean) keeps rare rows from being ignored altogether."""
        parts = []
        if side in ("output", "tied") and self.out_prob is not None:
            parts.append((mix if side == "tied" else 1.0, self.out_prob))
        if side in ("input", "tied") or not parts:
            parts.append((1 - mix if side == "tied" and parts else 1.0, self.in_freq))
        w = sum(a * p / p.mean().clamp_min(1e-30) for a, p in parts)
        w = w / w.mean()
        return (w + floor) / (1 + floor)

    def column_metric(self, side: str, *, mix: float = 0.5) -> torch.Tensor:
        """d x d metric M for row errors (ΔE M ΔEᵀ), trace-normalised to d.

        output: H; input: identity (no model-specific knowledge of the first layer); tied: a mix."""
        if self.hidden_moment is None or side == "input":
            return torch.eye(self.dim, dtype=torch.float64)
        h = self.hidden_moment
        h = h * (h.shape[0] / torch.trace(h))
        if side == "output":
            return h
        return mix * h + (1 - mix) * torch.eye(h.shape[0], dtype=h.dtype)


def _cache_dir() -> Path:
    env = os.environ.get("LMEMBED_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "lmembed") / "calib"


def calibration_ids(calib: Any, tokenizer: Any, vocab_size: int, tokens: int) -> tuple[torch.Tensor, str]:
    """Token ids from a text spec / raw string (needs the tokenizer) or given ids; checked."""
    if isinstance(calib, (torch.Tensor, np.ndarray, list, tuple)):
        ids = torch.as_tensor(np.asarray(calib), dtype=torch.long).flatten()
        source = f"{len(ids)} given token ids"
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise LmembedError(f"calibration ids: id {bad} is outside the model's vocabulary 0..{vocab_size - 1} "
                               "(ids from another tokenizer?)")
    elif isinstance(calib, (str, Path)):
        if tokenizer is None:
            raise LmembedError(f"calibration text {calib}: a tokenizer is needed to read text (pass tokenizer=)")
        from ..data.texts import load_text

        text = load_text(str(calib))
        ids = torch.tensor(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"],
                           dtype=torch.long)
        source = str(calib)
        if len(ids) and int(ids.max()) >= vocab_size:
            raise LmembedError(f"calibration text {calib}: its tokenizer gives id {int(ids.max())} but the model has "
                               f"{vocab_size} tokens (tokenizer of another model?)")
    else:
        raise LmembedError(f"calib: expected a text spec, a file, or token ids, not {type(calib).__name__}")
    if len(ids) == 0:
        raise LmembedError(f"calibration {source}: empty (no tokens)")
    if len(ids) < tokens:
        raise LmembedError(f"calibration {source}: {len(ids)} tokens, fewer than the budget of {tokens}; give a "
                           f"longer text or lower the budget (calib_tokens / --calib-tokens)")
    return ids[:tokens], source


@torch.no_grad()
def calibrate(model: torch.nn.Module, calib: Any, *, tokenizer: Any = None, tokens: int = DEFAULT_TOKENS,
              window: int = 512, batch: int = 4, sample: int = 4096, seed: int = 0, cache: bool = True,
              progress: bool | None = None) -> CalibStats:
    """One forward pass of the (uncompressed) model over the calibration ids."""
    sites = find_sites(model)
    v, d = sites.input_weight.shape
    ids, source = calibration_ids(calib, tokenizer, v, tokens)
    key = hashlib.sha1()
    key.update(content_hash(sites.input_weight).encode())  # read in place, no copy of the matrix
    key.update(ids.numpy().tobytes())
    key.update(f"{window}:{sample}:{seed}".encode())
    path = _cache_dir() / f"{key.hexdigest()[:20]}.pt"
    if cache and path.exists():
        try:
            return CalibStats(**torch.load(path, weights_only=True))
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            path.unlink(missing_ok=True)
    in_freq = torch.bincount(ids, minlength=v).double()
    head = sites.output_module
    if head is None:  # an encoder: only the input side has something to say
        return CalibStats(None, None, in_freq, len(ids), source, d)
    from ..models.pretrained import context_length

    window = min(window, context_length(model))
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    moment = torch.zeros(d, d, dtype=torch.float64)
    prob = torch.zeros(v, dtype=torch.float64)
    hs: list[torch.Tensor] = []
    device = next(model.parameters()).device
    n_rows = max(1, len(ids) // window)
    rows = ids[: n_rows * window].view(n_rows, window)
    was_training = model.training
    model.eval()
    try:
        for s in tqdm(range(0, n_rows, batch), desc="calibrating", disable=None if progress is None else not progress,
                      leave=False):
            captured.clear()
            logits = _logits(model, rows[s : s + batch].to(device))
            h = captured[-1].reshape(-1, d).double().cpu()
            moment += h.t() @ h
            prob += torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), -1).double().sum(0).cpu()[:v]
            hs.append(h.float())
    finally:
        hook.remove()
        model.train(was_training)
    n = n_rows * window
    all_h = torch.cat(hs)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(all_h), generator=g)[: min(sample, len(all_h))]
    stats = CalibStats(moment / n, prob / n, in_freq, n, source, d, all_h[pick].contiguous())
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(stats.to_dict(), tmp)
        os.replace(tmp, path)
    return stats


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x) if hasattr(model, "config") else model(x)
    return out.logits if hasattr(out, "logits") else out[0]
