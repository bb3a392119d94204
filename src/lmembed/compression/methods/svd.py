"""Truncated SVD: the best rank-k approximation in Frobenius norm (Bałazy et al.'s baseline)."""

from __future__ import annotations

import torch

from ...errors import LmembedError
from ..formats.base import CompressedEmbedding
from ..formats.dense import FactorizedEmbedding
from ..registry import Arg, FitContext, Method, positive_int, register

GRAM_ROWS = 4096  # rows per step of the Gram matrix: float64 temporaries stay small


def gram_matrix(weight: torch.Tensor, transform: torch.Tensor | None = None,
                row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """XᵀX in float64 for X = diag(row_scale) · W · transform, a chunk of rows at a time (X is
    never held whole)."""
    d = weight.shape[1] if transform is None else transform.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=weight.device)
    for s in range(0, weight.shape[0], GRAM_ROWS):
        x = weight[s : s + GRAM_ROWS].detach().double()
        if transform is not None:
            x = x @ transform
        if row_scale is not None:
            x = x * row_scale[s : s + GRAM_ROWS, None]
        gram += x.t() @ x
    return gram


def top_right_singular_vectors(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None) -> torch.Tensor:
    """d x k: the top-k right singular vectors of a tall V x d matrix.

    Through the d x d Gram matrix in float64 (V·d² work, then a d x d eigensolve): much faster
    than a full SVD of the V x d matrix and accurate for the leading directions."""
    _, vecs = torch.linalg.eigh(gram_matrix(weight) if gram is None else gram)  # ascending eigenvalues
    return vecs[:, -rank:].flip(-1).to(weight.dtype if weight.dtype.is_floating_point else torch.float32)


def check_rank(method: Method, rank: int, dim: int) -> None:
    if not 0 < rank < dim:
        raise LmembedError(f"method {method.text!r}: rank {rank} must be in 1..{dim - 1} (the embedding "
                           f"dimension is {dim}; rank >= d compresses nothing)")


@register
class SVD(Method):
    name = "svd"
    summary = "truncated SVD, rank k: codes V x k (= U S) and decoder k x d (= V^T)"
    positional = (Arg("rank", positive_int, required=True, help="k"),)

    def makes(self, given: str) -> str:
        return "factors"

    def check(self, num_embeddings: int, dim: int) -> None:
        check_rank(self, self.rank, dim)

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        self.check(*weight.shape)
        w = weight.detach().float().to(ctx.device)
        v = top_right_singular_vectors(w, self.rank)
        return FactorizedEmbedding((w @ v).cpu(), v.t().contiguous().cpu())
