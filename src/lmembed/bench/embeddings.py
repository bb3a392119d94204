"""`lmembed bench embeddings`: how much word similarity each compression method keeps.

Each model (default MiniLM's input matrix and SmolLM2's tied one) is analysed as loaded and after
``lmembed.compress(model, METHOD)`` for every method: SimLex-999 / WS-353 Spearman, analogy
accuracy, effective rank, the share of the original Spearman that is kept, and the agreement
between the compressed and the original matrix (Spearman between the cosine similarities they
give the same sampled word pairs; 1 = word similarity ranked exactly as before).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common.files import check_out_dir, write_json
from ..common.locks import holds_lock
from ..common.report import markdown_table, plot_scatter, write_text
from ..common.runtime import seed_everything
from ..errors import LmembedError
from ..evaluation.embeddings import analyze_targets, table_rows, write_analysis
from ..evaluation.similarity import DEFAULT_ANALOGIES

DEFAULT_MODELS = "minilm,smollm2"
DEFAULT_METHODS = "int8,int4,svd:256,svd:64,ae:256,ae:64"


def _rows(result: dict[str, Any], specs: list[str], comps: list[str | None]) -> list[dict[str, Any]]:
    """One row per (model, method, matrix): Spearman kept against the original, agreement with it."""
    agree = {(a["a"], a["b"]): a["spearman"] for a in result["cross_agreement"]}
    flat = {(r["target"], r["matrix"]): r for r in table_rows(result)}
    rows = []
    for t, model, method in zip(result["targets"], specs, comps, strict=True):
        orig = next(x for x in result["targets"] if x["label"] == model)
        report = (t["info"].get("compression") or {}).get("report") or {}
        for name, m in t["matrices"].items():
            base = name if name in orig["matrices"] else next(iter(orig["matrices"]))
            row = {"model": model, "method": method or "none", "matrix": name,
                   "ratio": report.get("ratio", 1.0 if method is None else None),
                   "stored_bytes": report.get("stored_bytes"),
                   "agreement": 1.0 if method is None else agree.get((f"{model}/{base}", f"{t['label']}/{name}"))}
            flat_row = flat[(t["label"], name)]
            for b, s in m["similarity"].items():
                row[b] = s["spearman"]
                ref = orig["matrices"][base]["similarity"][b]["spearman"]
                row[f"{b}_kept"] = s["spearman"] / ref if s["spearman"] is not None and ref else None
            for k in ("analogy", "effective_rank", "mean_cosine"):
                row[k] = flat_row.get(k)
            rows.append(row)
    return rows


@holds_lock("bench folder")
def bench_embeddings(models: list[str], methods: list[str], out: str | Path, *, benchmarks=None,
                     analogies: Any = DEFAULT_ANALOGIES, pair_words: int = 2000, seed: int = 0, force: bool = False,
                     log=print) -> dict[str, Any]:
    if not models:
        raise LmembedError("--models: give at least one model")
    from ..compression.registry import parse_pipeline

    for m in methods:
        parse_pipeline(m)  # a bad method string fails before any model is loaded
    out = check_out_dir(out, force=force)  # the files are written, all at once, at the end
    seed_everything(seed)
    specs, labels, comps = [], [], []
    for model in models:
        for method in [None, *methods]:
            specs.append(model)
            labels.append(model if method is None else f"{model}+{method}")
            comps.append(method)
    result, plot = analyze_targets(specs, labels=labels, compress=comps, benchmarks=benchmarks, analogies=analogies,
                                   words=[], pair_words=pair_words, seed=seed, log=log)
    rows = _rows(result, specs, comps)
    bench = {"bench": "embeddings", "models": models, "methods": methods, "seed": seed, "rows": rows,
             "analysis": result}
    write_json(out / "embeddings.json", bench)
    write_analysis(result, plot, out)
    names = [b for b in (rows[0] if rows else {}) if f"{b}_kept" in rows[0]]
    cols: list = [("model", "model"), ("method", "method"), ("matrix", "matrix"), ("ratio", "ratio vs fp32")]
    for b in names:
        cols += [(b, f"{b} rho"), (f"{b}_kept", f"{b} kept")]
    cols += [("analogy", "analogy acc"), ("effective_rank", "eff. rank"),
             ("agreement", "agreement with original")]
    table = markdown_table(rows, cols)
    if names:
        plot_scatter(out / "embeddings.png", [{**r, "label": r["method"]} for r in rows], x="ratio", y=names[0],
                     label="label", group="model", logx=True, xlabel="compression ratio vs fp32 (log)",
                     ylabel=f"{names[0]} Spearman", title="word similarity kept by compression")
    write_text(out / "embeddings.md", "# Word similarity under compression\n\n"
                                      "kept: compressed Spearman / original Spearman. Agreement: Spearman between "
                                      "the cosine similarities the compressed and the original matrix give the same "
                                      f"{pair_words} sampled words' pairs.\n\n{table}\n![similarity vs ratio]"
                                      "(embeddings.png)\n\nFull analysis: [analysis.md](analysis.md)\n")
    log(table)
    return bench
