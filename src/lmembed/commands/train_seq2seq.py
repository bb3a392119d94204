"""lmembed train-seq2seq: one encoder-decoder (translation) run with a tie mode."""

from __future__ import annotations

import argparse

from ..seq2seq_config import SEQ2SEQ_PRESETS, SEQ2SEQ_TIE_MODES, make_seq2seq_config
from .common import add_run_dir_args

# flag -> (config field, type); all default to the preset's value
FLAGS = {
    "--bpe": ("bpe", int), "--max-len": ("max_len", int), "--train-pairs": ("train_pairs", int),
    "--d-model": ("d_model", int), "--enc-layers": ("enc_layers", int), "--dec-layers": ("dec_layers", int),
    "--heads": ("heads", int), "--ff": ("ff", int), "--dropout": ("dropout", float),
    "--epochs": ("epochs", int), "--max-steps": ("max_steps", int), "--lr": ("lr", float),
    "--warmup-steps": ("warmup_steps", int), "--batch-size": ("batch_size", int), "--clip": ("clip", float),
    "--label-smoothing": ("label_smoothing", float), "--beam": ("beam", int), "--len-penalty": ("len_penalty", float),
    "--bleu-sample": ("bleu_sample", int), "--eval-pairs": ("eval_pairs", int),
}


def add_seq2seq_args(p: argparse.ArgumentParser, *, tie: bool = True, skip_existing: bool = False) -> None:
    """Data, model and optimisation flags of a seq2seq run. `bench tying --seq2seq` passes
    skip_existing: flags its LM parser already has (--lr, --epochs, ...) keep that definition."""
    g = p.add_argument_group("seq2seq data, model and optimisation (defaults come from --preset)")
    if tie:
        g.add_argument("--tie", default="none", choices=SEQ2SEQ_TIE_MODES,
                       help="none: 3 matrices; decoder: decoder input = output embedding; three-way: also the "
                            "encoder's (needs --shared-vocab)")
    g.add_argument("--shared-vocab", action=argparse.BooleanOptionalAction, default=None,
                   help="one BPE vocabulary trained on both sides (required by --tie three-way)")
    for flag, (_, typ) in FLAGS.items():
        if skip_existing and flag in p._option_string_actions:
            continue
        g.add_argument(flag, type=typ, default=None)


def seq2seq_config_from_args(args: argparse.Namespace, **fixed):
    over = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _) in FLAGS.items()}
    over.update(data=args.data, seed=args.seed, device=args.device, amp=args.amp,
                shared_vocab=args.shared_vocab, tie=getattr(args, "tie", None))
    over.update(fixed)
    return make_seq2seq_config(args.preset, **over)


def add_parser(sub) -> None:
    p = sub.add_parser("train-seq2seq", help="train an encoder-decoder on a parallel corpus, with a tie mode",
                       description="Train an encoder-decoder Transformer on a parallel corpus (DIR with "
                                   "train/valid/test .src/.tgt, or shakespeare-folio); reports perplexity, "
                                   "BLEU and chrF (greedy and beam search).")
    p.add_argument("--data", default="shakespeare-folio",
                   help="bundled parallel corpus (shakespeare-folio) or a directory with train.src/train.tgt, "
                        "valid.src/valid.tgt, test.src/test.tgt")
    p.add_argument("--preset", default="small", choices=list(SEQ2SEQ_PRESETS))
    add_seq2seq_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    add_run_dir_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train_seq2seq import train_seq2seq

    train_seq2seq(seq2seq_config_from_args(args), args.out, force=args.force, resume=args.resume,
                  progress=args.progress)
    return 0
