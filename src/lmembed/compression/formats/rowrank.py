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

from ...errors import LmembedError
from . import kernels
from .base import IndexedEmbedding, register_module, stored_key

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
    FORMAT_VERSION = 1  # formats/base.py: bump when its stored form changes

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
        """Each row's place in the stored order (int32: 4 bytes per row) and, per rank, its first place
        and first code (strict: the ranks must lie in 0..rank and add up to the number of codes)."""
        if self.ranks.is_meta:
            return
        ranks = self.ranks.long()
        if strict and (int(ranks.min()) < 0 or int(ranks.max()) > self.rank
                       or int(ranks.sum()) != self.codes.numel()):
            raise LmembedError(f"rowrank module: the per-row ranks (0..{self.rank}) do not add up to the "
                               f"{self.codes.numel()} codes stored")
        ranks = ranks.clamp(0, self.rank)
        order = torch.sort(ranks, stable=True).indices
        self._position = torch.empty(len(ranks), dtype=torch.int32, device=ranks.device)
        self._position[order] = torch.arange(len(ranks), dtype=torch.int32, device=ranks.device)
        per_rank = torch.bincount(ranks, minlength=self.rank + 1)
        self._first = per_rank.cumsum(0) - per_rank
        codes = per_rank * torch.arange(self.rank + 1, device=ranks.device)
        self._start = codes.cumsum(0) - codes
        # (rank, rows of that rank, first code): each rank's codes are one dense block
        self._blocks = [(k, n, int(self._start[k])) for k, n in enumerate(per_rank.tolist()) if k and n]
        self._zero_rows = int(per_rank[0])  # they come first in the stored order

    def block(self, k: int, n: int, start: int) -> torch.Tensor:
        return self.codes[start:start + n * k].view(n, k)

    def rank_rows(self) -> kernels.RankRows:
        """The kernels' view; the row places are made (and checked) again when a stored tensor changed
        since they were: the C code trusts them."""
        key = stored_key(self)
        if self.__dict__.get("_index_key") != key:
            self._index()
            self.__dict__["_index_key"] = key
        return kernels.RankRows(self.codes.detach(), self.ranks, self._position, self._first, self._start, self.rank)

    def _kernel(self, *extra: torch.Tensor) -> bool:
        return self.codes.dtype == torch.float32 and kernels.usable(*extra, self.codes, self.decoder, self.ranks)

    def padded(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` as `rank` codes each, zero past the row's own rank."""
        if self._kernel(ids):
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
                raise IndexError(f"token id out of range for {self.num_embeddings} embeddings")
            return kernels.rowrank_rows(self.rank_rows(), ids=ids)
        j = torch.arange(self.rank, device=ids.device)
        k = self.ranks[ids].long()
        offset = self._start[k] + (self._position[ids].long() - self._first[k]) * k
        idx = (offset[:, None] + j).clamp_max(max(self.codes.numel() - 1, 0))
        return torch.where(j < k[:, None], self.codes[idx] if self.codes.numel() else 0.0, 0.0)

    # -- the two roles ----------------------------------------------------------------------------
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.padded(ids) @ self.decoder

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        if self._kernel(flat):
            out = self._kernel_logits(flat.float() @ self.decoder.detach().t()).to(h.dtype)
        else:
            out = self._torch_logits(flat)
        return out.reshape(*h.shape[:-1], self.num_embeddings)

    def _kernel_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Few positions: every row's codes dotted with z in C; many: rows decoded a chunk at a time
        (zero-padded to `rank` codes) for a BLAS matmul."""
        rows = self.rank_rows()
        if len(z) <= kernels.KERNEL_MAX_ROWS:
            return kernels.rowrank_logits(rows, z)
        out = torch.empty(len(z), self.num_embeddings)
        buf = torch.empty(min(kernels.DECODE_ROWS, self.num_embeddings), self.rank)
        for s in range(0, self.num_embeddings, kernels.DECODE_ROWS):
            kernels.into(out, s, z, kernels.rowrank_rows(rows, s, min(kernels.DECODE_ROWS, self.num_embeddings - s),
                                                        out=buf))
        return out

    def _torch_logits(self, flat: torch.Tensor) -> torch.Tensor:
        zt = (flat @ self.decoder.to(flat.dtype).t()).t()
        out = torch.empty(len(flat), self.num_embeddings, dtype=flat.dtype, device=flat.device)
        position = self._position.to(flat.device)
        blocks = [(self.block(k, n, start).to(flat.dtype), k) for k, n, start in self._blocks]
        if torch.is_grad_enabled() and (zt.requires_grad or self.codes.requires_grad):
            for s in range(0, len(flat), LOGIT_POSITIONS):  # differentiable (the kl stage trains through it)
                z = zt[:, s:s + LOGIT_POSITIONS]
                parts = [z.new_zeros(self._zero_rows, z.shape[1])] + [c @ z[:k] for c, k in blocks]
                out[s:s + LOGIT_POSITIONS] = torch.cat(parts).index_select(0, position).t()
            return out
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
        return out
