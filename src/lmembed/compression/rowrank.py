"""Low rank with a rank per row: E_v ~ c_v D[:k_v], one shared decoder D, row v keeping k_v codes.

A uniform rank-k factorisation spends k codes on every row, yet its error is not spread evenly:
on SmolLM2, compressing only the 8,000 most probable rows (exact rest) costs a third of what the
other 41,000 cost. With the rows written in a whitened basis ordered by the calibrated error a
direction removes (wsvd's), the tail energy of row v after k codes is its error at rank k, so one
Lagrangian (allocation.allocate) picks every k_v for the same stored bytes as rank k:
``wsvd:432:alloc=rows``.

Stored: the decoder (kmax x d), the per-row ranks (int16) and all codes in one flat tensor, rows of
equal rank together (ascending rank, then row id), so each rank's codes are one dense block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LmembedError
from .modules import IndexedEmbedding, register_module

RANK_DTYPE = torch.int16
RANK_BYTES = 2
# Positions whose logits are formed at a time, rank by rank in the stored order, then put back in
# vocabulary order (SmolLM2, 512 positions, one thread: 430 ms, against 670 ms writing each rank's
# columns into place). Its two V x 256 scratch blocks are big enough for glibc to map them apart
# and give them back when freed; at 64 they came from the heap and the process kept ~100 MB more.
LOGIT_POSITIONS = 256


@register_module
class RowRankEmbedding(IndexedEmbedding):
    """E_v = codes_v @ decoder[:ranks[v]] (see the module doc)."""

    kind = "rowrank"

    def __init__(self, codes: torch.Tensor, ranks: torch.Tensor, decoder: torch.Tensor, *, scale: float = 1.0):
        super().__init__(len(ranks), decoder.shape[1], scale=scale)
        self.rank = int(decoder.shape[0])
        self.codes = nn.Parameter(codes.detach().clone().flatten())
        self.decoder = nn.Parameter(decoder.detach().clone())
        self.register_buffer("ranks", ranks.detach().to(RANK_DTYPE).clone())
        self._index(strict=False)  # an empty module: its ranks arrive with load_state_dict

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> RowRankEmbedding:
        v, d, k, total = spec["num_embeddings"], spec["embedding_dim"], spec["rank"], spec["codes"]
        if type(total) is not int or not 0 <= total <= v * k or k > d or k > torch.iinfo(RANK_DTYPE).max:
            raise ValueError(f"codes must be an integer in 0..num_embeddings x rank, rank at most embedding_dim "
                             f"and {torch.iinfo(RANK_DTYPE).max}")
        return cls(torch.zeros(total), torch.zeros(v, dtype=RANK_DTYPE), torch.zeros(k, d), scale=spec["scale"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "rank": self.rank, "codes": int(self.codes.numel())}

    # -- derived (not stored) ---------------------------------------------------------------------
    def _index(self, strict: bool = True) -> None:
        """Each row's offset into the flat codes, and the rows of each rank (strict: the ranks must
        lie in 0..rank and add up to the number of codes stored)."""
        if self.ranks.is_meta:
            return
        ranks = self.ranks.long()
        if strict and (int(ranks.min()) < 0 or int(ranks.max()) > self.rank
                       or int(ranks.sum()) != self.codes.numel()):
            raise LmembedError(f"rowrank module: the per-row ranks (0..{self.rank}) do not add up to the "
                               f"{self.codes.numel()} codes stored")
        order = torch.sort(ranks, stable=True).indices
        sizes = ranks[order]
        starts = torch.cumsum(sizes, 0) - sizes
        self._offset = torch.empty_like(ranks)
        self._offset[order] = starts
        self._position = torch.empty_like(ranks)  # each row's place in the stored order
        self._position[order] = torch.arange(len(ranks), device=ranks.device)
        self._zero_rows = int((ranks == 0).sum())  # they come first in that order
        self._blocks = []  # (rank, rows of that rank, first code): each rank's codes are one dense block
        values, counts = torch.unique_consecutive(sizes, return_counts=True)
        start = 0
        for k, n in zip(values.tolist(), counts.tolist(), strict=True):
            if k:
                self._blocks.append((k, n, start))
            start += k * n

    def block(self, k: int, n: int, start: int) -> torch.Tensor:
        return self.codes[start:start + n * k].view(n, k)

    # -- the two roles ----------------------------------------------------------------------------
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        j = torch.arange(self.rank, device=ids.device)
        k = self.ranks[ids].long()
        idx = (self._offset.to(ids.device)[ids][:, None] + j).clamp_max(max(self.codes.numel() - 1, 0))
        z = torch.where(j < k[:, None], self.codes[idx] if self.codes.numel() else 0.0, 0.0)
        return z @ self.decoder

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        zt = (flat @ self.decoder.to(h.dtype).t()).t()
        out = torch.empty(len(flat), self.num_embeddings, dtype=h.dtype, device=h.device)
        position = self._position.to(h.device)
        blocks = [(self.block(k, n, start).to(h.dtype), k) for k, n, start in self._blocks]
        if torch.is_grad_enabled() and (zt.requires_grad or self.codes.requires_grad):
            for s in range(0, len(flat), LOGIT_POSITIONS):  # differentiable (the kl stage trains through it)
                z = zt[:, s:s + LOGIT_POSITIONS]
                parts = [z.new_zeros(self._zero_rows, z.shape[1])] + [c @ z[:k] for c, k in blocks]
                out[s:s + LOGIT_POSITIONS] = torch.cat(parts).index_select(0, position).t()
            return out.reshape(*h.shape[:-1], self.num_embeddings)
        # inference: two scratch blocks reused for every chunk, so no temporaries pile up in the heap
        scratch = zt.new_zeros(self.num_embeddings, min(LOGIT_POSITIONS, len(flat)))
        ordered = torch.empty_like(scratch)
        for s in range(0, len(flat), LOGIT_POSITIONS):
            z = zt[:, s:s + LOGIT_POSITIONS]
            n, row = z.shape[1], self._zero_rows
            for c, k in blocks:
                torch.mm(c, z[:k], out=scratch[row:row + len(c), :n])
                row += len(c)
            torch.index_select(scratch[:, :n], 0, position, out=ordered[:, :n])
            out[s:s + n] = ordered[:, :n].t()
        return out.reshape(*h.shape[:-1], self.num_embeddings)

