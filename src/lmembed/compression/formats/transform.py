"""The ``tc`` format: rows coded band by band in a rotated basis, with a width per (row, band).

The fit (methods/transform.py) rotates the rows into the calibrated metric's eigenbasis, cuts the
coordinates into bands (4, 8, 16, ... columns, band_sizes) and gives every (row, band) a width in
WIDTHS, 0 bits included. Stored (everything ``stored_bytes`` counts): the d x d decoder (the inverse
rotation with the RMS folded in) as int8 with an fp16 scale per row; per band a packed 3-bit width
map (V entries) and, per width in use, the rows' packed codes and their one-byte log-scales. A row
of band j at width B > 0 costs ceil(n_j·B/8) + 1 bytes. Lookups decode a row's bands and rotate
back (z @ R); the head rotates the hidden state once (h @ Rᵀ) and multiplies band by band, in place
on the packed codes (kernels/) or a chunk of rows at a time in PyTorch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import kernels
from .base import IndexedEmbedding, PackedRows, index_map, map_classes, map_slots, register_module
from .bits import unpack_bits
from .mixed import LOGIT_POSITIONS

WIDTHS = (0, 1, 2, 3, 4, 5, 6, 8)  # bits per code a (row, band) may get
MAP_BITS = 3  # one width class per (row, band)
SCALE_STEPS = 16  # scale codes per octave: a scale is 2 ** ((code - SCALE_ZERO) / SCALE_STEPS)
SCALE_ZERO = 128
FIRST_BAND = 4  # columns of the most important band; each next band is twice as wide
DECODE_ROWS = 8192  # rows decoded at once by the head's PyTorch path
MAX_BANDS = 32


def band_sizes(dim: int) -> list[int]:
    """4, 8, 16, ... columns while twice the next band still fits, then the rest in one or two bands."""
    sizes, rest, size = [], dim, FIRST_BAND
    while rest > 2 * size:
        sizes.append(size)
        rest, size = rest - size, size * 2
    if sizes and rest > 1.5 * sizes[-1]:
        sizes.append(rest // 2)
        rest -= rest // 2
    return [*sizes, rest]


# every scale a scale byte can name: one table, so the fit, the PyTorch path and the C kernel agree bit for bit
SCALES = torch.exp2((torch.arange(256, dtype=torch.float32) - SCALE_ZERO) / SCALE_STEPS)


def scale_of(code: torch.Tensor) -> torch.Tensor:
    return SCALES.to(code.device)[code.long()]


def dequantize(q: torch.Tensor, code: torch.Tensor, bits: int) -> torch.Tensor:
    """Mid-rise levels (q + 1/2 - 2^(B-1)) times the row's scale."""
    return (q.float() + 0.5 - 2 ** (bits - 1)) * scale_of(code)[:, None]


def item_bits(size: int) -> torch.Tensor:
    """Stored bits of one (row, band) at each width: the packed codes and the scale byte."""
    return torch.tensor([8 * (math.ceil(size * b / 8) + 1) if b else 0 for b in WIDTHS], dtype=torch.float64)


def widest(num_embeddings: int, dim: int) -> float:
    """Stored bits per value with every (row, band) at the widest width, everything counted."""
    sizes = band_sizes(dim)
    per_row = sum(float(item_bits(s).max()) for s in sizes)
    return (num_embeddings * per_row + fixed_bits(num_embeddings, dim, sizes)) / (num_embeddings * dim)


# The most `widest` reaches for a matrix of d >= 16 columns and V >= d rows (19.06 bits per value,
# at 16 x 16; test_trust_methods checks every d up to 4096): a budget above it is refused when the
# method is parsed, before any model loads; check() then bounds it exactly for the V x d at hand.
CEILING = 19.1


def fixed_bits(num_embeddings: int, dim: int, sizes: list[int]) -> int:
    """Bits stored whatever the allocation: the int8 decoder with its fp16 row scales and the maps."""
    return 8 * (dim * dim + 2 * dim + len(sizes) * math.ceil(num_embeddings * MAP_BITS / 8))


