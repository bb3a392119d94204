"""One Lagrangian for every "spend a budget across items" choice: bits per row (mixed, kmixed),
bits per (row, band) (tc), codes per row (wsvd's per-row ranks)."""

from __future__ import annotations

import torch

from ...errors import LmembedError


def allocate(costs: torch.Tensor, bits_per_row: torch.Tensor, budget: float) -> torch.Tensor:
    """costs (N x C), bits_per_row (C,) stored bits of one item at each choice, or (N x C) when items
    differ; returns the choice per item minimising Σ cost subject to Σ bits <= budget (Lagrangian
    bisection)."""
    bits = (bits_per_row if bits_per_row.dim() == 2 else bits_per_row[None, :]).double()
    bits = bits.expand(costs.shape[0], -1)
    if bits.min(1).values.sum().item() > budget + 1e-6:
        raise LmembedError(f"the budget of {budget / costs.shape[0]:.1f} bits per item is below the "
                           f"narrowest width's {bits.min(1).values.mean().item():.1f}")
    spread = max(1e-12, (bits.max() - bits.min()).item())
    lo, hi = 0.0, float(costs.max().item() / spread) * 4 + 1.0

    def pick(lam: float) -> torch.Tensor:
        return (costs + lam * bits).argmin(1)

    def total(c: torch.Tensor) -> float:
        return bits.gather(1, c[:, None]).sum().item()

    for _ in range(64):  # choices closer together than the spread need a larger multiplier
        if total(pick(hi)) <= budget:
            break
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if total(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)
