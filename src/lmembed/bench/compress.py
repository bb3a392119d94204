"""`lmembed bench compress`: every method on one model, one table, one bytes-vs-quality plot.

The model under test is loaded once; each row compresses a fresh copy with one method string
(or pipeline) on one side protocol, evaluates it with the metric that suits the model, and is
saved to ``rows/`` as soon as it is done, so an interrupted bench resumes where it stopped.

Side protocols for tied models: ``input`` is Bałazy et al.'s (only the input lookup is
compressed, the output head keeps the dense matrix, so the tie is broken); ``both`` is the
honest tied one (one compressed matrix serves both roles).
"""

from __future__ import annotations

import copy
import hashlib
import re
import time
from pathlib import Path
from typing import Any

from ..common.faults import fault_point
from ..common.files import bench_dir, read_json, write_json
from ..common.locks import holds_lock
from ..common.report import markdown_table, plot_scatter, write_text
from ..common.runtime import seed_everything
from ..compression import compress
from ..compression.api import check_method
from ..compression.calibration.calibrate import resolve_calibration
from ..compression.integration.sites import find_sites
from ..compression.registry import as_pipeline
from ..errors import LmembedError
from ..evaluation.pretrained import EVAL_TOKENS
from ..evaluation.subject import Subject, load_subject
from .pareto import pareto_plot

DEFAULT_METHODS = "int8,int4,int4:g32,svd:432,ae:432,svd:288,ae:288"
BENCH_FILES = ("settings.json", "rows", "compress.json", "compress.md", "compress.png", "pareto.png")


