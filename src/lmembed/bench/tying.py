"""Press & Wolf 2017, Table 6: untied / tied / +projection regularisation, same seed and data."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..common.files import bench_dir, write_json
from ..common.locks import holds_lock
from ..common.report import markdown_table, plot_curves, write_text
from ..config import RunConfig, paper_proj_reg
from ..data.bundled import TextOptions
from ..data.corpus import load_corpus
from ..errors import LmembedError
from ..models.store import CHECKPOINT
from ..training.lm import train
from ..training.runs import finished_metrics

COMBOS = (("untied", "none", False), ("tied", "tied", False), ("untied+PR", "none", True), ("tied+PR", "tied", True))
BENCH_FILES = (*(c[0] for c in COMBOS), "tying.json", "tying.md", "tying.png")

# Press & Wolf 2017, Table 6 (PTB, small = 2x200 without dropout): params, valid, test perplexity.
PAPER_SMALL = {"untied": (4.65e6, 120.7, 114.5), "tied": (2.65e6, 117.5, 112.4),
               "untied+PR": (4.69e6, 116.0, 111.7), "tied+PR": (2.69e6, 104.9, 100.9)}


def pick_combos(names: str) -> tuple:
    """--models: a subset of COMBOS, in the table's order."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {c[0] for c in COMBOS}
    bad = [n for n in wanted if n not in known]
    if bad or not wanted:
        raise LmembedError(f"--models {names!r}: unknown {bad or 'empty list'}; expected some of {sorted(known)}")
    return tuple(c for c in COMBOS if c[0] in wanted)


@holds_lock("bench folder")
def bench_tying(base: RunConfig, out: str | Path, *, proj_reg: float | None = None, force: bool = False,
                progress: bool | None = None, log=print, combos: tuple = COMBOS,
                analysis: bool = True) -> dict[str, Any]:
    """Train the four combinations (reusing/resuming finished ones) and write tying.{json,md,png};
    with `analysis`, each row also gets the word-similarity and effective-rank columns of U and V."""
    pr = paper_proj_reg(base.batch_size, base.bptt) if proj_reg is None else proj_reg
    corpus = load_corpus(base.data, options=TextOptions.of(base))
    out = bench_dir(out, force=force, owned=BENCH_FILES)
    is_ptb = any(p.name.startswith("ptb.") for p in corpus.files.get("train", []))
    rows = []
    for name, tie, with_pr in combos:
        cfg = dataclasses.replace(base, tie=tie, proj_reg=pr if with_pr else 0.0)
        run = out / name
        metrics = finished_metrics(run, cfg)
        if metrics is None:
            log(f"== {name} ==")
            metrics = train(cfg, run, resume=(run / CHECKPOINT).exists(), corpus=corpus, progress=progress,
                            log=log)
        row = {"model": name, **{k: metrics[k] for k in ("tie", "proj_reg", "params", "embedding_params",
                                                         "valid_ppl", "test_ppl", "tokens_per_s", "epochs")}}
        row["history"] = [{k: r[k] for k in ("epoch", "valid_ppl", "train_ppl")} for r in metrics["history"]]
        if is_ptb and base.arch == "lstm" and base.preset == "small" and name in PAPER_SMALL:
            p_params, p_valid, p_test = PAPER_SMALL[name]
            row.update(paper_params=p_params, paper_valid_ppl=p_valid, paper_test_ppl=p_test,
                       valid_vs_paper=metrics["valid_ppl"] / p_valid - 1,
                       test_vs_paper=metrics["test_ppl"] / p_test - 1)
        rows.append(row)
    agreement = embedding_columns({r["model"]: out / r["model"] for r in rows}, rows, seed=base.seed,
                                  log=log) if analysis else []
    result = {"bench": "tying", "data": base.data, "arch": base.arch, "preset": base.preset, "seed": base.seed,
              "proj_reg": pr, "config": base.to_dict(), "rows": rows, "embedding_agreement": agreement}
    write_json(out / "tying.json", result)
    cols = ["model", "params", "valid_ppl", "test_ppl", "tokens_per_s"]
    if any("paper_test_ppl" in r for r in rows):
        cols += [("paper_params", "paper params"), ("paper_valid_ppl", "paper valid"), ("paper_test_ppl", "paper test"),
                 ("test_vs_paper", "test vs paper")]
    cols += [c for c in ANALYSIS_COLUMNS if any(c[0] in r for r in rows)]
    table = markdown_table(rows, cols)
    if agreement:
        table += ("\nAgreement of the embedding matrices (Spearman between the cosine similarities they give the "
                  "same sampled word pairs):\n\n" + markdown_table(agreement, [("a", "matrix A"), ("b", "matrix B"),
                                                                               ("spearman", "Spearman")]))
    curves = {r["model"]: ([h["epoch"] for h in r["history"]], [h["valid_ppl"] for h in r["history"]]) for r in rows}
    plot_curves(out / "tying.png", curves, xlabel="epoch", ylabel="validation perplexity", logy=True,
                title=f"weight tying: {base.arch}/{base.preset} on {Path(base.data).name}")
    write_text(out / "tying.md", f"# Weight tying (Press & Wolf 2017): {base.arch}/{base.preset} on {base.data}\n\n"
                                 f"Projection penalty lambda = {pr:.4g} (per token; see lmembed.config).\n\n{table}\n"
                                 "![validation perplexity per epoch](tying.png)\n")
    log(table)
    return result


ANALYSIS_COLUMNS = (("simlex999_U", "SimLex U"), ("simlex999_V", "SimLex V"), ("ws353_U", "WS353 U"),
                    ("ws353_V", "WS353 V"), ("erank_U", "eff. rank U"), ("erank_V", "eff. rank V"))


def embedding_columns(run_dirs: dict[str, Path], rows: list[dict[str, Any]], *, seed: int = 0,
                      log=print) -> list[dict[str, Any]]:
    """Add SimLex-999 / WS-353 Spearman and effective rank of U and V to each row (a tied run's one
    matrix fills both sides) and return the agreement between every pair of matrices across the runs.
    Skipped with a note when the benchmarks are unavailable (gensim not installed)."""
    from ..evaluation.embeddings import analyze_targets

    try:
        result, _ = analyze_targets([str(p) for p in run_dirs.values()], labels=list(run_dirs), analogies=None,
                                    words=[], seed=seed, log=lambda *_: None)
    except LmembedError as e:
        log(f"embedding analysis skipped: {e}")
        return []
    by_label = {t["label"]: t for t in result["targets"]}
    for row in rows:
        t = by_label.get(row["model"])
        if t is None:
            continue
        for side in ("U", "V"):
            m = t["matrices"].get(side) or t["matrices"].get("tied")
            if m is None:
                continue
            for bench, s in m["similarity"].items():
                row[f"{bench}_{side}"] = s["spearman"]
            row[f"erank_{side}"] = m["spectrum"]["effective_rank"]
    agreement = [{**a, "a": f"{t['label']}/{a['a']}", "b": f"{t['label']}/{a['b']}"}
                 for t in result["targets"] for a in t["agreement"]]
    return agreement + result["cross_agreement"]
