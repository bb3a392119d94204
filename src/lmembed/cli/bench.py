"""lmembed bench NAME: the benchmarks that reproduce the papers' tables (lmembed.bench), as
subcommands. Each bench module is pure API; its flags live here."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..bench.compress import DEFAULT_METHODS as COMPRESS_METHODS
from ..bench.compress import bench_compress
from ..bench.embeddings import DEFAULT_METHODS as EMBEDDING_METHODS
from ..bench.embeddings import DEFAULT_MODELS, bench_embeddings
from ..bench.finetune import DEFAULT_METHODS as FINETUNE_METHODS
from ..bench.finetune import bench_finetune
from ..bench.peers import DEFAULT_BITS, DEFAULT_PEERS, bench_peers
from ..bench.peers import DEFAULT_METHODS as PEERS_METHODS
from ..bench.seq2seq_tying import bench_seq2seq_tying
from ..bench.tying import COMBOS, bench_tying, pick_combos
from ..compression.registry import describe_methods
from ..config import RunConfig, Seq2SeqConfig
from ..errors import LmembedError
from ..evaluation.pretrained import EVAL_TOKENS
from ..evaluation.similarity import DEFAULT_ANALOGIES
from .args import (
    add_config_flags,
    calib_flags,
    config_values,
    lm_config_from_args,
    progress_flag,
    seq2seq_config_from_args,
)
from .finetune import add_finetune_args, finetune_inputs

BENCHES = ("tying", "compress", "embeddings", "finetune", "peers")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="reproduce a paper table: tying, compress, embeddings, finetune, peers",
                       description="Benchmarks: each prints a table and writes JSON, Markdown and a PNG.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCHES:
        globals()[f"add_{name}"](bsub)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _methods_help() -> str:
    return "Methods:\n" + describe_methods()


# --- tying ------------------------------------------------------------------------------------
def add_tying(sub) -> None:
    p = sub.add_parser("tying", help="untied / tied / +PR (Press & Wolf 2017, Table 6); --seq2seq: translation",
                       description="Train the four tying combinations with the same seed; print one table. "
                                   "With --seq2seq: encoder-decoder models untied / decoder / three-way tied "
                                   "(Press & Wolf 2017, section 6) on a parallel corpus (default shakespeare-folio).")
    p.add_argument("--seq2seq", action="store_true",
                   help="translation models: none / decoder / three-way tying; params, BLEU, chrF")
    add_config_flags(p, RunConfig, skip=("tie", "proj_reg"))
    add_config_flags(p, Seq2SeqConfig, skip=("tie",))  # flags both share (--lr, --epochs, ...) serve both
    p.add_argument("--proj-reg", type=float, default=None, metavar="LAMBDA",
                   help="penalty for the +PR rows (default: Press & Wolf's, 1/(13*batch*bptt))")
    p.add_argument("--models", default=",".join(c[0] for c in COMBOS),
                   help="comma-separated subset of " + ", ".join(c[0] for c in COMBOS) + " (default: all four)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="retrain everything in --out")
    p.add_argument("--analysis", action=argparse.BooleanOptionalAction, default=True,
                   help="SimLex-999 / WS-353 Spearman and effective rank of U and V per row (default: on)")
    progress_flag(p)
    p.set_defaults(func=run_tying)


def _only_for(args: argparse.Namespace, given_cls: type, other_cls: type, what: str) -> None:
    """Refuse flags that only `other_cls` (the model family not being benched) has."""
    own = {f.name for f in fields(given_cls)}
    stray = [n for n, v in config_values(args, other_cls).items() if v is not None and n not in own]
    if stray:
        raise LmembedError(f"bench tying{' --seq2seq' if what == 'translation' else ''}: "
                           f"{', '.join('--' + n.replace('_', '-') for n in stray)} do not apply to {what} models")


def run_tying(args: argparse.Namespace) -> int:
    if args.seq2seq:
        _only_for(args, Seq2SeqConfig, RunConfig, "translation")
        base = seq2seq_config_from_args(args, tie="none", shared_vocab=None)
        bench_seq2seq_tying(base, args.out, shared_vocab=args.shared_vocab is not False, force=args.force,
                            progress=args.progress)
        return 0
    _only_for(args, RunConfig, Seq2SeqConfig, "language")
    base = lm_config_from_args(args, tie="none", proj_reg=0.0)
    bench_tying(base, args.out, proj_reg=args.proj_reg, force=args.force, progress=args.progress,
                analysis=args.analysis, combos=pick_combos(args.models))
    return 0


# --- compress ---------------------------------------------------------------------------------
def add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a pretrained model's embeddings with many methods: table + Pareto",
                       description="Compress MODEL's token embeddings with each method (and side protocol), "
                                   "evaluate each on a held-out text, and write compress.{json,md,png}.\n\n"
                                   + _methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="bundled name (minilm, smollm2), local HF folder, hub id, or an lmembed run dir")
    p.add_argument("--data", default="lee:train", help="evaluation text: file, folder, or bundled corpus[:split]")
    p.add_argument("--methods", default=COMPRESS_METHODS, help="comma-separated method strings or pipelines")
    p.add_argument("--sides", default="auto", help="auto (tied models: input,both), or a list of input/output/both")
    p.add_argument("--max-tokens", type=int, default=EVAL_TOKENS, help="evaluate on the first N tokens of the text")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="start over in a non-empty --out")
    calib_flags(p, apart_from="--data")
    progress_flag(p)
    p.set_defaults(func=lambda args: bench_compress(
        args.model, args.out, text=args.data, methods=args.methods, sides=args.sides, max_tokens=args.max_tokens,
        seed=args.seed, force=args.force, progress=args.progress, calib=args.calib,
        calib_tokens=args.calib_tokens) and 0)


# --- embeddings -------------------------------------------------------------------------------
def add_embeddings(sub) -> None:
    p = sub.add_parser("embeddings", help="word similarity kept by each compression method (SimLex, WS-353)",
                       description="Analyse models as loaded and after each compression method: word-similarity "
                                   "Spearman, analogy accuracy, effective rank and agreement with the original.")
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated runs or models (default: %(default)s)")
    p.add_argument("--methods", default=EMBEDDING_METHODS,
                   help="comma-separated lmembed.compress methods or pipelines (default: %(default)s)")
    p.add_argument("--benchmark", action="append", metavar="NAME|FILE",
                   help="word-similarity benchmark (default: simlex999 and ws353); repeatable")
    p.add_argument("--analogies", default=DEFAULT_ANALOGIES, metavar="NAME|FILE|none")
    p.add_argument("--pair-words", type=int, default=2000, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=run_embeddings)


def run_embeddings(args: argparse.Namespace) -> int:
    bench_embeddings([m.strip() for m in args.models.split(",") if m.strip()],
                     [m.strip() for m in args.methods.split(",") if m.strip()], args.out, benchmarks=args.benchmark,
                     analogies=None if str(args.analogies).lower() == "none" else args.analogies,
                     pair_words=args.pair_words, seed=args.seed, force=args.force)
    return 0


# --- finetune ---------------------------------------------------------------------------------
def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune one encoder with each compression method: accuracy table + curves",
                       description="Compress MODEL's token embeddings with each method, fine-tune each on --task "
                                   "over --seeds seeds, and write bench_finetune.{json,md,png}. 'dense' is the "
                                   "uncompressed model.\n\n" + _methods_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="bundled name (minilm), transformers folder or hub id")
    p.add_argument("--methods", default=FINETUNE_METHODS, help="comma-separated: dense and method strings/pipelines")
    p.add_argument("--compress-seed", type=int, default=0, help="seed of the compression fits (one per method)")
    p.add_argument("--out", required=True, help="output folder (an interrupted bench resumes with the same command)")
    p.add_argument("--force", action="store_true", help="start over in a non-empty --out")
    add_finetune_args(p)
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    cfg, seeds, task = finetune_inputs(args)
    result = bench_finetune(args.model, task, args.out, methods=args.methods, seeds=seeds,
                            config=cfg, split_seed=args.split_seed, compress_seed=args.compress_seed,
                            force=args.force, progress=args.progress)
    for c in result["comparisons"]:
        print(c["text"])
    print(f"report: {args.out}/bench_finetune.md")
    return 0


# --- peers ------------------------------------------------------------------------------------
def add_peers(sub) -> None:
    p = sub.add_parser("peers", help="lmembed's quantisers vs gguf, hqq, quanto, torchao at equal bits per value",
                       description="Score lmembed's methods and each installed peer library's quantisers on one "
                                   "model's embedding matrix with the same evaluation, and name the best of each "
                                   "within every --bits budget. Peer rows evaluate the peer's dequantised matrix; "
                                   "a peer that is not installed gives 'not installed' rows. Writes peers.json, "
                                   "peers.md and peers.png; an interrupted bench resumes with the same command.")
    p.add_argument("model", help="bundled name (smollm2, minilm), transformers folder or hub id")
    p.add_argument("--data", default="wiki:test", help="evaluation text: file, folder, or bundled corpus[:split]")
    p.add_argument("--bits", default=DEFAULT_BITS, help="budgets in stored bits per value (default: %(default)s)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated lmembed methods (default: {PEERS_METHODS} and calibrated ones); '' for none")
    p.add_argument("--peers", default=DEFAULT_PEERS,
                   help="comma-separated families (their default settings) or family:SETTING, e.g. hqq:4b-g64, "
                        "gguf:Q4_0, quanto:qint4-g32, torchao:int4-g32-asym (default: %(default)s)")
    calib_flags(p, apart_from="--data")
    p.add_argument("--max-tokens", type=int, default=EVAL_TOKENS, help="evaluate on the first N tokens of the text")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="start over in a non-empty --out")
    progress_flag(p)
    p.set_defaults(func=run_peers)


def run_peers(args: argparse.Namespace) -> int:
    bench_peers(args.model, args.out, text=args.data, bits=args.bits, methods=args.methods, peers=args.peers,
                calib=args.calib, calib_tokens=args.calib_tokens, max_tokens=args.max_tokens, seed=args.seed,
                force=args.force, progress=args.progress)
    print(f"report: {args.out}/peers.md")
    return 0
