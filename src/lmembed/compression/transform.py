"""`tc:AVG`: transform coding of an embedding matrix against the model's own sensitivity.

An error ΔE_v in row v costs the model about w_v · ΔE_v M ΔE_vᵀ (calibrated.py), where M adds the
two roles of a tied matrix: H = E[h hᵀ] of the hidden states the head sees (output role) and
G = E[g gᵀ] of the loss gradients at the input embeddings (input role, the Fisher information,
calibrate.py); tied, M = H + a·G (a = `input`, INPUT_WEIGHT). On SmolLM2-135M M's eigenvalues
span four orders of magnitude, and one direction holds half of H's energy. Rounding every
coordinate with the same number of bits wastes most of them; classic transform coding does not
(the Karhunen-Loève basis of the whitened rows was tried instead of M's eigenbasis: worse, +12.1 %
against +10.3 % at 3 bits):

1. rotate the rows into M's eigenbasis, order the coordinates by importance λ_k · s_k (eigenvalue
   times the row-weighted energy of the coordinate) and divide each by its RMS;
2. cut the coordinates into bands, narrow where importance is high (4, 8, 16, ... columns);
3. give every (row, band) a width in WIDTHS, 0 bits included, by one Lagrangian allocation over
   all of them (allocation.allocate) against the exact stored bits: the frequent rows' leading bands
   get 8 bits, the tail's last bands 1 or 0;
4. each (row, band) is a symmetric mid-rise uniform code with one 8-bit log-scale, its scale
   searched for the lowest weighted error.

Stored (everything ``stored_bytes`` counts): the d x d decoder (the inverse rotation with the
RMS folded in) as int8 with an fp16 scale per row; per band a packed 3-bit width map (V entries)
and, per width in use, the rows' packed codes and their scale bytes. A row of band j at width
B > 0 costs ceil(n_j·B/8) + 1 bytes. Lookups decode a row's bands and rotate back (z @ R); the
head rotates the hidden state once (h @ Rᵀ) and multiplies band by band.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import LmembedError
from . import kernels
from .allocation import allocate
from .calibrated import FLOOR, INPUT, need_calib, sensitivity
from .mixed import LOGIT_POSITIONS
from .modules import (
    FIT_ROWS,
    CompressedEmbedding,
    IndexedEmbedding,
    PackedRows,
    index_map,
    map_classes,
    map_slots,
    pack_bits,
    register_module,
    unpack_bits,
)
from .registry import Arg, FitContext, Method, check_ceiling, positive_float, positive_int, register

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


def quantize_band(x: torch.Tensor, bits: int, weight: torch.Tensor, search: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale codes, weighted squared error) of rows x (n x m) at `bits`: the scale (on the
    log grid) with the lowest Σ weight·err² among `search` fractions of the row's range."""
    half = 2 ** (bits - 1)
    amax = x.abs().amax(1).clamp_min(1e-30)
    best_q = best_c = best_e = None
    for t in torch.linspace(0.3, 1.0, search).tolist():
        code = (torch.log2(amax * t / half) * SCALE_STEPS + SCALE_ZERO).round().clamp(0, 255).to(torch.uint8)
        q = (torch.floor(x / scale_of(code)[:, None]) + half).clamp(0, 2 * half - 1).to(torch.int32)
        err = ((x - dequantize(q, code, bits)) ** 2 * weight).sum(1)
        if best_e is None:
            best_q, best_c, best_e = q, code, err
            continue
        better = err < best_e
        best_q[better], best_c[better], best_e[better] = q[better], code[better], err[better]
    return best_q, best_c, best_e


def _item_bits(size: int) -> torch.Tensor:
    """Stored bits of one (row, band) at each width: the packed codes and the scale byte."""
    return torch.tensor([8 * (math.ceil(size * b / 8) + 1) if b else 0 for b in WIDTHS], dtype=torch.float64)


def widest(num_embeddings: int, dim: int) -> float:
    """Stored bits per value with every (row, band) at the widest width, everything counted."""
    sizes = band_sizes(dim)
    per_row = sum(float(_item_bits(s).max()) for s in sizes)
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


