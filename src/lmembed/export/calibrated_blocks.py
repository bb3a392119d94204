"""Calibrated rounding into llama.cpp's block types: the same blocks llama.cpp decodes, with codes
and scales chosen for the model's error instead of the matrix's.

An error Δ_v in row v costs the model about w_v · Δ_v M Δ_vᵀ (compression/methods/calibrated.py), with M
the sensitivity `tc` uses (H + G for a tied matrix: hidden-state moment and input Fisher; H for
an output matrix, G for an input one) and w_v the row's calibrated importance. Rows are
independent given M, so each row is rounded to lower its own Δ M Δᵀ; the row weights only rank
block types against each other (`choose_type`). Per chunk of rows:

1. every block's (or K-quant sub-block's) scale and min searched under its diagonal block of M
   (block_fit), codes rounded to nearest;
2. GPTQ: codes rounded one column at a time, columns in decreasing order of M's diagonal, each
   rounding error pushed onto the columns not yet rounded through M (Babai's nearest plane in
   M's Cholesky basis);
3. the row's fp16 scales (and mins) refitted jointly by least squares under the full M for those
   codes, then GPTQ again with them (ROUNDS times; a row keeps its best state);
4. coordinate descent: single-code steps of ±1 that lower Δ M Δᵀ, column by column (POLISH passes).

Every state is a real block state (fp16 parameters, codes in range), so what is measured is what
llama.cpp decodes; `calibrated_rows` returns the packed bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..compression.methods.gptq import gptq_columns
from ..errors import LmembedError
from .block_fit import FIT_ROWS, choose_rows, fit_rows, rtn_codes
from .blocks import BLOCK_TYPES, BlockType, Coded, fp16, pack, types_for_row

ROUNDS = 2  # least-squares refits of the scales, each followed by GPTQ
POLISH = 2  # coordinate-descent passes over the columns
GPTQ_BLOCK = 128  # columns updated lazily together
DAMP = 0.1  # added to M's diagonal, relative to its mean (measured: see the module doc)
SAMPLE_ROWS = 2048  # rows on which `choose_type` compares block types
REFIT_FLOATS = 1 << 25  # rows x n x blocks floats the joint refit holds at once


def damped(metric: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """M + damp·mean(diag M)·I, float64: positive definite for GPTQ's Cholesky factors."""
    m = metric.double()
    return m + damp * torch.diagonal(m).mean() * torch.eye(m.shape[0], dtype=m.dtype)


@dataclass
class Metric:
    """The column metric and what GPTQ needs from it: the act order and the upper Cholesky factor
    of M⁻¹ in that order."""

    m: torch.Tensor  # n x n float32
    order: torch.Tensor
    u: torch.Tensor

    @classmethod
    def of(cls, metric: torch.Tensor, act_order: bool = True) -> Metric:
        m = metric.double()
        order = (torch.argsort(torch.diagonal(m), descending=True, stable=True) if act_order
                 else torch.arange(m.shape[0]))
        mp = m[order][:, order]
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(mp)), upper=True)
        return cls(m.float(), order, u.float())


def row_costs(x: torch.Tensor, c: Coded, metric: Metric) -> torch.Tensor:
    """Δ M Δᵀ of every row (float64)."""
    delta = c.values() - x
    return ((delta @ metric.m) * delta).sum(1).double()


def _per_value(c: Coded) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(p.repeat_interleave(c.t.sub, 1) for p in c.scale_offset())


def gptq(x: torch.Tensor, c: Coded, metric: Metric) -> Coded:
    """New codes for c's parameters, rounded in act order with the error fed forward through M."""
    lo, hi = c.t.code_range
    order = metric.order
    a, b = (p[:, order] for p in _per_value(c))
    inv = torch.where(a != 0, 1.0 / torch.where(a != 0, a, 1.0), 0.0)
    q = torch.empty(x.shape, dtype=torch.int16)

    def round_column(col: int, w1: torch.Tensor, j: int) -> torch.Tensor:
        if c.t.lut:
            code = torch.where(a[:, col] != 0, c.t.nearest(w1[:, j] * inv[:, col]), float(c.t.zero))
            q[:, col] = code.to(torch.int16)
            return a[:, col] * c.t.levels(code)
        code = torch.where(a[:, col] != 0, ((w1[:, j] - b[:, col]) * inv[:, col]).round(), float(c.t.zero))
        code = code.clamp_(lo, hi)
        q[:, col] = code.to(torch.int16)
        return a[:, col] * code + b[:, col]

    gptq_columns(x[:, order].clone(), metric.u, GPTQ_BLOCK, round_column)
    back = torch.empty_like(q)
    back[:, order] = q
    return Coded(c.t, back, c.d, c.m, c.sc, c.mn)


def _coefficients(c: Coded) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What multiplies each block's d and m (rows x n): x̂ = d_g·α + m_g·β within block g."""
    t = c.t
    levels = t.levels(c.q)
    if not t.kbits:
        return levels, (torch.ones_like(levels) if t.affine else None)
    alpha = c.sc.float().repeat_interleave(t.sub, 1) * levels
    return alpha, (-c.mn.float().repeat_interleave(t.sub, 1) if t.affine else None)


