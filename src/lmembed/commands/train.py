"""lmembed train: one language model run."""

from __future__ import annotations

from ..train import train
from .common import add_data_args, add_model_args, config_from_args, progress_flag


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a word-level LM (LSTM or Transformer), tied or untied",
                       description="Train a language model; writes config, checkpoints, metrics.json, report.md.")
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    progress_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = config_from_args(args)
    train(cfg, args.out, force=args.force, resume=args.resume, progress=args.progress)
    return 0