def _basis(weight: torch.Tensor, m: torch.Tensor, rw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(encoder d x d, int8 decoder, its fp16 row scales): coordinates in M's eigenbasis ordered by
    λ_k·s_k and scaled to unit weighted RMS; the encoder inverts the *stored* decoder exactly."""
    lam, u = torch.linalg.eigh(m)
    lam = lam.clamp_min(0)
    energy = torch.zeros(len(lam), dtype=torch.float64)
    for s in range(0, weight.shape[0], FIT_ROWS):
        f = weight[s : s + FIT_ROWS].double() @ u
        energy += (rw[s : s + FIT_ROWS, None] * f**2).sum(0)
    energy = (energy / rw.sum()).clamp_min(1e-30)
    order = torch.argsort(lam * energy, descending=True)
    rot = energy[order].sqrt()[:, None] * u[:, order].t()  # row k: c_k u_kᵀ
    scales = (rot.abs().amax(1) / 127).clamp_min(1e-8).half()
    codes = (rot / scales.double()[:, None]).round().clamp(-127, 127).to(torch.int8)
    stored = codes.double() * scales.double()[:, None]
    return torch.linalg.inv(stored), codes, scales


@register
class TransformCoding(Method):
    needs_calib = True
    name = "tc"
    summary = ("transform coding (calibrated): rows rotated into the model's sensitivity eigenbasis, bits per "
               "(row, band) by one allocation; AVG stored bits per value, everything counted")
    positional = (Arg("avg", positive_float, required=True, help="stored bits per matrix value, everything counted"),)
    options = (Arg("search", positive_int, 12, "candidate scales tried per (row, band)"),
               INPUT,
               FLOOR)

    def check_args(self) -> None:
        check_ceiling(self, self.avg, CEILING, "for any matrix of d >= 16 columns and V >= d rows")

    def check(self, num_embeddings: int, dim: int) -> None:
        lo = fixed_bits(num_embeddings, dim, band_sizes(dim)) / (num_embeddings * dim)
        if self.avg <= lo:
            raise LmembedError(f"method {self.text!r}: {self.avg} bits per value does not cover the decoder and width "
                               f"maps of a {num_embeddings} x {dim} matrix ({lo:.3f} bits per value)")
        check_ceiling(self, self.avg, widest(num_embeddings, dim), f"for a {num_embeddings} x {dim} matrix")

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        v, d = weight.shape
        self.check(v, d)
        calib = need_calib(self, ctx)
        if calib.dim != d or len(calib.in_freq) != v:
            raise LmembedError(f"method {self.text!r}: calibration statistics are for a {len(calib.in_freq)} x "
                               f"{calib.dim} matrix, the matrix is {v} x {d} (calibrate the same model)")
        w = weight.detach().cpu()
        rw = calib.row_weights(ctx.side, mix=1.0, floor=self.floor).double()
        m = sensitivity(calib, ctx.side, self.input)
        m = m + 1e-9 * torch.diagonal(m).mean() * torch.eye(d, dtype=m.dtype)
        enc, dec, dec_scales = _basis(w, m, rw)
        sizes = band_sizes(d)
        # the cost of a coordinate in the rotated space: λ_k · c_k² = (R M Rᵀ)_kk (R M Rᵀ is diagonal up to int8)
        r = dec.double() * dec_scales.double()[:, None]
        col_w = torch.diagonal(r @ m @ r.t()).float()
        costs = self._costs(w, enc, col_w, rw, sizes)
        bits = torch.cat([_item_bits(s).expand(v, -1) for s in sizes])
        budget = self.avg * v * d - fixed_bits(v, d, sizes)
        cls = allocate(costs, bits, budget).view(len(sizes), v)
        module = self._assemble(w, enc, col_w, sizes, cls, dec, dec_scales)
        widths = torch.tensor(WIDTHS, dtype=torch.float64)[cls.long()].mean(1)  # mean code width per band
        ctx.log(f"{self.text}: mean code bits per band of {', '.join(map(str, sizes))} columns: "
                + ", ".join(f"{b:.1f}" for b in widths.tolist()))
        return module

    def _chunks(self, w: torch.Tensor, enc: torch.Tensor, sizes: list[int]):
        """(first row, [band blocks]) of the rotated, scaled rows, FIT_ROWS rows at a time."""
        for s in range(0, w.shape[0], FIT_ROWS):
            z = (w[s : s + FIT_ROWS].double() @ enc).float()
            yield s, z.split(sizes, dim=1)

    def _costs(self, w: torch.Tensor, enc: torch.Tensor, col_w: torch.Tensor, rw: torch.Tensor,
               sizes: list[int]) -> torch.Tensor:
        """(bands·V) x widths: w_v · Σ_k weight_k · err² of each (row, band) at each width."""
        v = w.shape[0]
        costs = torch.zeros(len(sizes), v, len(WIDTHS), dtype=torch.float64)
        cw = col_w.split(sizes)
        for s, blocks in self._chunks(w, enc, sizes):
            for j, x in enumerate(blocks):
                costs[j, s : s + len(x), 0] = (x**2 * cw[j]).sum(1).double()
                for c, b in enumerate(WIDTHS[1:], 1):
                    costs[j, s : s + len(x), c] = quantize_band(x, b, cw[j], self.search)[2].double()
        return (costs * rw[None, :, None]).reshape(-1, len(WIDTHS))

    def _assemble(self, w: torch.Tensor, enc: torch.Tensor, col_w: torch.Tensor, sizes: list[int],
                  cls: torch.Tensor, dec: torch.Tensor, dec_scales: torch.Tensor) -> TransformCodedEmbedding:
        """Each (row, band) coded once more at its own width (the same deterministic fit)."""
        v, d = w.shape
        codes: dict[tuple[int, int], list[torch.Tensor]] = {}
        scales: dict[tuple[int, int], list[torch.Tensor]] = {}
        cw = col_w.split(sizes)
        for s, blocks in self._chunks(w, enc, sizes):
            for j, x in enumerate(blocks):
                cj = cls[j, s : s + len(x)]
                for c, b in enumerate(WIDTHS[1:], 1):
                    sel = (cj == c).nonzero().flatten()
                    if len(sel):
                        q, code, _ = quantize_band(x[sel], b, cw[j], self.search)
                        codes.setdefault((j, c), []).append(pack_bits(q, b))
                        scales.setdefault((j, c), []).append(code)
        counts = [torch.bincount(cls[j], minlength=len(WIDTHS)).tolist() for j in range(len(sizes))]
        module = TransformCodedEmbedding(v, d, sizes, counts)
        state = {"decoder": dec, "decoder_scales": dec_scales}
        for j in range(len(sizes)):
            state[f"map{j}"] = pack_bits(cls[j].to(torch.int32).view(1, -1), MAP_BITS)
        for (j, c), parts in codes.items():
            state[f"codes{j}_{WIDTHS[c]}"] = torch.cat(parts)
            state[f"scales{j}_{WIDTHS[c]}"] = torch.cat(scales[(j, c)])
        module.load_state_dict(state)
        return module
