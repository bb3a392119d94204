"""Fitting super-block codes: the ``kqB[:gG]`` method and its GPTQ variant.

Per group, a grid search over candidate scales (codes rounded for each, then scale and min refit by
least squares with the offset held <= 0), a few rounds of re-rounding and refitting; per row, the
fp16 super-scale and super-min, sub-parameters rounded against them, then a least-squares refit of
the super-parameters with codes re-rounded against the *stored* values (a row only changes when its
error drops). All of it vectorised over FIT_ROWS rows at a time. ``gptq_superblock`` rounds the
codes column by column against a calibrated metric instead, pushing each rounding error onto the
columns not yet rounded. The stored layout is formats/superblock.py.
"""

from __future__ import annotations

import math

import torch

from ...errors import LmembedError
from ..formats.base import CompressedEmbedding
from ..formats.bits import pack_bits
from ..formats.superblock import BITS_RANGE, SUB_BITS, SUB_MAX, SuperBlockEmbedding
from ..registry import Arg, FitContext, group_size, non_negative_int
from .gptq import gptq_columns
from .quantize import RowQuantizer, check_group, width_variant

FP16_MAX = float(torch.finfo(torch.float16).max)


FIT_ROWS = 2048  # rows fitted at a time: bounds the temporaries to a few chunk x d float tensors


# --- fitting -------------------------------------------------------------------------------------
def _inv(s: torch.Tensor) -> torch.Tensor:
    """1/s where s > 0, else 0 (a zero scale codes everything as 0)."""
    return torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)


def _codes(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor, nmax: int) -> torch.Tensor:
    """Nearest codes of x for x ~ s*q - m (s, m broadcast over the last dim)."""
    return ((x + m) * _inv(s)).round_().clamp_(0, nmax)


