"""Press & Wolf 2017, section 6: translation models untied / decoder-tied / three-way tied.

Reached through ``lmembed bench tying --seq2seq``.
The three runs share seed, data and, by default, one BPE vocabulary, so the tie mode is the only
difference; with --no-shared-vocab the none and decoder rows use one vocabulary per side (the
three-way row cannot). The table reports the parameter reduction against the untied model beside
the paper's figure: three-way tying cut their models' size by about 52 % with no loss in BLEU.
The reduction is 2*V*d / total for a shared vocabulary V and width d, so it depends on how much
of the model the embeddings are: large vocabularies and small Transformer bodies give more.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..common.files import bench_dir, write_json
from ..common.locks import holds_lock
from ..common.report import markdown_table, plot_curves, write_text
from ..config import SEQ2SEQ_TIE_MODES, Seq2SeqConfig
from ..data.parallel import load_parallel
from ..models.store import CHECKPOINT
from ..training.runs import finished_metrics
from ..training.seq2seq import train_seq2seq

PAPER_REDUCTION = 0.52  # Press & Wolf 2017: three-way tying "reduces model size by about half" (~52 %)


@holds_lock("bench folder")
def bench_seq2seq_tying(base: Seq2SeqConfig, out: str | Path, *, shared_vocab: bool = True, force: bool = False,
                        progress: bool | None = None, log=print, modes: tuple[str, ...] = SEQ2SEQ_TIE_MODES
                        ) -> dict[str, Any]:
    """Train one run per tie mode (reusing finished ones, resuming interrupted ones) and write
    tying-seq2seq.{json,md,png} in `out`."""
    text = load_parallel(base.data)
    out = bench_dir(out, force=force, owned=(*SEQ2SEQ_TIE_MODES, "tying-seq2seq.json", "tying-seq2seq.md",
                                              "tying-seq2seq.png"))
    rows: list[dict[str, Any]] = []
    for tie in modes:
        cfg = dataclasses.replace(base, tie=tie, shared_vocab=shared_vocab or tie == "three-way")
        run = out / tie
        metrics = finished_metrics(run, cfg)
        if metrics is None:
            log(f"== {tie} ==")
            metrics = train_seq2seq(cfg, run, resume=(run / CHECKPOINT).exists(), text=text,
                                    progress=progress, log=log)
        row = {"model": tie, **{k: metrics[k] for k in (
            "shared_vocab", "src_vocab", "tgt_vocab", "params", "embedding_params", "valid_ppl", "test_ppl",
            "test_bleu", "test_chrf", "test_bleu_greedy", "test_chrf_greedy", "test_copy_bleu", "test_copy_chrf",
            "test_eval_pairs", "epochs", "train_seconds")}}
        row["history"] = [{k: r.get(k) for k in ("epoch", "valid_ppl", "valid_bleu", "train_loss")}
                          for r in metrics["history"]]
        rows.append(row)
    ref = next((r for r in rows if r["model"] == "none"), None)
    if ref is not None:
        for r in rows:
            r["param_reduction"] = 1 - r["params"] / ref["params"]
            r["bleu_vs_none"] = r["test_bleu"] - ref["test_bleu"]
            r["chrf_vs_none"] = r["test_chrf"] - ref["test_chrf"]
    result = {"bench": "tying-seq2seq", "data": base.data, "preset": base.preset, "seed": base.seed,
              "shared_vocab": shared_vocab, "paper_reduction": PAPER_REDUCTION, "config": base.to_dict(),
              "rows": rows}
    write_json(out / "tying-seq2seq.json", result)
    shown = [{**r, "reduction": f"{r['param_reduction']:.1%}" if "param_reduction" in r else None,
              "delta": f"{r['bleu_vs_none']:+.2f}" if "bleu_vs_none" in r else None} for r in rows]
    if rows:  # the baseline every normaliser must beat: output the source unchanged
        shown.append({"model": "copy source", "test_bleu": rows[0]["test_copy_bleu"],
                      "test_chrf": rows[0]["test_copy_chrf"]})
    table = markdown_table(shown, ["model", "params", "embedding_params", ("reduction", "size reduction"),
                                   "valid_ppl", ("test_bleu", f"BLEU (beam {base.beam})"), ("delta", "BLEU vs none"),
                                   ("test_chrf", "chrF"), ("test_bleu_greedy", "BLEU (greedy)"),
                                   ("train_seconds", "train s")])
    copy = (f"Test set: {rows[0]['test_eval_pairs']:,} pairs; \"copy source\" outputs the Folio line unchanged."
            if rows else "")
    vocab = ("one shared BPE vocabulary for all rows" if shared_vocab else
             "separate source/target vocabularies for none and decoder, a shared one for three-way")
    curves = {r["model"]: ([h["epoch"] for h in r["history"]], [h["valid_ppl"] for h in r["history"]]) for r in rows}
    plot_curves(out / "tying-seq2seq.png", curves, xlabel="epoch", ylabel="validation perplexity",
                title=f"seq2seq weight tying: {base.preset} on {Path(base.data).name}")
    write_text(out / "tying-seq2seq.md",
               f"# Translation weight tying (Press & Wolf 2017): seq2seq/{base.preset} on {base.data}\n\n"
               f"Seed {base.seed}, {vocab}; size reduction is against the untied model (paper: about "
               f"{PAPER_REDUCTION:.0%} for three-way tying, with no loss in BLEU). {copy}\n\n{table}\n"
               "![validation perplexity per epoch](tying-seq2seq.png)\n")
    log(table)
    return result
