"""Truncated SVD: the best rank-k approximation in Frobenius norm (Bałazy et al.'s baseline)."""

from __future__ import annotations

import torch

from ..errors import LmembedError
from .modules import CompressedEmbedding, FactorizedEmbedding
from .registry import Arg, FitContext, Method, positive_int, register


def top_right_singular_vectors(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """d x k: the top-k right singular vectors of a tall V x d matrix.

    Through the d x d Gram matrix in float64 (V·d² work, then a d x d eigensolve): much faster
    than a full SVD of the V x d matrix and accurate for the leading directions."""
    w = weight.detach().double()
    gram = w.t() @ w
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
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

    def check(self, num_embeddings: int, dim: int) -> None:
        check_rank(self, self.rank, dim)

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        self.check(*weight.shape)
        w = weight.detach().float().to(ctx.device)
        v = top_right_singular_vectors(w, self.rank)
        return FactorizedEmbedding((w @ v).cpu(), v.t().contiguous().cpu())
