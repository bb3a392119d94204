"""`lmembed bench finetune`: fine-tune one encoder with each compression method, one table.

Bałazy et al. report that after downstream fine-tuning, models with direction-aware (ae)
compressed embeddings converge faster and score higher than SVD ones. Per method this bench

1. compresses the model once (``--compress-seed``, independent of the fine-tuning seeds) and
   saves it to ``OUT/models/<method>/`` (reused when the bench resumes),
2. fine-tunes it with every seed (``OUT/runs/<method>/``, one cached result per seed),
3. writes a row to ``OUT/rows/<method>.json``,

then tabulates test accuracy and macro-F1 (mean ± std over seeds), epochs to 99 % of the final
validation accuracy, and the stored bytes, plots the mean validation curves, and compares ae
with svd at each rank both were run with (paired by fine-tuning seed).
"""

from __future__ import annotations

import copy
import hashlib
import re
import statistics
from pathlib import Path
from typing import Any

from ..common.files import read_json, write_json
from ..common.locks import holds_lock
from ..common.report import markdown_table, plot_curves, write_text
from ..compression import compress, save
from ..compression.api import check_method
from ..compression.integration.sites import find_sites
from ..compression.registry import parse_pipeline
from ..errors import LmembedError
from ..tasks import TextTask
from ..training.finetune import FinetuneConfig, finetune, finetune_settings, mean_std, open_run_dir, pm

DEFAULT_METHODS = "dense,svd:128,ae:128,int8,int4"
BENCH_FILES = ("settings.json", "rows", "runs", "models", "bench_finetune.json", "bench_finetune.md", "*.png")


