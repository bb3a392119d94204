"""Flags shared by several subcommands."""

from __future__ import annotations

import argparse

from ..config import ARCHS, TIE_MODES, make_config


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shakespeare",
                   help="bundled corpus name or a directory in PTB / WikiText / {train,valid,test}.txt layout")
    g.add_argument("--tokenize", choices=["whitespace", "words"], help="split on whitespace (pre-tokenised "
                   "corpora) or into words and punctuation (raw text); default: the corpus' own")
    g.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--max-vocab", type=int, help="keep the N most frequent words, the rest become <unk>")
    g.add_argument("--min-freq", type=int, help="words seen fewer times in train become <unk>")
    g.add_argument("--bpe", type=int, metavar="N", help="byte-level BPE vocabulary of size N instead of words")
    g.add_argument("--train-tokens", type=int, metavar="N", help="train on the first N tokens only")


def add_model_args(p: argparse.ArgumentParser, *, tie: bool = True) -> None:
    g = p.add_argument_group("model and optimisation (defaults come from --preset)")
    g.add_argument("--arch", default="lstm", choices=ARCHS)
    g.add_argument("--preset", default="small", help="lstm: tiny, demo, small, medium, large; transformer: tiny, small")
    if tie:
        g.add_argument("--tie", default="none", choices=TIE_MODES, help="tied: one matrix for input and output (U = V)")
        g.add_argument("--proj-reg", type=float, default=0.0, metavar="LAMBDA",
                       help="projection P before the output embedding with penalty LAMBDA*||P||^2 added to the "
                            "mean token loss (0 = off; Press & Wolf's setting is 1/(13*batch*bptt))")
    g.add_argument("--proj-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="give the projection P a bias (default: yes, as in Press & Wolf's code; "
                        "--no-proj-bias: P alone, as the paper writes it)")
    for flag, typ in (("--epochs", int), ("--max-steps", int),
                      ("--lr", float), ("--batch-size", int), ("--bptt", int), ("--clip", float),
                      ("--dropout", float), ("--emb-dim", int), ("--hidden", int), ("--layers", int),
                      ("--eval-batch-size", int)):
        g.add_argument(flag, type=typ)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    g.add_argument("--ce-chunk", type=int, metavar="N",
                   help="chunked softmax cross-entropy, N tokens at a time: never holds all (tokens x V) logits "
                        "(large vocabularies)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")


def config_from_args(args: argparse.Namespace, **fixed):
    """RunConfig from the preset plus every flag the user gave."""
    names = ["data", "tokenize", "lowercase", "max_vocab", "min_freq", "bpe", "train_tokens", "tie", "proj_reg",
             "proj_bias", "epochs", "max_steps", "lr", "batch_size", "bptt", "clip", "dropout", "emb_dim", "hidden",
             "layers", "eval_batch_size", "seed", "device", "amp", "ce_chunk", "compile"]
    over = {n: getattr(args, n, None) for n in names}
    over.update(fixed)
    return make_config(args.arch, args.preset, **over)


def progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when writing to a terminal)")


def add_run_dir_args(p: argparse.ArgumentParser) -> None:
    """--out/--force/--resume/--progress of the training commands."""
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    progress_flag(p)
