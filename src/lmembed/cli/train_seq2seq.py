"""lmembed train-seq2seq: one encoder-decoder (translation) run with a tie mode."""

from __future__ import annotations

from ..config import Seq2SeqConfig
from ..training.seq2seq import train_seq2seq
from .args import add_config_flags, add_run_dir_args, seq2seq_config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("train-seq2seq", help="train an encoder-decoder on a parallel corpus, with a tie mode",
                       description="Train an encoder-decoder Transformer on a parallel corpus (DIR with "
                                   "train/valid/test .src/.tgt, or shakespeare-folio); reports perplexity, "
                                   "BLEU and chrF (greedy and beam search).")
    add_config_flags(p, Seq2SeqConfig)
    add_run_dir_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    train_seq2seq(seq2seq_config_from_args(args), args.out, force=args.force, resume=args.resume,
                  progress=args.progress)
    return 0