def _sq_err(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Squared error of s*q - m against x, summed over the last dim (keepdim)."""
    e = q * s
    e -= m
    e -= x
    return e.square_().sum(-1, keepdim=True)


def _lsq_group(x: torch.Tensor, q: torch.Tensor, sx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (last dim): argmin over s >= 0, m >= 0 of sum (s*q - m - x)^2 given the codes q."""
    n = x.shape[-1]
    sq = q.sum(-1, keepdim=True).double()
    sqq = (q * q).sum(-1, keepdim=True).double()
    sqx = (q * x).sum(-1, keepdim=True).double()
    sxd = sx.double()
    det = n * sqq - sq * sq  # 0 only when every code of the group is the same
    ok = det > 0
    safe = torch.where(ok, det, 1.0)
    s = torch.where(ok, (n * sqx - sq * sxd) / safe, 0.0)
    off = torch.where(ok, (sqq * sxd - sq * sqx) / safe, sxd / n)  # x ~ s*q + off
    # the offset must be <= 0 (it is stored as a non-negative sub-min): else fit the scale alone
    pos = off > 0
    s = torch.where(pos, sqx / sqq.clamp_min(1e-300), s).clamp_min(0)
    off = off.clamp_max(0)
    return s.float(), (-off).float()


def _candidates(search: int) -> list[float]:
    if search <= 0:
        return []
    if search == 1:
        return [0.0]
    return [-1.0 + 2.0 * i / (search - 1) for i in range(search)]


def fit_groups(x: torch.Tensor, bits: int, search: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., g) -> per-group (s, m) (..., 1), unrounded, for x ~ s*q - m with m >= 0."""
    nmax = (1 << bits) - 1
    lo = x.amin(-1, keepdim=True).clamp_max(0)
    rng = x.amax(-1, keepdim=True) - lo
    sx = x.sum(-1, keepdim=True)
    best_s, best_m = rng / nmax, -lo
    best_e = _sq_err(x, _codes(x, best_s, best_m, nmax), best_s, best_m)
    xs = x - lo
    inv_rng = _inv(rng)

    def keep(s: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> None:
        nonlocal best_s, best_m, best_e
        better = e < best_e
        best_s, best_m, best_e = (torch.where(better, s, best_s), torch.where(better, m, best_m),
                                  torch.where(better, e, best_e))

    for t in _candidates(search):
        q = (xs * ((nmax + t) * inv_rng)).round_().clamp_(0, nmax)
        s, m = _lsq_group(x, q, sx)
        keep(s, m, _sq_err(x, q, s, m))
    for _ in range(iters):
        q = _codes(x, best_s, best_m, nmax)
        s, m = _lsq_group(x, q, sx)
        keep(s, m, _sq_err(x, q, s, m))
    return best_s, best_m


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (kept as float32), clamped to [0, fp16 max]."""
    return t.clamp(0, FP16_MAX).half().float()


def _sub(p: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
    """Sub-parameters: p / super rounded to [0, 63] (0 where the super-parameter is 0)."""
    return (p * _inv(sup)).round_().clamp_(0, SUB_MAX)


def fit_superblock_rows(x: torch.Tensor, bits: int, group: int, search: int = 21, iters: int = 4,
                        refit: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise rows x (R x d): (codes R x d uint8, sub-scales R x G, sub-mins R x G (uint8),
    super R x 2 fp16 [scale, min])."""
    r, d = x.shape
    nmax = (1 << bits) - 1
    groups = math.ceil(d / group)
    pad = groups * group - d
    if pad:  # the short last group is fitted as if padded with the row's last value
        x = torch.cat([x, x[:, -1:].expand(r, pad)], 1)
    x = x.reshape(r, groups, group)
    s, m = fit_groups(x, bits, search, iters)
    s, m = s.squeeze(-1), m.squeeze(-1)  # R x G, both >= 0
    sx = x.sum(-1)

    def state_err(ds: torch.Tensor, dm: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        sg, mg = (ds * a).unsqueeze(-1), (dm * b).unsqueeze(-1)
        q = _codes(x, sg, mg, nmax)
        return q, _sq_err(x, q, sg, mg).sum(1)  # R x 1

    ds = _fp16(s.amax(1, keepdim=True) / SUB_MAX)
    dm = _fp16(m.amax(1, keepdim=True) / SUB_MAX)
    a, b = _sub(s, ds), _sub(m, dm)
    q, err = state_err(ds, dm, a, b)
    for _ in range(refit):
        # per row: x ~ ds * (a_g q) - dm * b_g, least squares in (ds, dm) given the codes
        aq = a.unsqueeze(-1) * q
        saa = aq.square().sum((1, 2)).double()
        sab = (aq.sum(-1) * b).sum(1).double()
        sbb = (b.square() * group).sum(1).double()
        sax = (aq * x).sum((1, 2)).double()
        sbx = (b * sx).sum(1).double()
        det = saa * sbb - sab * sab
        ok = det > 1e-12 * saa * sbb
        safe = torch.where(ok, det, 1.0)
        dm_old = dm.squeeze(1).double()
        new_ds = torch.where(ok, (sbb * sax - sab * sbx) / safe, (sax + dm_old * sab) / saa.clamp_min(1e-300))
        new_dm = torch.where(ok, (sab * sax - saa * sbx) / safe, dm_old)
        new_ds, new_dm = _fp16(new_ds.float().unsqueeze(1)), _fp16(new_dm.float().unsqueeze(1))
        # sub-parameters: kept, re-rounded from the group fits, or from a refit of the groups to the
        # current codes (each candidate state is kept only for the rows whose error it lowers)
        gs, gm = _lsq_group(x, q, sx.unsqueeze(-1))
        for na, nb in ((a, b), (_sub(s, new_ds), _sub(m, new_dm)),
                       (_sub(gs.squeeze(-1), new_ds), _sub(gm.squeeze(-1), new_dm))):
            nq, nerr = state_err(new_ds, new_dm, na, nb)
            better = nerr < err
            ds, dm = torch.where(better, new_ds, ds), torch.where(better, new_dm, dm)
            a, b = torch.where(better, na, a), torch.where(better, nb, b)
            q, err = torch.where(better.unsqueeze(-1), nq, q), torch.where(better, nerr, err)
    codes = q.reshape(r, groups * group)[:, :d].to(torch.uint8)
    return codes, a.to(torch.uint8), b.to(torch.uint8), torch.cat([ds, dm], 1).half()


def quantize_superblock(weight: torch.Tensor, bits: int, group: int, search: int = 21, iters: int = 4,
                        refit: int = 4, chunk: int = FIT_ROWS) -> SuperBlockEmbedding:
    """Super-block quantisation of a V x d matrix, `chunk` rows at a time."""
    if not BITS_RANGE[0] <= bits <= BITS_RANGE[1]:
        raise LmembedError(f"super-block quantisation: {bits} bits per code is out of range "
                           f"({BITS_RANGE[0]}..{BITS_RANGE[1]})")
    v, d = weight.shape
    if not 1 <= group <= d:
        raise LmembedError(f"super-block quantisation: group size {group} must be between 1 and the "
                           f"embedding dimension {d}")
    w = weight.detach().cpu()
    if not torch.isfinite(w).all():
        raise LmembedError("super-block quantisation: the matrix holds NaN or infinite values")
    codes, subs, supers = [], [], []
    for rows in w.split(chunk):
        q, a, b, sup = fit_superblock_rows(rows.float(), bits, group, search, iters, refit)
        codes.append(pack_bits(q, bits))
        subs.append(pack_bits(torch.cat([a, b], 1), SUB_BITS))
        supers.append(sup)
    return SuperBlockEmbedding(torch.cat(codes), torch.cat(subs), torch.cat(supers), bits=bits, group_size=group,
                               embedding_dim=d)


def gptq_superblock(weight: torch.Tensor, metric: torch.Tensor, bits: int, group: int, search: int = 21,
                    iters: int = 4, refit: int = 4, block: int = 128, chunk: int = FIT_ROWS,
                    act_order: bool = True) -> SuperBlockEmbedding:
    """Super-block layout with calibrated rounding: each row's sub-scales, sub-mins and super-parameters
    come from the kq fit of the original row, then its codes are rounded one column at a time with the
    rounding error pushed onto the columns not yet rounded, weighted by the column metric (d x d,
    damped), as GPTQ does. `act_order`: columns in decreasing order of the metric's diagonal, so the
    few columns that the metric weighs most (outlier dimensions of the hidden states) are rounded
    first and the rest absorb their error."""
    v, d = weight.shape
    if metric.shape != (d, d):
        raise LmembedError(f"super-block GPTQ: metric {tuple(metric.shape)} does not fit d = {d}")
    order = torch.argsort(torch.diagonal(metric), descending=True, stable=True) if act_order else torch.arange(d)
    m_perm = metric.double()[order][:, order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(m_perm)), upper=True).float()
    base = quantize_superblock(weight, bits, group, search, iters, refit, chunk)
    codes = []
    for s0 in range(0, v, chunk):
        e = slice(s0, s0 + chunk)
        s, m = base._group_params(base.subs[e], base.supers[e])
        gi = order // group  # the group of each column, in rounding order
        q = _gptq_codes(weight[e].detach().float().cpu()[:, order], s[:, gi], m[:, gi], u, bits, block)
        codes.append(pack_bits(q[:, torch.argsort(order)], bits))
    return SuperBlockEmbedding(torch.cat(codes), base.subs, base.supers, bits=bits, group_size=group, embedding_dim=d)


def _gptq_codes(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor, u: torch.Tensor, bits: int,
                block: int) -> torch.Tensor:
    """Codes (rows x d) of x ~ s*q - m (s, m: rows x d, each column's group parameters) rounded
    column by column with error feedback through u, the upper Cholesky factor of the metric's
    inverse; blocks of columns are updated lazily."""
    r, d = w.shape
    nmax = (1 << bits) - 1
    inv = _inv(s)
    q = torch.zeros(r, d, dtype=torch.uint8)

    def round_column(c: int, w1: torch.Tensor, j: int) -> torch.Tensor:
        code = ((w1[:, j] + m[:, c]) * inv[:, c]).round_().clamp_(0, nmax)
        q[:, c] = code.to(torch.uint8)
        return s[:, c] * code - m[:, c]

    gptq_columns(w.clone(), u, block, round_column)
    return q


# --- methods -------------------------------------------------------------------------------------
class SuperBlockQuant(RowQuantizer):
    """`kqB[:gG][:search=N][:iters=N][:refit=N]`: B-bit asymmetric codes in groups of G columns, each
    group's scale and min as 6-bit multiples of its row's fp16 super-scale and super-min.
    Calibration-free and deterministic."""

    bits = 4
    gguf_form = "superblock"
    positional = (Arg("group", group_size, 32, "gG: columns per group (default g32)"),)
    options = (
        Arg("search", non_negative_int, 21, "candidate scales tried per group (0: the group's min and max only)"),
        Arg("iters", non_negative_int, 4, "rounds of re-rounding the codes and refitting a group's scale and min"),
        Arg("refit", non_negative_int, 4, "rounds of refitting each row's fp16 super-scale and super-min"),
    )

    def makes(self, given: str) -> str:
        return "final"

    def check(self, num_embeddings: int, dim: int) -> None:
        if not BITS_RANGE[0] <= self.bits <= BITS_RANGE[1]:
            raise LmembedError(f"method {self.text!r}: {self.bits} bits per code is out of range "
                               f"({BITS_RANGE[0]}..{BITS_RANGE[1]})")
        check_group(self, self.group, dim)

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        self.check(*weight.shape)
        return quantize_superblock(weight, self.bits, self.group, self.search, self.iters, self.refit)


KQ2, KQ3, KQ4, KQ5, KQ6, KQ7, KQ8 = (
    width_variant(SuperBlockQuant, f"KQ{b}", f"kq{b}", b,
                  f"super-block {b}-bit asymmetric codes per group of G columns (default g32), 6-bit sub-scales and "
                  f"sub-mins, fp16 super-scale and super-min per row: {b} + 12/G + 32/d bits per value")
    for b in range(2, 9))
KQ7.superseded_by = "kq6 and kq8 (no bench reports kq7 on top at any budget)"