@register_module
class TransformCodedEmbedding(IndexedEmbedding, PackedRows):
    """E ~ Z R: Z's bands stored at per-(row, band) widths, R = the int8 decoder (see module doc)."""

    kind = "tc"
    FORMAT_VERSION = 1  # formats/base.py: bump when its stored form changes

    def __init__(self, num_embeddings: int, embedding_dim: int, sizes: list[int], counts: list[list[int]], *,
                 scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim, scale=scale)
        self.sizes, self.counts = [int(s) for s in sizes], [[int(n) for n in c] for c in counts]
        self.register_buffer("decoder", torch.zeros(embedding_dim, embedding_dim, dtype=torch.int8))
        self.register_buffer("decoder_scales", torch.zeros(embedding_dim, dtype=torch.float16))
        for j, size in enumerate(self.sizes):
            self.register_buffer(f"map{j}", torch.zeros(1, math.ceil(num_embeddings * MAP_BITS / 8), dtype=torch.uint8))
            for c, b in enumerate(WIDTHS):
                if b and self.counts[j][c]:
                    n = self.counts[j][c]
                    self.register_buffer(f"codes{j}_{b}", torch.zeros(n, math.ceil(size * b / 8), dtype=torch.uint8))
                    self.register_buffer(f"scales{j}_{b}", torch.zeros(n, dtype=torch.uint8))
        self._index(strict=False)  # an empty module: its map arrives with load_state_dict

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> TransformCodedEmbedding:
        v, d, sizes, counts = spec["num_embeddings"], spec["embedding_dim"], spec["sizes"], spec["counts"]
        ok = (isinstance(sizes, list) and 1 <= len(sizes) <= MAX_BANDS and isinstance(counts, list)
              and len(counts) == len(sizes) and all(type(s) is int and s > 0 for s in sizes) and sum(sizes) == d
              and all(isinstance(c, list) and len(c) == len(WIDTHS) and all(type(n) is int and n >= 0 for n in c)
                      and sum(c) == v for c in counts))
        if not ok:
            raise ValueError("sizes must be positive band widths summing to embedding_dim, counts one list of "
                             f"{len(WIDTHS)} row counts per band summing to num_embeddings")
        return cls(v, d, sizes, counts, scale=spec["scale"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "sizes": self.sizes, "counts": self.counts, "widths": list(WIDTHS)}

    # -- derived (not stored) ---------------------------------------------------------------------
    def _index(self, strict: bool = True) -> None:
        """Per band, the width map's class-count table (4 bytes per width per 64 rows), once the map is
        checked against the row counts the codes were sized by (strict)."""
        if self.map0.is_meta:
            return
        self._counts = []
        for j in range(len(self.sizes)):
            expected = self.counts[j] if strict else self.classes(j).bincount(minlength=len(WIDTHS)).tolist()
            self._counts.append(index_map(getattr(self, f"map{j}"), MAP_BITS, self.num_embeddings, expected,
                                          f"tc module: the width map of band {j}"))

    def classes(self, j: int) -> torch.Tensor:
        """Every row's width class in band j (unpacked from the stored map when asked: not kept)."""
        m = getattr(self, f"map{j}")
        return map_classes(m, MAP_BITS, torch.arange(self.num_embeddings, device=m.device))

    @property
    def _cls(self) -> list[torch.Tensor]:
        return [self.classes(j) for j in range(len(self.sizes))]

    def rotation(self) -> torch.Tensor:
        return self.decoder.float() * self.decoder_scales.float()[:, None]

    def _band(self, j: int, c: int, slots: torch.Tensor) -> torch.Tensor:
        b = WIDTHS[c]
        q = unpack_bits(getattr(self, f"codes{j}_{b}")[slots], b, self.sizes[j])
        return dequantize(q, getattr(self, f"scales{j}_{b}")[slots], b)

    def layout(self) -> kernels.Layout:
        """Band j is columns start_j .. start_j + n_j - 1 of the rotated rows; its map gives each row a
        width, and a row of width B > 0 is (q + 1/2 - 2^(B-1)) * SCALES[its scale byte]."""
        cols, start = [], 0
        for j, size in enumerate(self.sizes):
            formats = [kernels.Codes("sym", rows=n, bits=b, group=size, codes=getattr(self, f"codes{j}_{b}"),
                                     scales=getattr(self, f"scales{j}_{b}"), lut=SCALES, shift=0.5 - 2 ** (b - 1))
                       if b and n else kernels.ZERO for b, n in zip(WIDTHS, self.counts[j], strict=True)]
            cols.append(kernels.Columns(start, size, formats, getattr(self, f"map{j}").reshape(-1), MAP_BITS,
                                        self._counts[j]))
            start += size
        return kernels.Layout(self.num_embeddings, self.embedding_dim, cols)

    # -- the two roles ----------------------------------------------------------------------------
    def to_head_space(self, h: torch.Tensor) -> torch.Tensor:
        """h @ Rᵀ: the kernel's, read from the int8 decoder, for a decoding step's few rows."""
        if len(h) <= kernels.ROTATE_MAX_ROWS:
            return kernels.rotate(h, self.decoder, self.decoder_scales, transpose=True)
        return h.float() @ self.rotation().t()

    def from_row_space(self, rows: torch.Tensor) -> torch.Tensor:
        if len(rows) <= kernels.ROTATE_MAX_ROWS:
            return kernels.rotate(rows, self.decoder, self.decoder_scales, transpose=False)
        return rows @ self.rotation()

    def lookup_torch(self, ids: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(len(ids), self.embedding_dim, device=ids.device)
        start = 0
        for j, size in enumerate(self.sizes):
            m = getattr(self, f"map{j}")
            cls = map_classes(m, MAP_BITS, ids)
            slot = map_slots(m, MAP_BITS, self._counts[j], ids, cls)
            for c in range(1, len(WIDTHS)):
                sel = (cls == c).nonzero().flatten()
                if len(sel):
                    z[sel, start : start + size] = self._band(j, c, slot[sel])
            start += size
        return z @ self.rotation().to(z.device)

    def logits_torch(self, h: torch.Tensor) -> torch.Tensor:
        hr = h.float() @ self.rotation().t()
        out = torch.zeros(len(h), self.num_embeddings, dtype=torch.float32, device=h.device)
        start = 0
        for j, size in enumerate(self.sizes):
            hj, cls = hr[:, start : start + size], self.classes(j)
            for c in (c for c in range(1, len(WIDTHS)) if self.counts[j][c]):
                rows = (cls == c).nonzero().flatten()  # slot i of the class is its i-th row
                for s0 in range(0, len(rows), DECODE_ROWS):
                    z = self._band(j, c, torch.arange(s0, min(s0 + DECODE_ROWS, len(rows)), device=h.device))
                    r = rows[s0 : s0 + DECODE_ROWS]
                    for s in range(0, len(h), LOGIT_POSITIONS):
                        out[s : s + LOGIT_POSITIONS].index_add_(1, r, hj[s : s + LOGIT_POSITIONS] @ z.t())
            start += size
        return out

