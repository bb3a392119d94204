"""Alignment quality of the bundled shakespeare-folio parallel corpus (issue 8).

    python benchmarks/folio_alignment.py                 # coverage + precision on the judged sample
    python benchmarks/folio_alignment.py --show 20       # also print the first 20 sampled pairs

Two numbers describe the alignment (lmembed.data.align, lmembed.data.folio):
- coverage: the share of spoken Folio lines and of modern lines that end up in a kept pair
  (from the corpus' alignment.json; lines without a counterpart in the other version, such as
  the acts missing from the sdist's modern Cymbeline, can never be kept);
- precision: a random sample of 100 kept pairs (random.Random(2024).sample over train, valid,
  test in that order) was judged by hand, once, in folio_alignment_check.tsv. A pair is correct
  only if both sides hold the same words, up to spelling, punctuation and word-level editorial
  variants ("I" -> "Ay", "then" -> "than", "y" -> "thou"); one extra or missing word from a
  different line break makes it wrong. (A separate sample, random.Random(8), was used to choose
  the filter thresholds and is not reported.)

The script redraws the sample from the current corpus and refuses to report precision if the
judged pairs are no longer the ones drawn (the corpus changed: judge a new sample).
Writes --out/folio-alignment.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
from pathlib import Path

from lmembed.common.files import write_json
from lmembed.common.report import markdown_table, write_text
from lmembed.data.folio import ALIGN_PARAMS, ALIGN_VERSION, folio_corpus_dir

CHECK = Path(__file__).with_name("folio_alignment_check.tsv")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def corpus_pairs(root: Path) -> list[dict[str, str]]:
    rows = []
    for split in ("train", "valid", "test"):
        src = (root / f"{split}.src").read_text(encoding="utf-8").splitlines()
        tgt = (root / f"{split}.tgt").read_text(encoding="utf-8").splitlines()
        meta = (root / f"{split}.meta.tsv").read_text(encoding="utf-8").splitlines()[1:]
        for m, s, t in zip(meta, src, tgt, strict=True):
            play, fl, ml = m.split("\t")[:3]
            rows.append({"play": play, "folio_lines": fl, "modern_lines": ml, "folio": s, "modern": t})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/seq2seq-alignment")
    ap.add_argument("--seed", type=int, default=2024, help="the judged sample's seed (do not change)")
    ap.add_argument("--show", type=int, default=0, metavar="N", help="print the first N sampled pairs")
    args = ap.parse_args(argv)

    root = folio_corpus_dir()
    total = json.loads((root / "alignment.json").read_text())["total"]
    judged = list(csv.DictReader(CHECK.open(encoding="utf-8"), delimiter="\t"))
    sample = random.Random(args.seed).sample(corpus_pairs(root), len(judged))
    for row in sample[: args.show]:
        print(f"{row['play']} {row['folio_lines']}:{row['modern_lines']} | {row['folio']} ||| {row['modern']}")
    stale = [j["i"] for j, s in zip(judged, sample, strict=True)
             if (j["play"], j["folio_lines"], j["modern_lines"], j["folio"], j["modern"])
             != (s["play"], s["folio_lines"], s["modern_lines"], s["folio"], s["modern"])]
    if stale:
        print(f"error: {len(stale)} judged pairs (e.g. #{stale[0]}) are not in the current corpus sample; the "
              f"corpus changed, judge a new sample into {CHECK}", file=sys.stderr)
        return 2
    correct = sum(int(j["correct"]) for j in judged)
    lo, hi = wilson(correct, len(judged))
    result = {
        "align_version": ALIGN_VERSION, "params": ALIGN_PARAMS, "pairs": total["pairs"],
        "folio_lines": total["folio_lines"], "modern_lines": total["modern_lines"],
        "folio_kept": total["folio_kept"], "modern_kept": total["modern_kept"], "beads": total["beads"],
        "sample_seed": args.seed, "sample_size": len(judged), "sample_correct": correct,
        "precision": correct / len(judged), "precision_ci95": [lo, hi],
        "errors": [{"i": int(j["i"]), "play": j["play"], "note": j["note"]} for j in judged if j["correct"] != "1"],
    }
    out = Path(args.out)
    write_json(out / "folio-alignment.json", result)
    table = markdown_table([{**result, "pairs": sum(total["pairs"].values()),
                             "ci": f"{lo:.1%} - {hi:.1%}"}],
                           ["pairs", ("folio_kept", "Folio lines kept"), ("modern_kept", "modern lines kept"),
                            ("precision", "precision (hand-judged)"), ("ci", "95 % CI"), "sample_size"])
    errors = "".join(f"- #{e['i']} {e['play']}: {e['note']}\n" for e in result["errors"])
    write_text(out / "folio-alignment.md", f"# shakespeare-folio: alignment quality\n\n{table}\nErrors in the "
                                           f"judged sample:\n\n{errors}")
    print(table + "\n" + errors, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
