"""``mixed:AVG``: token-sensitivity mixed precision, more bits for the rows whose error costs most.

A tied model predicts and looks up a few thousand tokens almost all the time. Every row gets one of
a few integer widths so that the *stored* bits per value (codes, fp16 scales, the row map) average
AVG, choosing the widths that minimise Σ_v w_v · ΔE_v(b_v) M ΔE_v(b_v)ᵀ by a Lagrangian allocation
(allocation.py): optimal on the convex hull of each row's (bits, cost) curve. Every candidate width
is rounded GPTQ-style against M; rows are independent given M, so a row's codes do not depend on
which other rows share its width. Stored as formats/mixed.py's MixedQuantizedEmbedding.
"""

from __future__ import annotations

import math

import torch

from ...errors import LmembedError
from ..calibration.sensitivity import metric_for, need_calib
from ..formats.base import (
    CompressedEmbedding,
    concat_rows,
)
from ..formats.mixed import MixedQuantizedEmbedding
from ..formats.quantized import QuantizedEmbedding
from ..registry import Arg, FitContext, Method, check_ceiling, group_size, positive_float, register
from .allocation import allocate
from .calibrated import DAMP, FLOOR, MIX, gptq_rows
from .quantize import CLIP, FIT_ROWS, GRID


def width_choices(s: str) -> tuple[int, ...]:
    bits = tuple(sorted({int(b) for b in s.replace("/", "-").split("-") if b}))
    if not bits or any(not 1 <= b <= 8 for b in bits):
        raise ValueError("expected widths between 1 and 8 joined by '-', e.g. 3-4-8")
    return bits


width_choices.show = lambda v: "-".join(map(str, v))  # type: ignore[attr-defined]


def row_costs(weight: torch.Tensor, quantized: QuantizedEmbedding, row_weight: torch.Tensor,
              metric: torch.Tensor) -> torch.Tensor:
    """w_v · ΔE_v M ΔE_vᵀ for every row (float64), a chunk of rows at a time."""
    costs = []
    for s in range(0, weight.shape[0], FIT_ROWS):
        ids = torch.arange(s, min(s + FIT_ROWS, weight.shape[0]))
        diff = weight[ids].double() - quantized.lookup(ids).double()
        costs.append(((diff @ metric.double()) * diff).sum(1))
    return row_weight.double() * torch.cat(costs)


@register
class Mixed(Method):
    needs_calib = True
    name = "mixed"
    gguf_form = "codes"  # one QuantizedEmbedding per width (code_widths: the widths it may choose)
    superseded_by = "kmixed (encoders) and tc (models with an output layer) at every budget measured"
    summary = "mixed-precision rows (calibrated): AVG stored bits per value, widths chosen by token sensitivity"
    positional = (Arg("avg", positive_float, required=True, help="stored bits per matrix value, codes + scales + map"),
                  Arg("group", group_size, 32, "gG: columns per fp16 scale (default g32)"))
    options = (
        Arg("choices", width_choices, (2, 3, 4, 8), "allowed widths, e.g. 3-4-8"),
        MIX, DAMP, FLOOR, GRID, CLIP,
    )

    def makes(self, given: str) -> str:
        return "tunable"

    def code_widths(self) -> tuple[int, ...]:
        return tuple(self.choices)

    def check_args(self) -> None:
        if self.avg <= min(self.choices):
            raise LmembedError(f"method {self.text!r}: {self.avg} bits per value is below the narrowest width "
                               f"({min(self.choices)} bits, before its scales and the row map)")
        check_ceiling(self, self.avg, self.ceiling(), "for any matrix")

    def check(self, num_embeddings: int, dim: int) -> None:
        if self.group > dim:
            raise LmembedError(f"method {self.text!r}: group size {self.group} exceeds the embedding dimension {dim}")
        lo = self.narrowest(dim)
        if self.avg < lo:
            raise LmembedError(f"method {self.text!r}: {self.avg} bits per value is below the narrowest width "
                               f"({lo:.3f} with its scales and the row map)")
        check_ceiling(self, self.avg, self.widest(dim), f"for a {num_embeddings} x {dim} matrix")

    def widest(self, dim: int) -> float:
        """Stored bits per value of a row at the widest width, its scales and map entry included."""
        return float(self.row_bits(dim).max()) / dim

    def ceiling(self) -> float:
        """The most `widest` can be for any width d >= G (check refuses d < G): a row's codes round
        up to 8 bits, its fp16 scales to one more group, its map byte, each at most 16 / G bits."""
        return max(self.choices) + 48 / self.group

    def narrowest(self, dim: int) -> float:
        """Stored bits per value of a row at the narrowest width, its scales and map entry included."""
        return min(self.choices) + 16 / self.group + 8 / dim

    def candidate(self, rows: torch.Tensor, metric: torch.Tensor, bits: int) -> CompressedEmbedding:
        """Some rows at one width (rows are fitted independently of each other)."""
        return gptq_rows(rows, metric, bits, self.group, grid=self.grid, clip=self.clip)

    def row_bits(self, dim: int) -> torch.Tensor:
        """Stored bits of one row at each width: codes, fp16 scales, its byte of the row map."""
        groups = math.ceil(dim / self.group)
        return torch.tensor([math.ceil(dim * b / 8) * 8 + 16 * groups + 8 for b in self.choices], dtype=torch.float64)

    def budget(self, num_embeddings: int, dim: int) -> float:
        return self.avg * num_embeddings * dim

    def assemble(self, parts: list[CompressedEmbedding], row_class: torch.Tensor) -> CompressedEmbedding:
        return MixedQuantizedEmbedding(parts, row_class)

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        """Fit every width, then give each row the width that the Lagrangian allocation picks."""
        v, d = weight.shape
        self.check(v, d)
        calib = need_calib(self, ctx)
        metric = metric_for(self, ctx, d)
        rw = calib.row_weights(ctx.side, mix=self.mix, floor=self.floor)
        if len(rw) != v:
            raise LmembedError(f"method {self.text!r}: calibration has {len(rw)} tokens, the matrix {v} rows")
        w = weight.detach().float().cpu()
        # one chunk of rows at a time at every width: its costs kept, its codes dropped, so no
        # width's candidate is ever whole; then each row is fitted once more, at its own width
        costs = torch.zeros(v, len(self.choices), dtype=torch.float64)
        for s in range(0, v, FIT_ROWS):
            chunk = w[s : s + FIT_ROWS]
            for c, b in enumerate(self.choices):
                costs[s : s + FIT_ROWS, c] = row_costs(chunk, self.candidate(chunk, metric, b), rw[s : s + FIT_ROWS],
                                                      metric)
        cls = allocate(costs, self.row_bits(d), self.budget(v, d))
        parts, kept = [], []
        for c, b in enumerate(self.choices):
            rows = (cls == c).nonzero().flatten()
            if len(rows):
                parts.append(concat_rows([self.candidate(w[ids], metric, b) for ids in rows.split(FIT_ROWS)]))
                kept.append(c)
        remap = torch.full((len(self.choices),), 0, dtype=torch.long)
        remap[kept] = torch.arange(len(kept))
        ctx.log(f"{self.text}: rows per width {dict((self.choices[c], int((cls == c).sum())) for c in kept)}")
        return self.assemble(parts, remap[cls])
