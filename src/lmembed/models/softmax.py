"""Cross-entropy over a large (tied) vocabulary without materialising the (tokens x V) logits.

Logits are computed `chunk` tokens at a time in forward (keeping only the log-sum-exp per token)
and recomputed chunk by chunk in backward, so peak memory is O(chunk x V) instead of O(N x V),
in fp32 whatever the autocast dtype of the matmuls. That is what makes a 267k-word vocabulary
(WikiText-103) fit: 700 tokens x 267k logits are 750 MB in fp32, a 128-token chunk is 137 MB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk: int):
        n = h.shape[0]
        acc = _acc_dtype(weight)
        lse = torch.empty(n, dtype=acc, device=h.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, n, chunk):
            logits = _logits(h[s : s + chunk], weight, bias)
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            total += (lse[s : s + chunk] - logits.gather(1, target[s : s + chunk, None]).squeeze(1)).sum()
        ctx.save_for_backward(h, weight, bias if bias is not None else torch.empty(0), target, lse)
        ctx.chunk, ctx.has_bias = chunk, bias is not None
        return total / n

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, target, lse = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        n, chunk = h.shape[0], ctx.chunk
        acc = _acc_dtype(weight)
        scale = grad.to(acc) / n
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if ctx.has_bias else None
        for s in range(0, n, chunk):
            hs = h[s : s + chunk]
            p = torch.exp(_logits(hs, weight, bias) - lse[s : s + chunk, None])  # softmax
            p[torch.arange(p.shape[0], device=p.device), target[s : s + chunk]] -= 1.0
            p *= scale
            dh[s : s + chunk] = (p.to(weight.dtype) @ weight).to(h.dtype)
            dw += p.t() @ hs.to(acc)
            if db is not None:
                db += p.sum(0)
        return dh, dw.to(weight.dtype), (db.to(bias.dtype) if db is not None else None), None, None


def _acc_dtype(weight: torch.Tensor) -> torch.dtype:
    """Softmax statistics in fp32 at least (fp64 stays fp64, e.g. for gradcheck)."""
    return torch.promote_types(weight.dtype, torch.float32)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    acc = _acc_dtype(weight)
    out = (h.to(weight.dtype) @ weight.t()).to(acc)
    return out + bias.to(acc) if bias is not None else out


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Mean CE of softmax(h·Wᵀ + b) against target; h (N, d), W (V, d), target (N,)."""
    return _ChunkedCE.apply(h, weight, bias, target, chunk)


def full_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
