"""lmembed finetune: a classification head on a (compressed) encoder, fine-tuned over several seeds."""

from __future__ import annotations

import argparse

from ..config import FinetuneConfig
from ..tasks import BUNDLED, TextTask, load_task
from ..training.finetune import finetune, iter_seeds, pm
from .args import add_config_flags, finetune_config_from_args, progress_flag


def add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--task", required=True,
                   help=f"bundled task ({', '.join(f'{k}: {v}' for k, v in BUNDLED.items())}), a .csv/.tsv/.jsonl "
                        "file (split 80/10/10 by --split-seed), or a folder with train.EXT [valid|dev.EXT] [test.EXT]")
    g.add_argument("--text-col", default="text", help="text column; 'a,b' for sentence pairs (default: text)")
    g.add_argument("--label-col", default="label", help="label column (default: label)")
    g.add_argument("--format", dest="fmt", choices=["csv", "tsv", "jsonl"], help="file format (default: from suffix)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/valid/test split and of --max-train "
                                                             "(fixed across --seeds)")
    g.add_argument("--max-train", type=int, metavar="N", help="train on N randomly chosen training examples")


def add_training_args(p: argparse.ArgumentParser, *, default_seeds: int = 3) -> None:
    add_config_flags(p, FinetuneConfig, from_preset=False)
    g = p.add_argument_group("seeds")
    g.add_argument("--freeze-embeddings", action="store_true", help="same as --embeddings freeze")
    g.add_argument("--seed", type=int, default=0, help="first fine-tuning seed")
    g.add_argument("--seeds", type=int, default=default_seeds, help="number of seeds: --seed, --seed+1, ...")


def task_from_args(args: argparse.Namespace) -> TextTask:
    return load_task(args.task, text_col=args.text_col, label_col=args.label_col, fmt=args.fmt,
                     split_seed=args.split_seed, log=print)


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a (compressed) encoder for text classification over seeds",
                       description="Put a classification head on MODEL (a bundled name, a transformers folder or "
                                   "hub id, or a folder written by `lmembed compress`), fine-tune it on --task once "
                                   "per seed and write finetune.{json,md}, curves.png and loss.png to --out.")
    p.add_argument("model", help="bundled name (minilm), transformers folder, hub id, or compressed model folder")
    p.add_argument("--out", required=True, help="output folder (an interrupted run resumes with the same command)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    add_finetune_args(p)
    p.set_defaults(func=run)


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    """Task, fine-tuning and seed flags (also those of `bench finetune`)."""
    add_task_args(p)
    add_training_args(p)
    progress_flag(p)


def finetune_inputs(args: argparse.Namespace) -> tuple[FinetuneConfig, list[int], TextTask]:
    """(config, seeds, task) from the flags of add_finetune_args, all checked before any model loads."""
    cfg = finetune_config_from_args(args)
    return cfg, list(iter_seeds(args.seed, args.seeds)), task_from_args(args)


def run(args) -> int:
    cfg, seeds, task = finetune_inputs(args)
    report = finetune(args.model, task, args.out, config=cfg, seeds=seeds, split_seed=args.split_seed,
                      force=args.force, progress=args.progress)
    s = report["summary"]
    print(f"{args.model} on {report['task']['name']} ({len(seeds)} seed{'s' * (len(seeds) > 1)}): test accuracy "
          f"{pm(s['test_accuracy'], 100)} %, macro-F1 {pm(s['test_macro_f1'], 100)} %, epochs to 99 % "
          f"{pm(s['epochs_to_99'])}")
    print(f"report: {args.out}/finetune.md")
    return 0
