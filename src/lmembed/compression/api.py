"""`lmembed.compress(model, "ae:128")`: one verb that fits and swaps the embedding modules in place."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..common.cache import content_hash
from ..common.runtime import pick_device
from ..errors import LmembedError
from .calibration.calibrate import CalibStats, resolve_calibration
from .choose import Choice, choose
from .formats.base import CompressedEmbedding
from .formats.dense import DenseEmbedding
from .integration.sites import Sites, find_sites, install, resolve_side
from .methods.fit_quality import matrix_stats
from .registry import FitContext, Method, as_pipeline, pipeline_text
from .stages import apply_stage

MethodSpec = str | Method | Sequence[str | Method]


def run_pipeline(methods: list[Method], weight: torch.Tensor, ctx: FitContext, text: str,
                 cache: dict | None = None) -> CompressedEmbedding:
    """Apply the stages left to right. `cache` (optional, caller-owned) reuses a fit of the same
    pipeline on the same matrix with the same seed, e.g. across the side protocols of a bench."""
    calib = (getattr(ctx.calib, "source", None), getattr(ctx.calib, "tokens", None))
    key = (text, _fingerprint(weight), ctx.seed, ctx.side, calib) if cache is not None else None
    if cache is not None and key in cache:
        return copy.deepcopy(cache[key])
    # the starting matrix shares the model's storage: a fit never writes to it, and compress may
    # hold only one extra copy of the matrix (its own temporaries, bounded by row chunks)
    module: CompressedEmbedding = DenseEmbedding.wrap(nn.Parameter(weight.detach(), requires_grad=False))
    ctx.weight = weight.detach()
    for m in methods:
        module = apply_stage(m, module, ctx)
    module.method = text
    if cache is not None:
        cache[key] = copy.deepcopy(module)
    return module


def _fingerprint(weight: torch.Tensor) -> str:
    """Content hash of a matrix (copies of a model share fits; identity would not survive deepcopy)."""
    return content_hash(weight)


@dataclass
class Fitted:
    """The compressed module(s) of one compress() call, by role, before they are installed."""

    side: str
    input: CompressedEmbedding | None = None
    output: CompressedEmbedding | None = None
    roles: list[tuple[str, torch.Tensor, CompressedEmbedding]] = field(default_factory=list)


def compress(
    model: nn.Module,
    method: MethodSpec | None = None,
    *,
    bits: float | None = None,
    calib: Any = None,
    side: str = "auto",
    seed: int = 0,
    device: str | torch.device = "auto",
    freqs: torch.Tensor | None = None,
    progress: bool | None = None,
    log=lambda s: None,
    cache: dict | None = None,
    tokenizer: Any = None,
    calib_tokens: int | None = None,
) -> dict[str, Any]:
    """Compress the token embeddings of `model` in place.

    method: a method string or pipeline (``"int4:g32"``, ``"trim:lee > int8"``), a Method object
    (``Int4(group=32)``) or a list of them (``[Trim("lee"), Int8()]``); or leave it out and give
    `bits`, the stored bits per value (everything counted), and lmembed picks the method
    (lmembed.compression.choose: calibrated transform coding for a model with a head, per-row
    super-block widths for an encoder; ``calib=False``: calibration-free codes).

    side: ``auto`` (both sides where there is an output layer, else the input), ``input`` (the
    paper's protocol: a tied model's head stays dense), ``output`` or ``both``. A tied model
    compressed on both sides gets one module serving both. Returns a report dict (bytes, ratio,
    seconds, matrix fidelity per compressed matrix).

    calib: CalibStats, a text spec / raw ids run through the original model first (`tokenizer` for
    text; `calib_tokens` ids), or ``"model"`` (text sampled from the model) / ``"mix"`` (the bundled
    corpora): the default of calibrated methods (``"mix"`` for a model that cannot generate).

    A first stage that changes the vocabulary (``trim:CORPUS``) needs `tokenizer`: it trims the
    model first (later stages and calibration see the V' x d model); ``report["vocab"]`` says
    what was kept and ``report["tokenizer"]`` is the remapped tokenizer (pop it before writing
    the report; save it with ``lmembed.save(model, dir, tokenizer=...)``).
    """
    chosen = None
    if bits is not None or method is None:
        chosen, calib = _choose(model, method, bits, calib)
        method = chosen.method
    full = as_pipeline(method)
    _check_trim_calib(full, calib)
    vocab, methods = vocabulary_stage(model, full, tokenizer, log)
    tokenizer, freqs = (tokenizer, freqs) if vocab is None else vocab.remapped(tokenizer, freqs)
    sites = find_sites(model)
    side = resolve_side(sites, side)
    if methods:
        methods[0].check(*sites.input_weight.shape)
    t_cal = time.perf_counter()
    stats = resolve_calibration(model, methods, calib, tokenizer=tokenizer, tokens=calib_tokens, seed=seed,
                                progress=progress, log=log)
    calib_seconds = time.perf_counter() - t_cal if stats is not None else None
    dev = device if isinstance(device, torch.device) else pick_device(device)
    ctx = FitContext(seed=seed, device=dev, progress=progress, log=log, freqs=freqs, calib=stats, tokenizer=tokenizer)
    report = _fit_and_install(model, methods, pipeline_text(full), sites, side, ctx, cache, vocab, stats, calib_seconds)
    if chosen is not None:
        report["chosen"] = {"bits": float(bits), "method": chosen.method, "why": chosen.why}
    return {"vocab": vocab.report, "tokenizer": vocab.tokenizer, **report} if vocab is not None else report


def _check_trim_calib(full: list[Method], calib: Any) -> None:
    """A vocabulary stage's calibration must be text (run through the trimmed model), not ids or
    statistics of the untrimmed vocabulary."""
    if full[0].vocabulary and calib is not None and not isinstance(calib, (str, os.PathLike)):
        raise LmembedError(f"calib: statistics or token ids of the untrimmed vocabulary cannot serve {full[0].text!r}; "
                           "pass the calibration text instead (it is then run through the trimmed model)")


def _fit_and_install(model: nn.Module, methods: list[Method], text: str, sites: Sites, side: str, ctx: FitContext,
                     cache: dict | None, vocab: Any, stats: Any, calib_seconds: float | None) -> dict[str, Any]:
    """Fit every side (seeded), wrap a trimmed vocabulary, install the modules in the model; the report."""
    torch.manual_seed(ctx.seed)
    t0 = time.perf_counter()
    fitted, seconds = fit_sides(methods, sites, side, ctx, text, cache), time.perf_counter() - t0
    if vocab is not None:
        _wrap_trimmed(fitted, vocab)
    v0 = vocab.original_vocab if vocab is not None else sites.input_weight.shape[0]
    matrices = [_matrix_report(role, weight, module, v0, ctx.seed) for role, weight, module in fitted.roles]
    install(model, sites, side, fitted.input, fitted.output)
    return _summary(matrices, text, side, sites, v0, ctx.seed, seconds, stats, calib_seconds)


def _choose(model: nn.Module, method: MethodSpec | None, bits: float | None, calib: Any) -> tuple[Choice, Any]:
    """(the recommended method for `bits`, the calibration to use: None = the default, unless
    calib=False asked for a calibration-free method)."""
    if method is not None:
        raise LmembedError("compress: give a method or bits, not both")
    if bits is None:
        raise LmembedError("compress: give a method (e.g. 'tc:4.5') or bits=B, the stored bits per value")
    sites = find_sites(model)
    v, d = sites.input_weight.shape
    chosen = choose(bits, num_embeddings=v, dim=d, has_head=sites.output_module is not None,
                    calibrate=calib is not False)
    return chosen, None if calib is False else calib


def fit_sides(methods: list[Method], sites: Sites, side: str, ctx: FitContext, text: str,
              cache: dict | None) -> Fitted:
    """One fitted module per role: a tied matrix compressed on both sides gets one module."""
    fitted = Fitted(side)
    if sites.tied and side == "both":
        ctx.side = "tied"
        fitted.input = fitted.output = run_pipeline(methods, sites.input_weight, ctx, text, cache)
        fitted.roles.append(("tied", sites.input_weight, fitted.input))
        return fitted
    if side in ("input", "both"):
        ctx.side = "input"
        fitted.input = run_pipeline(methods, sites.input_weight, ctx, text, cache)
        fitted.roles.append(("input", sites.input_weight, fitted.input))
    if side in ("output", "both"):
        ctx.side = "output"
        fitted.output = run_pipeline(methods, sites.output_weight, ctx, text, cache)
        fitted.roles.append(("output", sites.output_weight, fitted.output))
    return fitted


def _wrap_trimmed(fitted: Fitted, vocab: Any) -> None:
    """One TrimmedEmbedding per distinct module (a tied one stays one)."""
    wrapped = {id(m): vocab.wrap(m) for m in (fitted.input, fitted.output) if m is not None}
    fitted.input, fitted.output = (wrapped[id(m)] if m is not None else None for m in (fitted.input, fitted.output))
    fitted.roles = [(r, w, wrapped[id(m)]) for r, w, m in fitted.roles]


def _matrix_report(role: str, weight: torch.Tensor, module: CompressedEmbedding, v0: int,
                   seed: int) -> dict[str, Any]:
    """Bytes and fidelity of one compressed matrix; ratios are against the original V0 x d matrix."""
    module.to(weight.device)
    dense_fp32 = v0 * weight.shape[1] * 4
    stored = module.stored_bytes()
    return {
        "role": role, "shape": list(weight.shape), "kind": module.kind, "stored_bytes": stored,
        "dense_bytes": v0 * weight.shape[1] * weight.element_size(), "ratio": dense_fp32 / stored,
        "ratio_fp16": dense_fp32 / 2 / stored, **matrix_stats(weight, module.lookup, seed=seed),
    }


def _summary(matrices: list[dict[str, Any]], text: str, side: str, sites: Sites, v0: int, seed: int,
             seconds: float, stats: CalibStats | None, calib_seconds: float | None) -> dict[str, Any]:
    stored = sum(m["stored_bytes"] for m in matrices)
    dense32 = sum(v0 * m["shape"][1] * 4 for m in matrices)
    return {
        "method": text, "side": side, "tied": bool(sites.tied and side == "both"), "was_tied": sites.tied,
        "shape": [v0, sites.input_weight.shape[1]], "stored_bytes": stored, "dense_fp32_bytes": dense32,
        "ratio": dense32 / stored, "ratio_fp16": dense32 / 2 / stored, "seconds": seconds, "matrices": matrices,
        "seed": seed, "calib_seconds": calib_seconds,
        "calib": {"source": stats.source, "tokens": stats.tokens} if stats is not None else None,
    }


def check_method(method: MethodSpec, num_embeddings: int, dim: int) -> list[Method]:
    """Parse and validate a method (string, object or list) for a V x d matrix without fitting."""
    methods = as_pipeline(method)
    for m in methods[: 2 if methods[0].vocabulary else 1]:  # after a trim, the next stage sees <= V rows
        m.check(num_embeddings, dim)
    return methods


def vocabulary_stage(model: nn.Module, methods: list[Method], tokenizer: Any, log) -> tuple[Any, list[Method]]:
    """(VocabTrim, the remaining stages) when the pipeline starts by trimming, else (None, methods).
    Trimming changes the model in place before anything is fitted."""
    if not methods[0].vocabulary:
        return None, methods
    for m in methods[:2]:  # before the model changes: a bad later stage must leave it untouched
        m.check(*find_sites(model).input_weight.shape)
    return methods[0].prepare(model, tokenizer, log), methods[1:]


__all__ = ["compress", "check_method", "run_pipeline", "fit_sides", "MethodSpec"]
