"""Spectral and norm statistics of an embedding matrix (V x d).

Effective rank is RankMe (Garrido et al. 2023): with singular values s_k and p_k = s_k / sum(s),
erank = exp(-sum p_k log p_k). It is d for a matrix whose singular values are all equal and 1 for
a rank-one matrix.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def singular_values(E: torch.Tensor) -> np.ndarray:
    """Singular values, largest first (float64 for stability on tall matrices)."""
    return torch.linalg.svdvals(E.detach().to(torch.float64)).numpy()


def effective_rank(s: np.ndarray | torch.Tensor) -> float:
    s = np.asarray(s, dtype=np.float64)
    s = s[s > 0]
    if len(s) == 0:
        return 0.0
    p = s / s.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def energy_rank(s: np.ndarray, fraction: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold `fraction` of the squared Frobenius norm."""
    e = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    if len(e) == 0 or e[-1] == 0:
        return 0
    return int(np.searchsorted(e / e[-1], fraction) + 1)


def norm_stats(E: torch.Tensor) -> dict[str, float]:
    """Row L2 norms: mean, std, min, median, max."""
    n = E.detach().float().norm(dim=1).numpy().astype(np.float64)
    return {"mean": float(n.mean()), "std": float(n.std()), "min": float(n.min()), "median": float(np.median(n)),
            "max": float(n.max())}


def mean_cosine(E: torch.Tensor, rows: np.ndarray) -> float:
    """Average cosine over all pairs of `rows` (anisotropy: near 0 for isotropic embeddings)."""
    from .similarity import pairwise_cosines

    return float(pairwise_cosines(E, rows).mean()) if len(rows) > 1 else float("nan")


def spectrum_stats(E: torch.Tensor) -> dict:
    s = singular_values(E)
    return {"effective_rank": effective_rank(s), "rank90": energy_rank(s, 0.9), "dim": int(min(E.shape)),
            "singular_values": [float(v) for v in s]}
