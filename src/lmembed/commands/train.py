"""lmembed train: one language model run."""

from __future__ import annotations

from ..train import train
from .common import add_data_args, add_model_args, add_run_dir_args, config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a word-level LM (LSTM or Transformer), tied or untied",
                       description="Train a language model; writes config, checkpoints, metrics.json, report.md.")
    add_data_args(p)
    add_model_args(p)
    add_run_dir_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = config_from_args(args)
    train(cfg, args.out, force=args.force, resume=args.resume, progress=args.progress)
    return 0
