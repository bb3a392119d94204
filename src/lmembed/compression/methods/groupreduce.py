"""GroupReduce (Chen et al. 2018): block-wise, frequency-weighted low-rank approximation.

Tokens are sorted by corpus frequency and cut into BLOCKS equal blocks. Each block gets its own
rank-r_b factorisation with the basis that minimises the frequency-weighted error (the top
eigenvectors of W_b^T diag(f) W_b). Ranks come from one budget, the parameters of ``svd:RANK`` on
the whole matrix, handed out one at a time to the block whose next eigenvalue buys the most
weighted error per parameter, which is optimal for this separable, concave problem. (The paper's
refinement step, which moves tokens between blocks, is not implemented: blocks stay frequency
bands.) Counts come from ``corpus=``, the ``freqs`` given to ``lmembed.compress``, or a preceding
``trim`` stage's corpus; weights are (count + 1) ** power so unseen tokens keep a small weight.
"""

from __future__ import annotations

import heapq

import torch

from ...errors import LmembedError
from ..formats.base import CompressedEmbedding
from ..formats.dense import FactorizedEmbedding
from ..formats.grouped import GroupedEmbedding
from ..registry import Arg, FitContext, Method, non_negative_float, positive_int, register
from .counts import SPLIT, corpus_files, token_counts
from .svd import check_rank


def allocate_ranks(eigvals: list[torch.Tensor], sizes: list[int], dim: int, budget: int, min_rank: int) -> list[int]:
    """Greedy ranks: each step adds the rank whose eigenvalue (weighted error removed) per
    parameter (n_b + d) is largest, while the total sum r_b (n_b + d) stays within `budget`."""
    caps = [min(n, dim) for n in sizes]
    ranks = [min(min_rank, c) for c in caps]
    used = sum(r * (n + dim) for r, n in zip(ranks, sizes, strict=True))
    heap = [(-float(ev[r]) / (n + dim), b) for b, (ev, r, n, c) in enumerate(zip(eigvals, ranks, sizes, caps,
                                                                                 strict=True)) if r < c]
    heapq.heapify(heap)
    while heap:
        _, b = heapq.heappop(heap)
        cost = sizes[b] + dim
        if used + cost > budget:
            continue  # this block's next rank does not fit; a smaller block's still might
        ranks[b] += 1
        used += cost
        if ranks[b] < caps[b]:
            heapq.heappush(heap, (-float(eigvals[b][ranks[b]]) / cost, b))
    return ranks


@register
class GroupReduce(Method):
    name = "groupreduce"
    summary = ("GroupReduce (Chen et al. 2018): tokens sorted by frequency into BLOCKS blocks, each a frequency-"
               "weighted low-rank factorisation; RANK = average rank (the parameters of svd:RANK), frequent blocks "
               "get more; counts from corpus=, compress(freqs=) or a preceding trim")
    positional = (Arg("rank", positive_int, required=True, help="average rank"),
                  Arg("blocks", positive_int, required=True, help="number of frequency blocks"))
    options = (Arg("corpus", str, None, "count tokens in this corpus (file, folder, bundled name: its train split)"),
               SPLIT,
               Arg("min_rank", positive_int, 1, "smallest rank of a block"),
               Arg("power", non_negative_float, 1.0, "row weights (count + 1) ** power; 0 = unweighted"))

    def makes(self, given: str) -> str:
        return "factors"

    def check(self, num_embeddings: int, dim: int) -> None:
        check_rank(self, self.rank, dim)
        if self.blocks > num_embeddings:
            raise LmembedError(f"method {self.text!r}: {self.blocks} blocks for {num_embeddings} rows")
        if self.min_rank > self.rank:
            raise LmembedError(f"method {self.text!r}: min_rank {self.min_rank} exceeds the average rank {self.rank}")
        if self.min_rank * (num_embeddings + self.blocks * dim) > self.rank * (num_embeddings + dim):
            raise LmembedError(f"method {self.text!r}: {self.blocks} blocks at rank >= {self.min_rank} need more "
                               f"parameters than svd:{self.rank}; use fewer blocks or a higher rank")
        if self.corpus is not None:
            try:
                corpus_files(self.corpus, self.split)
            except LmembedError as e:
                raise LmembedError(f"method {self.text!r}: {e}") from None

    def freqs(self, ctx: FitContext, num_embeddings: int) -> torch.Tensor:
        if self.corpus is not None:
            if ctx.tokenizer is None:
                raise LmembedError(f"method {self.text!r}: corpus= needs the model's tokenizer "
                                   "(lmembed.compress(..., tokenizer=tok))")
            return token_counts(ctx.tokenizer, self.corpus, num_embeddings, self.split).counts
        if ctx.freqs is None:
            raise LmembedError(f"method {self.text!r} needs token frequencies: add :corpus=NAME, pass "
                               "lmembed.compress(..., freqs=counts), or put it after trim:CORPUS")
        f = torch.as_tensor(ctx.freqs).flatten()
        if f.numel() != num_embeddings:
            raise LmembedError(f"method {self.text!r}: {f.numel()} frequencies for {num_embeddings} rows")
        return f

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        v, d = weight.shape
        self.check(v, d)
        counts = self.freqs(ctx, v).double().cpu()
        w = weight.detach().float().cpu()
        weights = (counts.clamp_min(0) + 1).pow(self.power)
        order = torch.argsort(-counts, stable=True)
        groups = list(torch.tensor_split(order, self.blocks))
        eigvals, bases = [], []
        for idx in groups:
            a = w[idx].double() * weights[idx].sqrt().unsqueeze(1)
            vals, vecs = torch.linalg.eigh(a.t() @ a)  # ascending
            eigvals.append(vals.flip(0).clamp_min(0))
            bases.append(vecs.flip(1).float())
        ranks = allocate_ranks(eigvals, [len(g) for g in groups], d, self.rank * (v + d), self.min_rank)
        blocks = []
        for idx, basis, r in zip(groups, bases, ranks, strict=True):
            vb = basis[:, :r]
            blocks.append(FactorizedEmbedding(w[idx] @ vb, vb.t().contiguous()))
        ctx.log(f"{self.text}: block ranks {ranks}")
        return GroupedEmbedding(order, blocks)
