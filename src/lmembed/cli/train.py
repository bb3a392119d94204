"""lmembed train: one language model run."""

from __future__ import annotations

from ..config import RunConfig
from ..training.lm import train
from .args import add_config_flags, add_run_dir_args, lm_config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a word-level LM (LSTM or Transformer), tied or untied",
                       description="Train a language model; writes config, checkpoints, metrics.json, report.md.")
    add_config_flags(p, RunConfig)
    add_run_dir_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    train(lm_config_from_args(args), args.out, force=args.force, resume=args.resume, progress=args.progress)
    return 0
