"""GroupReduce's format: one rank-r_b factorisation per frequency block of rows.

Rows are stored block by block (each block a FactorizedEmbedding of its own rank) with the
permutation from vocabulary order to block order, so a lookup gathers from the right block and the
head concatenates per-block logits back into vocabulary order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import CompressedEmbedding, Container, build_module, index_dtype, register_module


@register_module
class GroupedEmbedding(Container):
    """Rows in blocks, each block any compressed module; `order` lists the original row ids
    block after block (block b holds rows order[start_b:end_b])."""

    kind = "grouped"
    FORMAT_VERSION = 1  # formats/base.py: bump when its stored form changes

    def __init__(self, order: torch.Tensor, blocks: list[CompressedEmbedding]):
        sizes = [b.num_embeddings for b in blocks]
        if sum(sizes) != order.numel():
            raise ValueError(f"blocks hold {sum(sizes)} rows, the order {order.numel()}")
        super().__init__(order.numel(), blocks[0].embedding_dim)
        self.blocks = nn.ModuleList(blocks)
        self.sizes = sizes
        self.register_buffer("order", order.to(index_dtype(order.numel())))

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> GroupedEmbedding:
        blocks = [build_module(s) for s in spec["blocks"]]
        return cls(torch.zeros(spec["num_embeddings"], dtype=torch.int64), blocks)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "sizes": self.sizes, "blocks": [b.spec() for b in self.blocks]}

    def parts(self) -> list[CompressedEmbedding]:
        return list(self.blocks)

    def with_parts(self, parts: list[CompressedEmbedding]) -> GroupedEmbedding:
        return GroupedEmbedding(self.order, parts)

    @property
    def ranks(self) -> list[int]:
        return [getattr(b, "rank", b.embedding_dim) for b in self.blocks]

    def _ends(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.sizes, device=device).cumsum(0)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        order = self.order.long()
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        pos = inv[ids]
        ends = self._ends(ids.device)
        blk = torch.bucketize(pos, ends, right=True)
        out = torch.empty(ids.numel(), self.embedding_dim, device=ids.device)
        for b in blk.unique().tolist():
            sel = blk == b
            start = ends[b] - self.sizes[b]
            out[sel] = self.blocks[b].lookup(pos[sel] - start).to(out.dtype)
        return out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        order = self.order.long().to(h.device)
        out = h.new_empty(*h.shape[:-1], self.num_embeddings)
        start = 0
        for size, block in zip(self.sizes, self.blocks, strict=True):
            out.index_copy_(-1, order[start : start + size], block.logits(h).to(out.dtype))
            start += size
        return out
