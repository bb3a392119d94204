"""Perplexity, one implementation for every model under test.

- recurrent models read the stream in contiguous batches and carry their state across them;
- attention models (lmembed's Transformer, any causal `transformers` model) use sliding windows:
  each window of `window` tokens scores only the targets the previous window did not, so every
  token after the first window sees at least `window - stride` tokens of context.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.batching import StreamBatches
from ..errors import LmembedError

MAX_LOG_PPL = 700  # exp() overflows a float64 beyond ~709.8: report such a perplexity as inf


def autocast_for(device: torch.device, amp: str = "auto"):
    """bf16 autocast on CUDA when asked (or auto); a no-op context on CPU."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def windows(n_targets: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, n_scored) over targets 0..n_targets-1: inputs are tokens [start, end),
    targets [start+1, end+1), and only the last n_scored targets of the window count."""
    if not 0 < stride <= window:
        raise LmembedError(f"stride {stride} must be in 1..window ({window})")
    scored_to = 0
    start = 0
    while scored_to < n_targets:
        end = min(start + window, n_targets)
        yield start, end, end - scored_to
        scored_to = end
        start = max(0, min(start + stride, n_targets - window)) if end < n_targets else end


def window_nll(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    rows: torch.Tensor,
    *,
    window: int,
    stride: int | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """Summed NLL and token count of `rows` (B, L) under a causal model given as logits_fn(x)."""
    stride = stride or max(1, window // 2)
    n_targets = rows.shape[1] - 1
    total, count = 0.0, 0
    spans = list(windows(n_targets, window, stride))
    for start, end, n in tqdm(spans, desc="eval", disable=not progress, leave=False):
        x = rows[:, start:end]
        y = rows[:, start + 1 : end + 1]
        logits = logits_fn(x)[:, -n:].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, -n:].reshape(-1), reduction="sum").item()
        count += y[:, -n:].numel()
    return total, count


@torch.no_grad()
def lm_nll(
    model: torch.nn.Module,
    ids: np.ndarray,
    *,
    batch_size: int,
    bptt: int,
    device: torch.device,
    amp: str = "auto",
    stride: int | None = None,
    progress: bool = False,
    rank: int = 0,
    world: int = 1,
) -> tuple[float, int]:
    """Summed NLL and token count of a token stream under one of lmembed's LMs.

    rank/world: this process scores only its share of the rows (data-parallel evaluation; the
    caller sums the results over ranks)."""
    was_training = model.training
    model.eval()
    try:
        with autocast_for(device, amp):
            if getattr(model, "recurrent", False):
                batches = StreamBatches(ids, batch_size, bptt, rank=rank, world=world)
                state, total, count = None, 0.0, 0
                for x, y in tqdm(batches, desc="eval", disable=not progress, leave=False):
                    x, y = x.to(device), y.to(device)
                    logits, state = model(x, state)
                    total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                             reduction="sum").item()
                    count += y.numel()
                return total, count
            b = min(batch_size, max(1, len(ids) // 2))
            n = len(ids) // b
            rows = torch.from_numpy(np.array(ids[: b * n], dtype=np.int64)).view(b, n)
            if world > 1:  # this rank's rows; with uneven rows rank 0 scores them all
                if b % world:
                    rows = rows if rank == 0 else rows[:0]
                else:
                    rows = rows[rank * b // world : (rank + 1) * b // world]
                if rows.shape[0] == 0:
                    return 0.0, 0
            rows = rows.to(device)
            return window_nll(lambda x: model(x)[0], rows, window=bptt, stride=stride, progress=progress)
    finally:
        model.train(was_training)


def ppl(nll: float, count: int) -> float:
    """exp(mean NLL); inf when that overflows (a diverged model), nan for no tokens."""
    if not count:
        return float("nan")
    mean = nll / count
    return math.exp(mean) if mean < MAX_LOG_PPL else float("inf")