def refit(x: torch.Tensor, c: Coded, metric: Metric) -> Coded:
    """c's codes with every block's fp16 d (and m) refitted jointly, by least squares under the
    full M: the blocks of a row interact through M's off-diagonal entries."""
    r, n = x.shape
    g = n // c.t.block
    coefs = [v for v in _coefficients(c) if v is not None]
    m3 = metric.m.reshape(n, g, -1)
    mx = x @ metric.m
    k = torch.zeros(r, len(coefs) * g, len(coefs) * g, dtype=torch.float64)
    rhs = torch.zeros(r, len(coefs) * g, dtype=torch.float64)
    for j, cj in enumerate(coefs):
        z = torch.einsum("ihj,rhj->rih", m3, cj.reshape(r, g, -1)).reshape(r, g, -1, g)  # (M·cj restricted to h)_i
        for i, ci in enumerate(coefs):
            k[:, i * g:(i + 1) * g, j * g:(j + 1) * g] = torch.einsum("rgi,rgih->rgh", ci.reshape(r, g, -1), z).double()
        rhs[:, j * g:(j + 1) * g] = (cj * mx).reshape(r, g, -1).sum(-1).double()
    ridge = 1e-9 * torch.diagonal(k, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    k += ridge[:, None, None] * torch.eye(k.shape[1], dtype=k.dtype)
    theta = torch.linalg.solve(k, rhs[..., None])[..., 0]
    if not torch.isfinite(theta).all():
        return c
    d = fp16(theta[:, :g])
    m = fp16(theta[:, g:]) if len(coefs) > 1 else None
    return Coded(c.t, c.q, d, m, c.sc, c.mn)


def _steps(t, a: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The value changes of a code step +1 and -1 (a codebook's levels are not evenly spaced; a
    step out of range is never taken, whatever it returns)."""
    if not t.lut:
        return a, -a
    lo, hi = t.code_range
    here = t.levels(q)
    return (a * (t.levels((q + 1).clamp(max=hi)) - here), a * (t.levels((q - 1).clamp(min=lo)) - here))


def polish(x: torch.Tensor, c: Coded, metric: Metric, passes: int = POLISH) -> Coded:
    """Coordinate descent: per column, the ±1 code step that lowers Δ M Δᵀ most, if any. The
    gradient Δ M is kept current within a block of columns and brought up to date for the rest of
    the row by one matmul per block (as GPTQ's lazy updates): a rank-1 update of the whole
    gradient per column made this step memory-bound at large vocabularies."""
    lo, hi = c.t.code_range
    a, _ = _per_value(c)
    q = c.q.clone()
    m = metric.m
    grad = (c.values() - x) @ m
    diag = torch.diagonal(m)
    n = x.shape[1]
    for _ in range(passes):
        moved = 0
        for s in range(0, n, GPTQ_BLOCK):
            e = min(s + GPTQ_BLOCK, n)
            local = grad[:, s:e].clone()
            changes = torch.zeros_like(local)
            for j in range(s, e):
                plus, minus = _steps(c.t, a[:, j], q[:, j])
                g = local[:, j - s]
                up = 2 * plus * g + plus * plus * diag[j]  # cost change of +1 / -1
                down = 2 * minus * g + minus * minus * diag[j]
                step = torch.where(up < down, 1, -1).to(torch.int16)
                ok = (torch.minimum(up, down) < 0) & (q[:, j] + step >= lo) & (q[:, j] + step <= hi)
                if not bool(ok.any()):
                    continue
                change = torch.where(ok, torch.where(step > 0, plus, minus), 0.0)
                q[:, j] += torch.where(ok, step, 0)
                local.addr_(change, m[j, s:e])
                changes[:, j - s] = change
                moved += int(ok.sum())
            grad += changes @ m[s:e]
        if not moved:
            break
    return Coded(c.t, q, c.d, c.m, c.sc, c.mn)


def _keep_better(x: torch.Tensor, new: Coded, old: Coded, old_cost: torch.Tensor, metric: Metric
                 ) -> tuple[Coded, torch.Tensor]:
    cost = row_costs(x, new, metric)
    take = cost < old_cost
    return choose_rows(take, new, old), torch.where(take, cost, old_cost)


def calibrated_chunk(x: torch.Tensor, t: BlockType, metric: Metric, rounds: int = ROUNDS,
                     passes: int = POLISH) -> tuple[Coded, torch.Tensor]:
    """Rows in integer block type t, rounded for the metric (module doc): (state, row costs)."""
    x = x.float()
    c = fit_rows(x, t, metric.m)
    cost = row_costs(x, c, metric)
    c, cost = _keep_better(x, gptq(x, c, metric), c, cost, metric)
    for _ in range(rounds):
        fitted = refit(x, c, metric)
        c, cost = _keep_better(x, fitted, c, cost, metric)
        c, cost = _keep_better(x, gptq(x, fitted, metric), c, cost, metric)
    if passes:
        c, cost = _keep_better(x, polish(x, c, metric, passes), c, cost, metric)
    return c, cost


def _chunk_rows(n: int, t: BlockType) -> int:
    return max(1, min(FIT_ROWS, REFIT_FLOATS // (n * max(1, n // t.block))))


def plain_chunk(x: torch.Tensor, t: BlockType) -> Coded:
    """The uncalibrated state of the same type (RTN with the plain searched scales)."""
    return rtn_codes(x.float(), fit_rows(x.float(), t))


def float_cost(x: torch.Tensor, t: BlockType, metric: Metric) -> torch.Tensor:
    """Row costs of a float type (F32 exact, F16 / BF16 rounded)."""
    if t.name == "F32":
        return torch.zeros(x.shape[0], dtype=torch.float64)
    delta = x.to(torch.float16 if t.name == "F16" else torch.bfloat16).float() - x
    return ((delta @ metric.m) * delta).sum(1).double()


def float_bytes(x: torch.Tensor, t: BlockType) -> np.ndarray:
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.name]
    return x.to(dtype).contiguous().view(torch.uint8).numpy().reshape(x.shape[0], -1)


def calibrated_rows(x: np.ndarray | torch.Tensor, type_name: str, metric: torch.Tensor, *,
                    rounds: int = ROUNDS, passes: int = POLISH, progress: Callable[[int], None] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A V x n matrix in block type `type_name`, rounded for `metric` (n x n, damped): (uint8 rows x
    bytes as GGUF stores them, each row's Δ M Δᵀ)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    t = BLOCK_TYPES[type_name]
    v, n = x.shape
    met = Metric.of(metric)
    if not t.integer:
        return float_bytes(x, t), float_cost(x, t, met).numpy()
    out = np.empty((v, t.row_bytes(n)), dtype=np.uint8)
    costs = np.empty(v, dtype=np.float64)
    step = _chunk_rows(n, t)
    for s in range(0, v, step):
        c, cost = calibrated_chunk(x[s: s + step], t, met, rounds, passes)
        out[s: s + step], costs[s: s + step] = pack(c), cost.numpy()
        if progress is not None:
            progress(min(s + step, v))
    return out, costs


def plain_costs(x: np.ndarray | torch.Tensor, type_name: str, metric: torch.Tensor) -> np.ndarray:
    """Row costs of the reference (uncalibrated) rounding of the same type, for comparison."""
    from .block_fit import encode_matrix
    from .blocks import decode_matrix

    x = np.asarray(x, dtype=np.float32)
    met = Metric.of(metric)
    out = np.empty(len(x))
    for s in range(0, len(x), FIT_ROWS):
        rows = x[s: s + FIT_ROWS]
        delta = torch.from_numpy(decode_matrix(encode_matrix(rows, type_name), type_name, x.shape[1]) - rows)
        out[s: s + FIT_ROWS] = ((delta @ met.m) * delta).sum(1).double().numpy()
    return out


def weighted_cost(costs: np.ndarray, weights: np.ndarray) -> float:
    """Σ w_v·cost_v / Σ w_v: the calibrated cost per row."""
    return float((costs * weights).sum() / weights.sum())


def budget_types(n: int, bits: float) -> list[str]:
    """Block types of rows of n values within `bits` per value, or a one-line error."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits) or bits <= 0:
        raise LmembedError(f"bits: expected a positive number of bits per value, not {bits!r}")
    ok = types_for_row(n)
    within = [name for name in ok if BLOCK_TYPES[name].bits_per_value <= bits + 1e-9]
    if not within:
        low = min(ok, key=lambda k: BLOCK_TYPES[k].bits_per_value)
        raise LmembedError(f"bits {bits:g}: no GGUF block type for rows of {n} values stores that few bits per value; "
                           f"the smallest is {low} ({BLOCK_TYPES[low].bits_per_value:g} bits per value)")
    return within


def choose_type(x: np.ndarray, weights: np.ndarray, metric: torch.Tensor, bits: float, *,
                source_type: str | None = None, seed: int = 0, rows: int = SAMPLE_ROWS
                ) -> tuple[str, dict[str, float]]:
    """The block type within `bits` per value of lowest calibrated cost, and each candidate's cost
    (estimated on `rows` rows drawn at random, seeded; the source's own type costs 0: its rows are
    copied). Ties go to the fewer bits."""
    cands = budget_types(x.shape[1], bits)
    if source_type in cands:
        return source_type, {source_type: 0.0}
    pick = np.sort(np.random.default_rng(seed).permutation(len(x))[:rows])
    xs, ws = x[pick], weights[pick]
    costs = {name: weighted_cost(calibrated_rows(xs, name, metric)[1], ws) for name in cands}
    best = min(cands, key=lambda k: (costs[k], BLOCK_TYPES[k].bits_per_value))
    return best, costs
