"""`kmixed:AVG[:gG]`: mixed precision over super-block widths, chosen by the calibrated cost.

Every row of the matrix is stored in one super-block format kqB:gG (superblock.py) whose width B
is picked per row from `choices`, so that the *stored* bits per matrix value (codes, 6-bit
sub-parameters, fp16 super-parameters and the bit-packed row-class map) average at most AVG.
The widths minimise the calibrated cost Σ_v w_v · ΔE_v(B_v) M ΔE_v(B_v)ᵀ (row weights w and
column metric M from the calibration statistics, calibrated.py), by the same Lagrangian
allocation as `mixed` (allocation.allocate): a tied model predicts and looks up a few thousand tokens
almost all the time, so those rows get 5-8 bits and the long tail 2-3.

Every candidate width is fitted on all rows (rows are independent), either calibration-free
(the kq fit) or, with ``gptq=1``, with its codes rounded column by column against M with the
rounding error pushed onto the columns not yet rounded (superblock.gptq_superblock).

Stored: one SuperBlockEmbedding per width in use (its rows in vocabulary order) and ``row_map``,
the class of each row packed at ceil(log2(classes)) bits (at least 1), so a row costs
ceil(d*B/8) + ceil(12*ceil(d/G)/8) + 4 bytes plus its map bits, and the whole module
Σ_rows row_bytes + ceil(V * map_bits / 8) bytes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import LmembedError
from .calibrated import DAMP, FLOOR, MIX
from .mixed import Mixed, MixedQuantizedEmbedding, _choices
from .modules import CompressedEmbedding, build_module, pack_bits, register_module, unpack_bits
from .registry import Arg, bool_flag, group_size, non_negative_int, positive_float, register
from .superblock import BITS_RANGE, SuperBlockEmbedding, gptq_superblock, quantize_superblock, row_bytes

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




@register
class KMixed(Mixed):
    needs_calib = True
    name = "kmixed"
    summary = ("mixed-precision super-block rows (calibrated): AVG stored bits per value, each row a kqB width "
               "chosen by its calibrated cost")
    positional = (Arg("avg", positive_float, required=True, help="stored bits per matrix value, everything counted"),
                  Arg("group", group_size, 32, "gG: columns per 6-bit sub-scale and sub-min (default g32)"))
    options = (
        Arg("choices", _choices, (2, 3, 4, 5, 6), "allowed widths (2..8), e.g. 3-4-6"),
        Arg("gptq", bool_flag, False, "round each width's codes against the calibration metric with error feedback"),
        Arg("search", non_negative_int, 5, "candidate scales tried per group by the kq fit"),
        MIX, DAMP, FLOOR,
    )

    def makes(self, given: str) -> str:
        return "final"

    def check_args(self) -> None:
        lo, hi = BITS_RANGE
        if not all(lo <= b <= hi for b in self.choices):
            widths = "-".join(map(str, self.choices))
            raise LmembedError(f"method {self.text!r}: widths {widths} must lie in {lo}..{hi}")
        super().check_args()

    def narrowest(self, dim: int) -> float:
        return row_bytes(dim, min(self.choices), self.group) * 8 / dim + map_bits(len(self.choices)) / dim

    def widest(self, dim: int) -> float:
        return row_bytes(dim, max(self.choices), self.group) * 8 / dim + map_bits(len(self.choices)) / dim

    def ceiling(self) -> float:
        """The most `widest` can be for d >= G: codes, sub-scales and sub-mins each round up by at
        most a byte and a group, plus the 4-byte super scale and the map entry."""
        return max(self.choices) + (72 + map_bits(len(self.choices))) / self.group

    def candidate(self, rows: torch.Tensor, metric: torch.Tensor, bits: int) -> SuperBlockEmbedding:
        """Some rows at one width (rows are fitted independently of each other)."""
        if self.gptq:
            return gptq_superblock(rows, metric, bits, self.group, search=self.search)
        return quantize_superblock(rows, bits, self.group, search=self.search)

    def row_bits(self, dim: int) -> torch.Tensor:
        return torch.tensor([row_bytes(dim, b, self.group) * 8 for b in self.choices], dtype=torch.float64)

    def budget(self, num_embeddings: int, dim: int) -> float:
        """AVG bits per value, less the bit-packed row map."""
        return self.avg * num_embeddings * dim - math.ceil(num_embeddings * map_bits(len(self.choices)) / 8) * 8

    def assemble(self, parts: list[CompressedEmbedding], row_class: torch.Tensor) -> CompressedEmbedding:
        return MixedSuperBlockEmbedding(parts, row_class)
