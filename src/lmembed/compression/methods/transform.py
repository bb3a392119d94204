"""``tc:AVG``: transform coding of an embedding matrix against the model's own sensitivity.

An error ΔE_v costs about w_v · ΔE_v M ΔE_vᵀ with M = H + a·G for a tied matrix (calibration/
sensitivity.py). M's eigenvalues span orders of magnitude, so rounding every coordinate with the
same bits wastes most of them; transform coding does not:

1. rotate the rows into M's eigenbasis, order the coordinates by importance (eigenvalue times the
   row-weighted energy) and divide each by its RMS;
2. cut the coordinates into bands, narrow where importance is high (4, 8, 16, ... columns);
3. give every (row, band) a width in WIDTHS (0 bits included) by one Lagrangian allocation against
   the exact stored bits (allocation.py);
4. code each (row, band) uniformly with one 8-bit log-scale searched for the lowest weighted error.

The stored layout and its in-place head are formats/transform.py.
"""

from __future__ import annotations

import torch

from ...errors import LmembedError
from ..calibration.sensitivity import need_calib, sensitivity
from ..formats.base import (
    CompressedEmbedding,
)
from ..formats.bits import pack_bits
from ..formats.transform import (
    CEILING,
    MAP_BITS,
    SCALE_STEPS,
    SCALE_ZERO,
    WIDTHS,
    TransformCodedEmbedding,
    band_sizes,
    dequantize,
    fixed_bits,
    item_bits,
    scale_of,
    widest,
)
from ..registry import Arg, FitContext, Method, check_ceiling, positive_float, positive_int, register
from .allocation import allocate
from .calibrated import FLOOR, INPUT
from .quantize import FIT_ROWS


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
        bits = torch.cat([item_bits(s).expand(v, -1) for s in sizes])
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
