"""Rows of different widths in one matrix: the formats of ``mixed`` and ``kmixed``.

Every row belongs to one width class; each class is a packed format of its own (QuantizedEmbedding
for ``mixed``, SuperBlockEmbedding for ``kmixed``) holding its rows in vocabulary order, and a
bit-packed row map (ceil(log2(classes)) bits per row) says which class a row is in. A lookup finds
a row's class and slot from the map; the head forms each class's logits and scatters them into
their columns, so no dense matrix is ever formed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import kernels
from .base import (
    CompressedEmbedding,
    IndexedEmbedding,
    PackedRows,
    build_module,
    index_map,
    map_classes,
    map_slots,
    register_module,
)
from .bits import pack_bits, unpack_bits
from .quantized import QuantizedEmbedding
from .superblock import BITS_RANGE, SuperBlockEmbedding, row_bytes

LOGIT_POSITIONS = 64  # positions whose per-width logits are formed at once


@register_module
class MixedQuantizedEmbedding(IndexedEmbedding, PackedRows):
    """Rows quantised at different widths: one QuantizedEmbedding per width + a row -> width map."""

    kind = "mixed"
    FORMAT_VERSION = 1  # formats/base.py: bump when its stored form changes
    gguf_form = "codes"  # each width class's codes, rows back in place (gguf_parts)

    def __init__(self, parts: list[QuantizedEmbedding], row_class: torch.Tensor, *, scale: float = 1.0):
        super().__init__(len(row_class), parts[0].embedding_dim, scale=scale)
        self.parts = torch.nn.ModuleList(parts)
        self.register_buffer("row_class", row_class.to(torch.uint8))
        self._index()

    def class_map(self) -> tuple[torch.Tensor, int]:
        """The stored row -> class map and the bits of one entry."""
        return self.row_class, 8

    def _index(self) -> None:
        """Derived (not stored): the map's class-count table (4 bytes per class per 64 rows), once the
        map is checked against the parts' row counts."""
        packed, bits = self.class_map()
        if packed.is_meta:  # built to be loaded into: derived once the real map arrives
            return
        self._counts = index_map(packed, bits, self.num_embeddings, [p.num_embeddings for p in self.parts],
                                 f"{self.kind} module: the row-class map")

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> MixedQuantizedEmbedding:
        parts = [build_module(p) for p in spec["parts"]]
        counts = [p["num_embeddings"] for p in spec["parts"]]
        if not 1 <= len(parts) <= kernels.MAX_CLASSES:
            raise ValueError(f"expected 1..{kernels.MAX_CLASSES} parts")
        row_class = torch.cat([torch.full((n,), c, dtype=torch.uint8) for c, n in enumerate(counts)])
        return cls(parts, row_class, scale=spec["scale"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "parts": [p.spec() for p in self.parts],
                "bits": [p.bits for p in self.parts], "rows": [p.num_embeddings for p in self.parts]}

    def layout(self) -> kernels.Layout:
        """One column range; each row in its class's format (the kernel walks the map)."""
        packed, bits = self.class_map()
        cols = kernels.Columns(0, self.embedding_dim, [p.row_codes() for p in self.parts], packed.reshape(-1), bits,
                               self._counts)
        return kernels.Layout(self.num_embeddings, self.embedding_dim, [cols])

    def lookup_torch(self, ids: torch.Tensor) -> torch.Tensor:
        packed, bits = self.class_map()
        cls = map_classes(packed, bits, ids)
        slot = map_slots(packed, bits, self._counts, ids, cls)
        out = torch.empty(len(ids), self.embedding_dim, device=ids.device)
        for c, part in enumerate(self.parts):
            sel = (cls == c).nonzero().flatten()
            if len(sel):
                out[sel] = part.lookup(slot[sel])
        return out

    def logits_torch(self, h: torch.Tensor) -> torch.Tensor:
        """Each width's logits scattered into their columns, LOGIT_POSITIONS positions at a time: the
        per-width block is a temporary, so it stays small beside the (positions x V) output."""
        packed, bits = self.class_map()
        cls = map_classes(packed, bits, torch.arange(self.num_embeddings, device=packed.device))
        rows = [(cls == c).nonzero().flatten() for c in range(len(self.parts))]
        out = torch.empty(len(h), self.num_embeddings, dtype=h.dtype, device=h.device)
        for s in range(0, len(h), LOGIT_POSITIONS):
            for part, r in zip(self.parts, rows, strict=True):
                if len(r):
                    out[s : s + LOGIT_POSITIONS, r] = part.logits(h[s : s + LOGIT_POSITIONS])
        return out

    def gguf_parts(self) -> list[tuple[CompressedEmbedding, torch.Tensor | None]]:
        row_class = self.row_class
        return [(part, row_class == c) for c, part in enumerate(self.parts)]


MAX_CLASSES = BITS_RANGE[1] - BITS_RANGE[0] + 1


def map_bits(classes: int) -> int:
    """Bits of one row's entry in the row-class map (at least one, so the map is never empty)."""
    return max(1, math.ceil(math.log2(max(classes, 1))))


def kmixed_bytes(rows: list[int], dim: int, bits: list[int], group: int) -> int:
    """Exact stored bytes: each class's rows at their width, plus the packed row map."""
    total = sum(n * row_bytes(dim, b, group) for n, b in zip(rows, bits, strict=True))
    return total + math.ceil(sum(rows) * map_bits(len(rows)) / 8)


@register_module
class MixedSuperBlockEmbedding(MixedQuantizedEmbedding):
    """Rows stored at different super-block widths: one SuperBlockEmbedding per width and a
    bit-packed row -> width map (lookups and logits as in MixedQuantizedEmbedding)."""

    kind = "kmixed"
    FORMAT_VERSION = 1  # formats/base.py: bump when its stored form changes
    gguf_form = None  # a GGUF tensor has one block type, and its rows have several K-quant widths

    def __init__(self, parts: list[SuperBlockEmbedding], row_class: torch.Tensor, *, scale: float = 1.0):
        CompressedEmbedding.__init__(self, len(row_class), parts[0].embedding_dim, scale=scale)
        self.parts = nn.ModuleList(parts)
        self.map_bits = map_bits(len(parts))
        self.register_buffer("row_map", pack_bits(row_class.to(torch.int32).view(1, -1), self.map_bits))
        self._index()

    def class_map(self) -> tuple[torch.Tensor, int]:
        return self.row_map, self.map_bits

    @property
    def row_class(self) -> torch.Tensor:
        """Every row's class (unpacked from the stored map when asked: not kept)."""
        return unpack_bits(self.row_map, self.map_bits, self.num_embeddings)[0].to(torch.uint8)

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> MixedSuperBlockEmbedding:
        parts = [build_module(p) for p in spec["parts"]]
        if not 1 <= len(parts) <= MAX_CLASSES or any(not isinstance(p, SuperBlockEmbedding) for p in parts):
            raise ValueError(f"expected 1..{MAX_CLASSES} superblock parts")
        counts = [p.num_embeddings for p in parts]
        if sum(counts) != spec["num_embeddings"] or spec.get("map_bits", map_bits(len(parts))) != map_bits(len(parts)):
            raise ValueError("part rows or map bits do not match num_embeddings")
        row_class = torch.cat([torch.full((n,), c, dtype=torch.uint8) for c, n in enumerate(counts)])
        return cls(parts, row_class, scale=spec["scale"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "map_bits": self.map_bits, "group_size": self.parts[0].group_size}
