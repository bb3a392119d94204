"""lmembed analyze: input vs output vs tied embedding quality of runs and pretrained models."""

from __future__ import annotations

from ..common.files import check_out_dir
from ..common.locks import locked
from ..common.report import markdown_table
from ..common.runtime import seed_everything
from ..errors import LmembedError
from ..evaluation.embeddings import (
    DEFAULT_WORDS,
    agreement_rows,
    analyze_targets,
    table_columns,
    table_rows,
    write_analysis,
)
from ..evaluation.similarity import DEFAULT_ANALOGIES, DEFAULT_BENCHMARKS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "analyze", help="word similarity, effective rank and neighbours of U / V / tied embeddings",
        description="Measure every embedding matrix of lmembed runs or transformers models: U (input) and V "
                    "(output) of untied models, the one matrix of tied models. Targets that share a vocabulary "
                    "are compared with each other too (e.g. an untied and a tied run).")
    p.add_argument("targets", nargs="+", metavar="RUN|MODEL",
                   help="run directory, bundled model (minilm, smollm2), model folder or hub id")
    p.add_argument("--out", required=True, help="folder for analysis.json, analysis.md, spectra.png, similarity.png")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--words", help="comma-separated words for the neighbour table "
                                   f"(default: {','.join(DEFAULT_WORDS)})")
    p.add_argument("--neighbours", type=int, default=8, metavar="K", help="neighbours per word (default 8)")
    p.add_argument("--benchmark", action="append", metavar="NAME|FILE",
                   help="word-similarity benchmark: simlex999, ws353 or a 'word1 word2 score' file (MEN, RW, "
                        f"Verb-143, ...); repeatable (default: {', '.join(DEFAULT_BENCHMARKS)})")
    p.add_argument("--analogies", default=DEFAULT_ANALOGIES, metavar="NAME|FILE|none",
                   help="analogy questions in questions-words format, or 'none' (default: %(default)s)")
    p.add_argument("--pair-words", type=int, default=2000, metavar="N",
                   help="words sampled for matrix-to-matrix agreement and anisotropy (all pairs among them)")
    p.add_argument("--pair-top", type=int, metavar="N",
                   help="draw those words from the first N rows only (lmembed word vocabularies are sorted by "
                        "frequency: the N most frequent words; untrained rare rows keep their initial values)")
    p.add_argument("--compress", metavar="SPEC", help="compress each model first (lmembed.compress spec, e.g. svd:128)")
    p.add_argument("--task", default="auto", help="transformers head: auto, causal-lm, masked-lm, base")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the word sample for agreement and anisotropy")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.neighbours < 1 or args.pair_words < 2:
        raise LmembedError("--neighbours must be >= 1 and --pair-words >= 2")
    out = check_out_dir(args.out, force=args.force)  # written, all at once, once the analysis is done
    with locked(out, "analysis folder"):
        return _run(args, out)


def _run(args, out) -> int:
    seed_everything(args.seed)
    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else None
    analogies = None if str(args.analogies).lower() == "none" else args.analogies
    result, plot = analyze_targets(args.targets, compress=args.compress, device=args.device, task=args.task,
                                   benchmarks=args.benchmark, analogies=analogies, words=words, k=args.neighbours,
                                   pair_words=args.pair_words, pair_top=args.pair_top, seed=args.seed)
    write_analysis(result, plot, out)
    print(markdown_table(table_rows(result), table_columns(result)), end="")
    agree = agreement_rows(result)
    if agree:
        print()
        print(markdown_table(agree, [("a", "matrix A"), ("b", "matrix B"), ("spearman", "Spearman")]), end="")
    print(f"wrote {out}/analysis.{{json,md}}, spectra.png, similarity.png")
    return 0
