"""``kmixed:AVG[:gG]``: mixed precision over super-block widths (``kqB:gG`` per row).

The same calibrated Lagrangian allocation as ``mixed`` (its subclass), over super-block formats: the
frequent rows get 5-8 bits, the long tail 2-3, within AVG stored bits per value counting codes,
6-bit sub-parameters, fp16 super-parameters and the row map. Each candidate width is fitted on all
rows, calibration-free (the kq fit) or with ``gptq=1`` against M (superblock.gptq_superblock).
Stored as formats/mixed.py's MixedSuperBlockEmbedding.
"""

from __future__ import annotations

import math

import torch

from ...errors import LmembedError
from ..formats.base import CompressedEmbedding
from ..formats.mixed import MixedSuperBlockEmbedding, map_bits
from ..formats.superblock import BITS_RANGE, SuperBlockEmbedding, row_bytes
from ..registry import Arg, bool_flag, group_size, non_negative_int, positive_float, register
from .calibrated import DAMP, FLOOR, MIX
from .mixed import Mixed, width_choices
from .superblock import gptq_superblock, quantize_superblock


@register
class KMixed(Mixed):
    needs_calib = True
    name = "kmixed"
    gguf_form = None  # rows of several kq widths: no one block type holds them
    superseded_by = ""  # first-class: mixed's successor
    summary = ("mixed-precision super-block rows (calibrated): AVG stored bits per value, each row a kqB width "
               "chosen by its calibrated cost")
    positional = (Arg("avg", positive_float, required=True, help="stored bits per matrix value, everything counted"),
                  Arg("group", group_size, 32, "gG: columns per 6-bit sub-scale and sub-min (default g32)"))
    options = (
        Arg("choices", width_choices, (2, 3, 4, 5, 6), "allowed widths (2..8), e.g. 3-4-6"),
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