def slug(method: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", method).strip("-") or "method"
    return f"{s}-{hashlib.sha1(method.encode()).hexdigest()[:6]}"


@holds_lock("bench folder")
def bench_finetune(model_spec: str, task: TextTask, out: str | Path, *, methods: str = DEFAULT_METHODS,
                   seeds: list[int], config: FinetuneConfig | None = None, split_seed: int = 0,
                   compress_seed: int = 0, force: bool = False, progress: bool | None = None,
                   log=print) -> dict[str, Any]:
    cfg = config or FinetuneConfig()
    cfg.check()
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    if not method_list:
        raise LmembedError("--methods: give at least one method, e.g. dense,svd:128,ae:128")
    if len(set(method_list)) != len(method_list):
        raise LmembedError(f"--methods {methods!r}: a method is listed twice")
    from ..models.pretrained import load_pretrained

    base, tok = load_pretrained(model_spec, task="base")
    sites = find_sites(base)
    v, d = sites.input_weight.shape
    for m in method_list:
        if m != "dense":
            check_method(m, v, d)  # every bad string fails before hours of work
    task = task.limit_train(cfg.max_train, seed=split_seed)
    out = Path(out)
    # seeds are not a setting: a bench rerun with more seeds reuses the cached ones and adds the rest
    settings = {**finetune_settings(model_spec, task, cfg), "compress_seed": compress_seed}
    open_run_dir(out, settings, force=force, what="finetune bench", owned=BENCH_FILES)
    rows = []
    for method in method_list:
        path = out / "rows" / f"{slug(method)}.json"
        row = read_json(path, "bench row") if path.is_file() else None
        if row is None or row.get("seeds") != list(seeds):
            target, comp = _model_for(method, model_spec, base, tok, out, compress_seed, progress, log)
            log(f"--- {method}: fine-tuning {len(seeds)} seed(s)")
            rep = finetune(target, task, out / "runs" / slug(method), config=cfg, seeds=seeds,
                           split_seed=split_seed, progress=progress, log=log)
            row = _row(method, rep, comp)
            write_json(path, row)
        rows.append(row)
        log(f"{method:>16s}: test accuracy {row['accuracy']} %, macro-F1 {row['macro_f1']} %, epochs to 99 % "
            f"{row['epochs_99']}, {row['ratio']:.1f}x")
    comparisons = compare_ae_svd(rows)
    result = {"bench": "finetune", **settings, "seeds": list(seeds), "shape": [v, d], "rows": rows,
              "comparisons": comparisons}
    write_json(out / "bench_finetune.json", result)
    _write_report(out, result)
    return result


def _model_for(method: str, model_spec: str, base, tok, out: Path, compress_seed: int, progress, log
               ) -> tuple[str, dict[str, Any] | None]:
    """(what to fine-tune, compression report): the model itself for dense, else a saved folder."""
    if method == "dense":
        return model_spec, None
    folder = out / "models" / slug(method)
    if (folder / "lmembed.json").is_file():  # written last by save: the folder is complete
        return str(folder), read_json(folder / "lmembed.json", "lmembed manifest").get("report")
    log(f"--- {method}: compressing (seed {compress_seed})")
    model = copy.deepcopy(base)
    rep = compress(model, method, side="input", seed=compress_seed, progress=progress, log=log)
    save(model, folder, tokenizer=tok, force=True, report=rep)
    return str(folder), rep


def _row(method: str, rep: dict[str, Any], comp: dict[str, Any] | None) -> dict[str, Any]:
    s, e = rep["summary"], rep["embedding"]
    m = (comp or {}).get("matrices", [{}])[0]
    return {
        "method": method, "kind": e["kind"], "stored_bytes": e["stored_bytes"], "ratio": e["ratio"],
        "trainable_embedding_params": rep["trainable"]["trainable_params"],
        "accuracy": pm(s["test_accuracy"], 100), "macro_f1": pm(s["test_macro_f1"], 100),
        "epochs_99": pm(s["epochs_to_99"]), "summary": s,
        "test_accuracy": s["test_accuracy"]["values"], "seeds": rep["seeds"],
        "mean_row_cosine": m.get("mean_row_cosine", 1.0 if comp is None else None),
        "rel_fro_error": m.get("rel_fro_error", 0.0 if comp is None else None),
        "compress_seconds": (comp or {}).get("seconds", 0.0),
    }


def _rank_of(method: str, name: str) -> int | None:
    try:
        stages = parse_pipeline(method)
    except LmembedError:
        return None
    if len(stages) == 1 and stages[0].name == name:
        return int(stages[0].rank)
    return None


def compare_ae_svd(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rank with both an `ae:k` and an `svd:k` row: paired test-accuracy differences ae - svd."""
    out = []
    for ae in rows:
        k = _rank_of(ae["method"], "ae")
        svd = next((r for r in rows if k is not None and _rank_of(r["method"], "svd") == k), None)
        if svd is None:
            continue
        pairs = {sd: a for sd, a in zip(ae["seeds"], ae["test_accuracy"], strict=True)}
        diffs = [100 * (pairs[sd] - b) for sd, b in zip(svd["seeds"], svd["test_accuracy"], strict=True)
                 if sd in pairs]
        if not diffs:
            continue
        stat = mean_std(diffs)
        wins = sum(x >= 0 for x in diffs)
        out.append({"rank": k, "ae": ae["method"], "svd": svd["method"], "diff_points": stat,
                    "ae_at_least_svd_seeds": wins, "seeds": len(diffs), "holds": stat["mean"] >= 0,
                    "text": f"rank {k}: ae - svd = {pm(stat)} accuracy points over {len(diffs)} paired seeds; "
                            f"ae >= svd in {wins}/{len(diffs)} seeds; "
                            f"{'holds' if stat['mean'] >= 0 else 'does not hold'} on average"})
    return out


def _write_report(out: Path, result: dict[str, Any]) -> None:
    rows = result["rows"]
    curves = {r["method"]: (r["summary"]["mean_curve"]["epoch"], r["summary"]["mean_curve"]["valid_accuracy"])
              for r in rows if r["summary"].get("mean_curve")}
    plot_curves(out / "bench_finetune.png", curves, xlabel="epoch", ylabel="validation accuracy (mean over seeds)",
                title=f"{result['model']} on {result['task']['name']}")
    table = markdown_table(rows, [("method", "method"), ("stored_bytes", "bytes"), ("ratio", "ratio"),
                                  ("trainable_embedding_params", "trainable emb. params"),
                                  ("accuracy", "test acc %"), ("macro_f1", "test macro-F1 %"),
                                  ("epochs_99", "epochs to 99 %"), ("mean_row_cosine", "row cos"),
                                  ("compress_seconds", "compress s")])
    t, c = result["task"], result["config"]
    sizes = ", ".join(f"{k} {v}" for k, v in t["sizes"].items())
    comp = "\n".join(f"- {x['text']}" for x in result["comparisons"]) or "- (no ae/svd pair of equal rank)"
    secs = [statistics.fmean(r["summary"]["seconds"]["values"]) for r in rows]
    text = (f"# Fine-tuning with compressed embeddings: {result['model']} on {t['name']}\n\n"
            f"Task: {t['source']}; {sizes}; {t['split_rule']}.\n\n"
            f"Seeds {', '.join(map(str, result['seeds']))} (mean ± sample std); compression seed "
            f"{result['compress_seed']}; {c['epochs']} epochs, lr {c['lr']:g}, batch {c['batch_size']}, max length "
            f"{c['max_length']}, embeddings `{c['embeddings']}`, {c['pooling']} pooling, {c['evals_per_epoch']} "
            f"validation score(s) per epoch. Bytes: the stored token-embedding tensors (dense in fp32).\n\n{table}\n"
            f"ae vs svd (paired by fine-tuning seed, test accuracy):\n\n{comp}\n\n"
            f"Mean fine-tuning time per seed: {statistics.fmean(secs):.0f} s.\n\n"
            "![mean validation accuracy per method](bench_finetune.png)\n")
    write_text(out / "bench_finetune.md", text)
