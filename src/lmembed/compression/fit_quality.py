"""How close a fitted matrix stays to the original, row by row (every compress report has it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

KNN = 10  # neighbours compared per query row
KNN_QUERIES = 1000  # rows whose neighbourhoods are compared (a seeded sample)


@torch.no_grad()
def matrix_stats(original: torch.Tensor, approx: torch.Tensor, *, knn: int = KNN, queries: int = KNN_QUERIES,
                 seed: int = 0) -> dict[str, float]:
    """Relative Frobenius error, mean row cosine, and k-NN@knn overlap (cosine neighbours of
    `queries` random rows among all rows, original vs approximation; 1.0 = same neighbours)."""
    a, b = original.detach().float().cpu(), approx.detach().float().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    rel = ((a - b).norm() / a.norm().clamp_min(1e-30)).item()
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-12)
    v = a.shape[0]
    k = min(knn, v - 1)
    g = torch.Generator().manual_seed(seed)
    q = torch.randperm(v, generator=g)[: min(queries, v)]
    overlap = knn_overlap(a, b, q, k) if k > 0 else float("nan")
    return {"rel_fro_error": rel, "mean_row_cosine": cos.mean().item(), "min_row_cosine": cos.min().item(),
            f"knn{knn}_overlap": overlap}


def _neighbours(m: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    mn = F.normalize(m, dim=-1)
    sims = mn[q] @ mn.t()
    sims[torch.arange(len(q)), q] = -float("inf")  # a row is not its own neighbour
    return sims.topk(k, dim=-1).indices


def knn_overlap(a: torch.Tensor, b: torch.Tensor, q: torch.Tensor, k: int) -> float:
    na, nb = _neighbours(a, q, k), _neighbours(b, q, k)
    hits = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(na, nb, strict=True))
    return hits / (len(q) * k)
