"""Fitting a matrix into an integer block type: the scale (and min) of every block or sub-block
searched for the lowest error, K-quants' integer sub-scales fitted under their fp16 block scale,
codes rounded to nearest. The error is measured under an optional column metric M: each
sub-block's error is e M_kk eᵀ with M_kk its diagonal block of M (the identity: plain squared
error). calibrated_blocks builds on these fits with the full M (error feedback across blocks).

``encode_matrix`` writes a plain matrix in any block type: the gguf package's reference rounding
for the 32-value types (what llama-quantize does without an importance matrix), these fits for
the K-quants and IQ4_NL (the gguf package does not write them)."""

from __future__ import annotations

import numpy as np
import torch

from .blocks import BLOCK_TYPES, BlockType, Coded, check_type, fp16, gguf_package, pack

FIT_ROWS = 2048  # rows fitted at a time
SEARCH = 16  # candidate scales per (sub-)block
ROUNDS = 2  # re-rounding and least-squares refits after the search


def block_metrics(metric: torch.Tensor | None, n: int, sub: int) -> torch.Tensor | None:
    """The diagonal sub x sub blocks of the n x n metric: (n/sub, sub, sub) float32, or None."""
    if metric is None:
        return None
    k = n // sub
    m = metric.float().reshape(k, sub, k, sub)
    return m[torch.arange(k), :, torch.arange(k), :].contiguous()