def _slug(method: str, side: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", method).strip("-")
    return f"{s}--{side}-{hashlib.sha1(f'{method}|{side}'.encode()).hexdigest()[:6]}"


@holds_lock("bench folder")
def bench_compress(model_spec: str, out: str | Path, *, text: str, methods: str = DEFAULT_METHODS,
                   sides: str = "auto", max_tokens: int = EVAL_TOKENS, seed: int = 0, force: bool = False,
                   resume: bool = True, progress: bool | None = None, log=print, subject: Subject | None = None,
                   calib: Any = None, calib_tokens: int | None = None) -> dict[str, Any]:
    """calib (a text spec, ids or a built-in source; default 'model' when a method needs one): the
    original model is calibrated once, every row reuses the statistics (rows that trim the
    vocabulary recalibrate their trimmed model)."""
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    if not method_list:
        raise LmembedError("--methods: give at least one method, e.g. int8,svd:128")
    for m in method_list:
        as_pipeline(m)  # every bad string is reported before the model loads
    seed_everything(seed)
    subject = subject or load_subject(model_spec, text=text, max_tokens=max_tokens, progress=progress)
    sites = find_sites(subject.model)
    v, d = sites.input_weight.shape
    for m in method_list:
        check_method(m, v, d)  # and every setting this matrix cannot take, before hours of work
    side_list = _sides(sides, sites)
    out = bench_dir(out, force=force, owned=BENCH_FILES)  # every input checked: now the folder
    (out / "rows").mkdir(exist_ok=True)
    settings, stats = bench_settings(out, subject, method_list, calib, calib_tokens, force, log, model=model_spec,
                                     text=text, max_tokens=max_tokens, seed=seed, progress=progress)

    dense = _cached(out / "rows" / "dense.json", resume, lambda: _dense_row(subject, sites, log))
    rows = [dense]
    fits: dict = {}  # one fit per method, shared by the side protocols
    for side in side_list:
        for method in method_list:
            path = out / "rows" / f"{_slug(method, side)}.json"
            row = _cached(path, resume, lambda m=method, s=side: _method_row(subject, m, s, seed, progress, log,
                                                                             dense, stats, fits, calib))
            rows.append(row)
            log(f"{row['method']:>24s} [{row['side']}] ratio {row['ratio']:6.2f}x  {subject.metric} "
                f"{row['metric']:.4g} ({row['delta_pct']:+.2f} %)")
    result = {"bench": "compress", **settings, "shape": [v, d], "tied": sites.tied, "rows": rows}
    write_json(out / "compress.json", result)
    log(_write_report(out, result, subject))
    return result


def bench_settings(out: Path, subject: Subject, methods: list[str], calib: Any, calib_tokens: int | None, force: bool,
                   log, *, model: str, text: str, max_tokens: int, seed: int,
                   progress: bool | None) -> tuple[dict[str, Any], Any]:
    """A bench folder's settings.json (the calibration used included, computed once for every row),
    refused when the folder already holds a bench with other settings (unless `force`)."""
    settings = {"model": model, "text": text, "max_tokens": max_tokens, "seed": seed, "metric": subject.metric,
                "eval": subject.eval_settings}
    stats = resolve_calibration(subject.model, methods, calib, tokenizer=subject.tokenizer, tokens=calib_tokens,
                                seed=seed, progress=progress, log=log)
    if stats is not None:
        settings["calib"] = {"source": stats.source, "tokens": stats.tokens}
    prev = out / "settings.json"
    if prev.exists() and read_json(prev) != settings and not force:
        raise LmembedError(f"{prev}: this folder holds a bench with other settings; pass --force to start over")
    write_json(prev, settings)
    return settings, stats


def _write_report(out: Path, result: dict[str, Any], subject: Subject) -> str:
    """compress.md, compress.png and pareto.png; returns the table."""
    rows, (v, d), metric, spec, text = result["rows"], result["shape"], subject.metric, result["model"], result["text"]
    cols = [("method", "method"), ("side", "side"), ("stored_bytes", "bytes"), ("ratio", "ratio"),
            ("metric", metric), ("delta_pct", "delta %"), ("rel_fro_error", "rel. error"),
            ("mean_row_cosine", "row cos"), ("knn10_overlap", "kNN@10"), ("fit_seconds", "fit s")]
    if any(r.get("vocab") not in (None, v) for r in rows):  # trimmed vocabularies: rows kept, unknowns
        cols[4:4] = [("vocab", "vocab"), ("unk_tokens", "unk")]
    table = markdown_table(rows, cols)
    plot_scatter(out / "compress.png", rows, x="stored_bytes", y="metric", label="method", group="side",
                 xlabel="stored embedding bytes (log)", ylabel=metric + (" (log)" if subject.lower_is_better else ""),
                 logx=True, logy=subject.lower_is_better, title=f"{spec}: {metric} on {text} vs bytes")
    pareto_plot(out / "pareto.png", rows, metric=metric, lower_is_better=subject.lower_is_better,
                title=f"{spec}: {metric} on {text} vs bytes (quality axis clipped near dense)")
    write_text(out / "compress.md", f"# Embedding compression: {spec}\n\n"
                                    f"Matrix {v} x {d} ({'tied' if result['tied'] else 'untied'}); {metric} on "
                                    f"`{text}` ({subject.eval_settings}); seed {result['seed']}.\n\n{table}\n"
                                    "![bytes vs quality](compress.png)\n\n![Pareto, clipped](pareto.png)\n")
    return table


def _sides(sides: str, sites) -> list[str]:
    if sides == "auto":  # tied models: both protocols; others: what auto compresses
        return ["input", "both"] if sites.tied else ["auto"]
    out = [s.strip() for s in sides.split(",") if s.strip()]
    for s in out:
        if s not in ("auto", "input", "output", "both"):
            raise LmembedError(f"--sides {sides}: {s!r} is not one of auto, input, output, both")
    return out


def _cached(path: Path, resume: bool, make) -> dict[str, Any]:
    if resume and path.exists():
        return read_json(path, "bench row")
    row = make()
    write_json(path, row)
    fault_point("bench:row")
    return row


def _dense_row(subject: Subject, sites, log) -> dict[str, Any]:
    w = sites.input_weight
    n = w.numel() + (sites.output_weight.numel() if sites.output_weight is not None and not sites.tied else 0)
    t0 = time.perf_counter()
    metrics = subject.evaluate(subject.model)
    log(f"{'dense':>24s} {subject.metric} {metrics[subject.metric]:.4g} ({time.perf_counter() - t0:.0f} s)")
    return {"method": "dense", "side": "-", "stored_bytes": n * 4, "ratio": 1.0, "metric": metrics[subject.metric],
            "delta_pct": 0.0, "fit_seconds": 0.0, "eval": metrics, "rel_fro_error": 0.0, "mean_row_cosine": 1.0,
            "knn10_overlap": 1.0}


def _method_row(subject: Subject, method: str, side: str, seed: int, progress, log, dense: dict,
                stats: Any, fits: dict, calib_spec: Any = None) -> dict[str, Any]:
    model = copy.deepcopy(subject.model)
    trims = method.strip().startswith("trim")  # statistics of the full vocabulary do not fit a trimmed one
    calib = (calib_spec if trims else stats) if stats is not None else None
    needs = any(m.needs_calib for m in check_method(method, *find_sites(model).input_weight.shape))
    rep = compress(model, method, side=side, seed=seed, progress=progress, log=log,
                   calib=calib if needs else None, cache=fits, tokenizer=subject.tokenizer)
    new_tok = rep.pop("tokenizer", None)  # a trimmed vocabulary: evaluate with its remapped tokenizer
    if new_tok is not None and subject.for_tokenizer is None:
        raise LmembedError(f"method {method!r}: this bench's {subject.metric} cannot evaluate a trimmed vocabulary")
    metrics = (subject.evaluate if new_tok is None else subject.for_tokenizer(new_tok))(model)
    value = metrics[subject.metric]
    first = rep["matrices"][0]
    # bytes of the whole embedding layer(s): compressed ones as stored, a dense head left behind in fp32
    left_dense = 0
    if rep["was_tied"] and rep["side"] != "both":  # the dense head, trimmed when the vocabulary was
        left_dense = first["shape"][0] * first["shape"][1] * 4
    del model
    return {
        "method": rep["method"], "side": rep["side"], "stored_bytes": rep["stored_bytes"] + left_dense,
        "compressed_bytes": rep["stored_bytes"], "ratio": (dense["stored_bytes"]) / (rep["stored_bytes"] + left_dense),
        "matrix_ratio": rep["ratio"], "metric": value, "delta_pct": 100 * (value / dense["metric"] - 1),
        "fit_seconds": rep["seconds"], "eval": metrics, "rel_fro_error": first["rel_fro_error"],
        "mean_row_cosine": first["mean_row_cosine"], "knn10_overlap": first["knn10_overlap"], "report": rep,
        "vocab": first["shape"][0], "unk_tokens": metrics.get("unk_tokens"),
    }
