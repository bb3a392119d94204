"""From calibration statistics to the metric a calibrated method minimises.

An error ΔE_v in row v costs the model about w_v · ΔE_v M ΔE_vᵀ. ``sensitivity`` builds M for a
side: H = E[h hᵀ] of the hidden states the head sees (output role), the input Fisher G = E[g gᵀ]
(input role), H + INPUT_WEIGHT·G for a tied matrix, falling back to a multiple of H's diagonal
when no Fisher was collected. ``metric_for`` / ``whitening_for`` hand a method its damped metric or
its Cholesky factor after checking the statistics match the matrix; ``need_calib`` says whether a
method needs calibration at all, so uncalibrated methods never run the model.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import LmembedError
from ..registry import FitContext, Method

# Both roles' second-order costs are in nats per token, so they add with weight 1. Measured with tc on
# SmolLM2 (wiki:test, perplexity): 3 bits: a = 0.5 / 1 / 1.5 / 2 / 4: +10.9 / +10.3 / +9.8 / +9.7 /
# +12.0 %; 3.5 bits: a = 1 / 1.5 / 2: +4.5 / +5.5 / +5.3 %. No weight wins both, so the theory's.
INPUT_WEIGHT = 1.0


FALLBACK_INPUT = 0.05  # no input Fisher: the input role as this multiple of H's mean diagonal


def need_calib(method: Method, ctx: FitContext):
    from .calibrate import CalibStats

    if not isinstance(ctx.calib, CalibStats):
        raise LmembedError(f"method {method.text!r} needs calibration statistics: pass calib= to lmembed.compress "
                           "(a text, a file or token ids) or --calib TEXT on the command line")
    return ctx.calib


def sensitivity(calib: Any, side: str, input_weight: float = 1.0) -> torch.Tensor:
    """M (d x d, float64): H for the output role, the input Fisher G for the input role, H + a·G for
    a tied matrix (both in nats per token, so they add; a = `input_weight`). Without G the input role
    is a multiple of the identity; without either, the identity (plain PCA coding)."""
    h, g = calib.hidden_moment, getattr(calib, "input_fisher", None)
    eye = torch.eye(calib.dim, dtype=torch.float64)
    if side == "input" or h is None:
        return g.double() if g is not None else eye
    h = h.double()
    if side == "output":
        return h
    return h + input_weight * (g.double() if g is not None else FALLBACK_INPUT * torch.diagonal(h).mean() * eye)


def _checked(method: Method, ctx: FitContext, dim: int):
    calib = need_calib(method, ctx)
    if calib.dim != dim:
        raise LmembedError(f"method {method.text!r}: calibration statistics are for d = {calib.dim}, the matrix has "
                           f"d = {dim} (calibrate the same model)")
    return calib


def _damped(m: torch.Tensor, damp: float) -> torch.Tensor:
    return m + damp * torch.eye(m.shape[0], dtype=m.dtype) * torch.diagonal(m).mean()


def metric_for(method: Method, ctx: FitContext, dim: int) -> torch.Tensor:
    """The `mix` metric (H and the identity), damped: gptq and mixed."""
    return _damped(_checked(method, ctx, dim).column_metric(ctx.side, mix=method.mix), method.damp)


def whitening_for(method: Method, ctx: FitContext, dim: int) -> torch.Tensor:
    """The sensitivity H + a·G, trace-normalised to d and damped: wsvd and wae."""
    m = sensitivity(_checked(method, ctx, dim), ctx.side, method.input)
    return _damped(m * (dim / torch.trace(m).clamp_min(1e-30)), method.damp)
