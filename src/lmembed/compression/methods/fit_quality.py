"""How close a fitted matrix stays to the original, row by row (every compress report has it).

Everything is computed a chunk of rows at a time: the reconstruction is never materialised
whole, so measuring a fit costs no extra copy of the matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

KNN = 10  # neighbours compared per query row
KNN_QUERIES = 1000  # rows whose neighbourhoods are compared (a seeded sample)
ROW_CHUNK = 4096  # rows per step of every pass over a matrix
KNN_ROWS = 1024  # rows per step of the neighbour search: its (queries x rows) similarities are the temporary

Rows = Callable[[torch.Tensor], torch.Tensor]  # row ids -> those rows (e.g. a compressed module's lookup)


def _chunks(n: int, size: int = ROW_CHUNK) -> list[torch.Tensor]:
    return [torch.arange(s, min(s + size, n)) for s in range(0, n, size)]


@torch.no_grad()
def matrix_stats(original: torch.Tensor, approx: torch.Tensor | Rows, *, knn: int = KNN, queries: int = KNN_QUERIES,
                 seed: int = 0) -> dict[str, float]:
    """Relative Frobenius error, mean and min row cosine, and k-NN@knn overlap (cosine neighbours
    of `queries` random rows among all rows, original vs approximation; 1.0 = same neighbours).
    `approx` is a matrix or a function giving its rows by id."""
    rows_b = approx if callable(approx) else (lambda ids: approx[ids])
    a_of = lambda ids: original[ids].detach().float().cpu()  # noqa: E731
    b_of = lambda ids: rows_b(ids.to(original.device)).detach().float().cpu()  # noqa: E731
    v = original.shape[0]
    if not callable(approx) and approx.shape != original.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(approx.shape)}")
    err = ref = cos_sum = 0.0
    cos_min = float("inf")
    for ids in _chunks(v):
        a, b = a_of(ids), b_of(ids)
        err += (a - b).double().pow(2).sum().item()
        ref += a.double().pow(2).sum().item()
        cos = F.cosine_similarity(a, b, dim=-1, eps=1e-12)
        cos_sum, cos_min = cos_sum + cos.double().sum().item(), min(cos_min, cos.min().item())
    k = min(knn, v - 1)
    q = torch.randperm(v, generator=torch.Generator().manual_seed(seed))[: min(queries, v)]
    overlap = knn_overlap(a_of, b_of, v, q, k) if k > 0 else float("nan")
    return {"rel_fro_error": (err / max(ref, 1e-60)) ** 0.5, "mean_row_cosine": cos_sum / v,
            "min_row_cosine": cos_min, f"knn{knn}_overlap": overlap}


def _neighbours(rows: Rows, v: int, q: torch.Tensor, k: int) -> torch.Tensor:
    """The k cosine neighbours of each query row among all v rows (a row is not its own): one
    pass over the rows, keeping a running top-k, so each row is produced once."""
    qn = F.normalize(rows(q), dim=-1)
    best_v = torch.full((len(q), k), -float("inf"))
    best_i = torch.zeros((len(q), k), dtype=torch.long)
    for ids in _chunks(v, KNN_ROWS):
        sims = qn @ F.normalize(rows(ids), dim=-1).t()  # queries x chunk
        sims[q[:, None] == ids[None, :]] = -float("inf")
        vals, pos = torch.cat([best_v, sims], 1).topk(k, dim=-1)
        best_v, best_i = vals, torch.cat([best_i, ids.expand(len(q), -1)], 1).gather(1, pos)
    return best_i


def knn_overlap(rows_a: Rows, rows_b: Rows, v: int, q: torch.Tensor, k: int) -> float:
    na, nb = _neighbours(rows_a, v, q, k), _neighbours(rows_b, v, q, k)
    hits = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(na, nb, strict=True))
    return hits / (len(q) * k)