def apply(mb: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """M_kk v_k for every sub-block k of v (rows x k x sub)."""
    return v if mb is None else torch.einsum("kst,rkt->rks", mb, v)


class SubStats:
    """Quadratic forms of one sub-block under its metric, for x ~ A*l + B (l the levels): the error
    of any (A, B) and the least-squares (A, B) come from a few sums."""

    def __init__(self, x: torch.Tensor, mb: torch.Tensor | None):
        self.x, self.mb = x, mb
        self.mx = apply(mb, x)
        self.xx = (x * self.mx).sum(-1)
        self.one = apply(mb, torch.ones_like(x[:1]))[0]  # M_kk 1: k x sub
        self.oo = self.one.sum(-1)  # 1ᵀ M_kk 1
        self.ox = (x * self.one).sum(-1)

    def of(self, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lᵀMl, lᵀM1, lᵀMx) per sub-block for these levels."""
        return (levels * apply(self.mb, levels)).sum(-1), (levels * self.one).sum(-1), (levels * self.mx).sum(-1)

    def error(self, forms: tuple, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ll, l1, lx = forms
        return self.xx - 2 * (a * lx + b * self.ox) + a * a * ll + 2 * a * b * l1 + b * b * self.oo

    def least_squares(self, forms: tuple, affine: bool, nonpositive_b: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) of lowest error for these levels (B = 0 unless `affine`; with
        `nonpositive_b`, B <= 0 as K-quants store mins)."""
        ll, l1, lx = (f.double() for f in forms)
        a_only = torch.where(ll > 0, lx / ll.clamp_min(1e-300), 0.0)
        if not affine:
            return a_only.float(), torch.zeros_like(forms[0])
        oo, ox = self.oo.double(), self.ox.double()
        det = ll * oo - l1 * l1
        ok = det > 1e-12 * ll * oo
        safe = torch.where(ok, det, 1.0)
        a = torch.where(ok, (oo * lx - l1 * ox) / safe, a_only)
        b = torch.where(ok, (ll * ox - l1 * lx) / safe, 0.0)
        if nonpositive_b:
            pos = b > 0
            a, b = torch.where(pos, a_only, a), torch.where(pos, 0.0, b)
        return a.float(), b.float()


def codes_of(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: BlockType) -> torch.Tensor:
    """Nearest codes of x ~ A*q + B (A, B per sub-block, broadcast), clamped to the type's range
    (float); a codebook type's nearest level to x / A (its B is 0)."""
    lo, hi = t.code_range
    safe = torch.where(a != 0, a, 1.0)
    if t.lut:
        return torch.where(a != 0, t.nearest(x / safe), float(t.zero))
    return torch.where(a != 0, ((x - b) / safe).round(), float(t.zero)).clamp(lo, hi)


def levels_of(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: BlockType) -> torch.Tensor:
    """The levels of codes_of: the numbers that multiply A."""
    return t.levels(codes_of(x, a, b, t))


def _candidates(x: torch.Tensor, t: BlockType) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Starting (A, B) per sub-block: symmetric types map the value of largest magnitude onto
    either end of the level range (the negative end as llama.cpp does, and the positive end), at
    a spread of steps; affine types spread the step over the sub-block's range."""
    lo, hi = t.code_range
    if not t.affine:
        lmin, lmax = t.level_span
        step = (lmax - lmin) / (hi - lo)  # 1 but for codebooks
        peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
        ends = [lmin + s * step for s in np.linspace(-0.5, 2.0, SEARCH // 2)]
        ends += [lmax + s * step for s in np.linspace(-1.5, 1.0, SEARCH - SEARCH // 2)]
        return [(peak / e, torch.zeros_like(peak)) for e in ends]
    low = x.amin(-1)
    if t.kbits:  # K-quants store the offset as -dmin*mn <= 0
        low = low.clamp_max(0)
    span = x.amax(-1) - low
    return [(span / (hi + s), low) for s in np.linspace(-1.0, 1.0, SEARCH)]


def fit_sub(x: torch.Tensor, t: BlockType, stats: SubStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Real (A, B) per sub-block of x (rows x k x sub): each candidate's codes, then the least-squares
    (A, B) for them; the lowest error wins, then ROUNDS of re-rounding and refitting."""
    best_a = best_b = best_e = None
    cands = _candidates(x, t)
    for i in range(len(cands) + ROUNDS):
        a0, b0 = cands[i] if i < len(cands) else (best_a, best_b)
        b0 = b0 if t.affine else -t.zero * a0  # symmetric: (A, B) are the step and 0 in level space
        forms = stats.of(levels_of(x, a0[..., None], b0[..., None], t))
        a, b = stats.least_squares(forms, t.affine, nonpositive_b=bool(t.kbits))
        if t.kbits and t.affine:
            a = a.clamp_min(0)
        e = stats.error(forms, a, b)
        if best_e is None:
            best_a, best_b, best_e = a, b, e
            continue
        better = e < best_e
        best_a, best_b, best_e = (torch.where(better, a, best_a), torch.where(better, b, best_b),
                                  torch.where(better, e, best_e))
    return best_a, best_b


def _super(v: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 256-value block (rows x blocks x subs of real sub-parameters): the fp16 block scale and
    the integer sub-parameters in [lo, hi] (signed ones map the largest magnitude onto `lo`)."""
    if lo < 0:
        peak = v.gather(-1, v.abs().argmax(-1, keepdim=True)).squeeze(-1)
        d = fp16(peak / lo)
    else:
        d = fp16(v.amax(-1) / hi)
    ints = torch.where(d[..., None] != 0, v / torch.where(d != 0, d, 1.0)[..., None], 0.0)
    return d, ints.round().clamp(lo, hi)


def _k_params(coded: Coded, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> Coded:
    """A K-quant state with block scales (d, m), integer sub-parameters rounded from the real (a, b)."""
    t = coded.t
    lo, hi = t.sub_range
    per = t.block // t.sub
    rows = a.shape[0]

    def ints(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = s.repeat_interleave(per, 1)
        return torch.where(s != 0, v / torch.where(s != 0, s, 1.0), 0.0).round().clamp(lo, hi).reshape(rows, -1)

    return Coded(t, coded.q, d, m, ints(a, d), ints(-b, m) if t.affine else None)


def _super_refit(c: Coded, stats: SubStats) -> Coded:
    """Least-squares (d, dmin) of each 256-value block for its codes and integer sub-parameters,
    under the sub-blocks' metric, rounded to fp16."""
    t = c.t
    rows, per = c.q.shape[0], t.block // t.sub
    lv = t.levels(c.q).reshape(rows, -1, t.sub)
    ll, l1, lx = stats.of(lv)
    sc = c.sc.float()
    mn = -c.mn.float() if t.affine else torch.zeros_like(sc)

    def per_block(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(rows, -1, per).sum(-1).double()

    k11, k12, k22 = per_block(sc * sc * ll), per_block(sc * mn * l1), per_block(mn * mn * stats.oo)
    r1, r2 = per_block(sc * lx), per_block(mn * stats.ox)
    d_only = torch.where(k11 > 0, r1 / k11.clamp_min(1e-300), 0.0)
    if not t.affine:
        return Coded(t, c.q, fp16(d_only), None, c.sc, None)
    det = k11 * k22 - k12 * k12
    ok = det > 1e-12 * k11 * k22
    safe = torch.where(ok, det, 1.0)
    d = torch.where(ok, (k22 * r1 - k12 * r2) / safe, d_only)
    m = torch.where(ok, (k11 * r2 - k12 * r1) / safe, c.m.double())
    return Coded(t, c.q, fp16(d), fp16(m), c.sc, c.mn)


def rtn_codes(x: torch.Tensor, c: Coded) -> Coded:
    """The same parameters with every code rounded to nearest."""
    a, b = (p.repeat_interleave(c.t.sub, 1) for p in c.scale_offset())
    return Coded(c.t, codes_of(x, a, b, c.t).to(torch.int16), c.d, c.m, c.sc, c.mn)


def sub_errors(x: torch.Tensor, c: Coded, stats: SubStats) -> torch.Tensor:
    """Each row's error summed over its sub-blocks (block-diagonal metric)."""
    a, b = c.scale_offset()
    forms = stats.of(c.t.levels(c.q).reshape(*a.shape, -1))
    return stats.error(forms, a, b).sum(-1)


def fit_rows(x: torch.Tensor, t: BlockType, metric: torch.Tensor | None = None) -> Coded:
    """Rows x (rows x n float) in integer block type t: searched (sub-)block parameters, rounded
    codes; K-quants then refit their block scales a few times, each kept where it lowers the error."""
    rows, n = x.shape
    x = x.float()
    mb = block_metrics(metric, n, t.sub)
    xs = x.reshape(rows, -1, t.sub)
    stats = SubStats(xs, mb)
    a, b = fit_sub(xs, t, stats)
    if not t.kbits:
        d = fp16(a)
        return rtn_codes(x, Coded(t, torch.zeros(rows, n, dtype=torch.int16), d, fp16(b) if t.affine else None))
    per = t.block // t.sub
    lo, hi = t.sub_range
    d, _ = _super(a.reshape(rows, -1, per), lo, hi)
    m = _super(-b.reshape(rows, -1, per), lo, hi)[0] if t.affine else None
    c = rtn_codes(x, _k_params(Coded(t, torch.zeros(rows, n, dtype=torch.int16), d), a, b, d, m))
    err = sub_errors(x, c, stats)
    for _ in range(ROUNDS):
        new = _super_refit(c, stats)
        for cand in (new, _k_params(new, a, b, new.d, new.m)):  # sub-parameters kept, or re-rounded
            cand = rtn_codes(x, cand)
            e = sub_errors(x, cand, stats)
            c, err = choose_rows(e < err, cand, c), torch.minimum(e, err)
    return c


def choose_rows(take: torch.Tensor, new: Coded, old: Coded) -> Coded:
    """Per row: `new` where `take`, else `old`."""
    def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None else torch.where(take[:, None], a, b)

    return Coded(new.t, pick(new.q, old.q), pick(new.d, old.d), pick(new.m, old.m), pick(new.sc, old.sc),
                 pick(new.mn, old.mn))


def encode_matrix(x: np.ndarray | torch.Tensor, type_name: str) -> np.ndarray:
    """A plain rows x n float matrix in block type `type_name` -> uint8 rows x bytes (the tensor's
    data as a GGUF file stores it)."""
    x = np.ascontiguousarray(x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x, np.float32)
    t = check_type(type_name, x.shape[1], "matrix")
    if t.name == "F32":
        data = x
    elif t.name == "F16":
        data = x.astype("<f2")
    elif t.kbits or t.lut:  # the gguf package writes neither
        data = np.concatenate([pack(fit_rows(torch.from_numpy(x[s: s + FIT_ROWS]), t))
                               for s in range(0, len(x), FIT_ROWS)]) if len(x) else np.zeros((0, 0), np.uint8)
    else:  # BF16 and the 32-value types: the reference rounding of the gguf package
        gguf = gguf_package()
        data = gguf.quants.quantize(x, gguf.GGMLQuantizationType(t.ggml))
    return np.ascontiguousarray(data).view(np.uint8).reshape(x.shape[0], t.row_bytes(x.shape[1]))


__all__ = ["BLOCK_TYPES", "encode_matrix", "fit_rows", "block_metrics", "SubStats", "rtn_codes", "choose_rows"]
