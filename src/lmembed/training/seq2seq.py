"""Translation-model training: the encoder-decoder of models/seq2seq.py on a parallel corpus.

Shares the LM trainer's machinery (loop.py: run directory, --resume/--force, per-epoch seeding,
atomic checkpoints, best weights by validation perplexity, NaN guard, LR schedule, optimizer).
Specific here: BPE vocabularies (one shared or one per side), length-bucketed batches of
sentence pairs, label smoothing, and the final evaluation: perplexity, then BLEU and chrF of
greedy and beam-search translations of the valid/test sets, beside the "copy the source"
baseline (for spelling normalisation, copying is already a strong system).

A run directory holds what an LM run holds, with two tokenizers (tokenizer.src.json,
tokenizer.tgt.json; identical when shared) and the test translations (test.greedy.txt,
test.beam.txt, one line per pair of the evaluated sample).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.files import read_json, write_json
from ..common.locks import locked
from ..common.report import markdown_table, run_report, write_text
from ..common.runtime import count_params, pick_device, seed_everything
from ..config import Seq2SeqConfig
from ..data.corpus import recorded_corpus
from ..data.parallel import (
    PARALLEL_REGISTRY,
    ParallelText,
    batch_order,
    build_vocabularies,
    check_tie_vocab,
    collate_source,
    collate_target,
    encode,
    length_batches,
    load_parallel,
)
from ..data.vocab import BPETokenizer, save_tokenizer
from ..errors import LmembedError
from ..evaluation.perplexity import autocast_for, ppl
from ..evaluation.translation import bleu_chrf, evenly_spaced, translate
from ..models.seq2seq import IGNORE, Seq2SeqTransformer, build_seq2seq
from ..models.store import (
    CONFIG,
    METRICS,
    TOKENIZER_SRC,
    TOKENIZER_TGT,
    WEIGHTS,
    load_seq2seq_run,
    load_seq2seq_tokenizers,
    load_weights,
)
from .loop import EpochLoop, diverged_in_epoch, lr_at, make_optimizer, run_steps
from .runs import start_run

# Config fields that may differ on --resume: they do not change the training numbers.
RESUMABLE_CHANGES = {"epochs", "device", "beam", "len_penalty", "eval_pairs"}


@dataclass
class EncodedPairs:
    """Token ids of one split plus its raw text (references for BLEU)."""

    src: list[list[int]]
    tgt: list[list[int]]
    src_text: list[str]
    tgt_text: list[str]
    src_eos: int  # pads sources (masked)
    tgt_eos: int  # the decoder's start symbol; pads decoder inputs

    @property
    def tgt_lengths(self) -> np.ndarray:
        return np.array([max(len(s), len(t)) for s, t in zip(self.src, self.tgt, strict=True)])


def encode_splits(text: ParallelText, src_tok: BPETokenizer, tgt_tok: BPETokenizer, cfg: Seq2SeqConfig
                  ) -> dict[str, EncodedPairs]:
    out = {}
    for split, (src, tgt) in text.splits.items():
        if split == "train" and cfg.train_pairs is not None:
            src, tgt = src[: cfg.train_pairs], tgt[: cfg.train_pairs]
        out[split] = EncodedPairs(encode(src_tok, src, cfg.max_len), encode(tgt_tok, tgt, cfg.max_len), src, tgt,
                                  src_tok.eos_id, tgt_tok.eos_id)
    return out


def train_seq2seq(
    cfg: Seq2SeqConfig,
    out: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    text: ParallelText | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Train an encoder-decoder on cfg.data; returns the final metrics (also OUT/metrics.json).

    stop_after_epoch simulates an interruption after that epoch's checkpoint (tests)."""
    cfg.validate()
    with locked(out, "run directory"):
        return _train_seq2seq(cfg, Path(out), force, resume, text, progress, log, stop_after_epoch)


def _train_seq2seq(cfg: Seq2SeqConfig, out: Path, force: bool, resume: bool, text: ParallelText | None,
                   progress: bool | None, log: Callable[[str], None], stop_after_epoch: int | None) -> dict[str, Any]:
    device = pick_device(cfg.device)
    text = text or load_parallel(cfg.data)  # the corpus is checked before the run folder is touched
    resume = start_run(cfg, out, resume=resume, force=force, resumable=RESUMABLE_CHANGES)
    seed_everything(cfg.seed)
    src_tok, tgt_tok = _vocabularies(cfg, text, out, resume)
    data = encode_splits(text, src_tok, tgt_tok, cfg)

    model = build_seq2seq(cfg, src_tok.vocab_size, tgt_tok.vocab_size).to(device)
    optimizer = make_optimizer(cfg, model, device)
    train = data["train"]
    info = _run_info(cfg, model, src_tok, tgt_tok, train, text, device)
    epochs = EpochLoop(cfg, out, model, optimizer, info, select="valid_ppl", log=log)
    _begin(epochs, resume, src_tok, tgt_tok, log)
    log(f"seq2seq/{cfg.preset} tie={cfg.tie}: {info['params']:,} params ({info['embedding_params']:,} in "
        f"embeddings), vocab {src_tok.vocab_size:,} -> {tgt_tok.vocab_size:,}"
        f"{' (shared)' if src_tok is tgt_tok else ''}, {len(train.src):,} train pairs, {device}")

    lengths = train.tgt_lengths
    bleu_idx = evenly_spaced(len(data["valid"].src), cfg.bleu_sample) if cfg.bleu_sample else []

    def train_epoch(epoch: int, steps_left: int | None) -> dict[str, Any]:
        return _train_epoch(model, optimizer, cfg, train, lengths, epoch, device, progress, out, steps_left)

    def validate() -> dict[str, Any]:
        row = {"valid_ppl": ppl(*pair_nll(model, data["valid"], cfg, device))}
        if bleu_idx:
            row.update({f"valid_{k}": v for k, v in _bleu(model, data["valid"], bleu_idx, tgt_tok, cfg, 1).items()})
        return row

    describe = partial(_describe, bleu_pairs=len(bleu_idx))
    if not epochs.run(train_epoch, validate, describe, stop_after_epoch):
        return epochs.interrupted()

    load_weights(model, out / WEIGHTS)
    metrics = {**final_metrics(model, data, tgt_tok, cfg, device, progress, out), **info, **epochs.summary()}
    write_json(out / METRICS, metrics)
    write_seq2seq_report(out, metrics)
    log(f"done: test BLEU {metrics['test_bleu']:.2f} (beam {cfg.beam}), greedy {metrics['test_bleu_greedy']:.2f}, "
        f"chrF {metrics['test_chrf']:.2f}; copying the source: BLEU {metrics['test_copy_bleu']:.2f} -> {out}")
    return metrics


def _begin(epochs: EpochLoop, resume: bool, src_tok: BPETokenizer, tgt_tok: BPETokenizer, log) -> None:
    """Restore an interrupted run, or write a new run's config and tokenizers."""
    if resume:
        epochs.restore()
        log(f"resuming {epochs.out} after epoch {epochs.start_epoch - 1}")
    else:
        write_json(epochs.out / CONFIG, epochs.cfg.to_dict())
        save_tokenizer(src_tok, epochs.out / TOKENIZER_SRC)
        save_tokenizer(tgt_tok, epochs.out / TOKENIZER_TGT)


def _describe(row: dict[str, Any], improved: bool, *, bleu_pairs: int) -> str:
    bleu = f" | valid BLEU {row['valid_bleu']:5.2f} (greedy, {bleu_pairs} pairs)" if bleu_pairs else ""
    return (f"epoch {row['epoch']:3d} | lr {row['lr']:.4g} | train loss {row['train_loss']:6.3f} | valid ppl "
            f"{row['valid_ppl']:7.3f}{' *' if improved else ''}{bleu} | {row['tokens_per_s']:,.0f} tok/s")


def _run_info(cfg: Seq2SeqConfig, model: Seq2SeqTransformer, src_tok: BPETokenizer, tgt_tok: BPETokenizer,
              train: EncodedPairs, text: ParallelText, device: torch.device) -> dict[str, Any]:
    return {
        "data": cfg.data, "preset": cfg.preset, "tie": cfg.tie, "shared_vocab": cfg.shared_vocab,
        "params": count_params(model), "embedding_params": model.embedding_params(),
        "src_vocab": src_tok.vocab_size, "tgt_vocab": tgt_tok.vocab_size, "d_model": cfg.d_model,
        "train_pairs": len(train.src), "train_target_tokens": int(sum(len(t) for t in train.tgt)),
        "data_fingerprint": text.fingerprint(), "device": str(device), "seed": cfg.seed,
    }


def _vocabularies(cfg: Seq2SeqConfig, text: ParallelText, out: Path, resume: bool
                  ) -> tuple[BPETokenizer, BPETokenizer]:
    """The run's own tokenizers when resuming (the corpus must not have changed), else new ones."""
    if resume:
        src_tok, tgt_tok = load_seq2seq_tokenizers(out)
        saved = read_json(out / METRICS, "run metrics").get("data_fingerprint")
        if saved != text.fingerprint():
            raise LmembedError(f"{out / METRICS}: the parallel corpus {cfg.data} changed since this run "
                               "started (different pairs); rerun with --force")
    else:
        src_tok, tgt_tok = build_vocabularies(text, cfg.bpe, cfg.shared_vocab)
    check_tie_vocab(cfg.tie, src_tok, tgt_tok)
    return src_tok, tgt_tok


def _batch(pairs: EncodedPairs, idx, device: torch.device):
    src, mask = collate_source([pairs.src[i] for i in idx], pairs.src_eos)
    tgt_in, targets = collate_target([pairs.tgt[i] for i in idx], pairs.tgt_eos, IGNORE)
    return src.to(device), mask.to(device), tgt_in.to(device), targets.to(device)


def _train_epoch(model: Seq2SeqTransformer, optimizer, cfg: Seq2SeqConfig, train: EncodedPairs,
                 lengths: np.ndarray, epoch: int, device: torch.device, progress: bool | None, out: Path,
                 max_steps: int | None = None) -> dict[str, Any]:
    model.train()
    batches = batch_order(lengths, cfg.batch_size, cfg.seed, epoch)
    steps = len(batches)

    def step_loss(step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        src, mask, tgt_in, targets = _batch(train, batches[step], device)
        with autocast_for(device, cfg.amp):
            loss = model(src, mask, tgt_in, targets, label_smoothing=cfg.label_smoothing)
        return loss, loss, int((targets != IGNORE).sum())

    stats = run_steps(model, optimizer, step_loss, n_steps=steps if max_steps is None else min(steps, max_steps),
                      lr=lambda step: lr_at(cfg, epoch, step, steps), clip=cfg.clip, device=device,
                      desc=f"epoch {epoch}", progress=progress, diverged=diverged_in_epoch(epoch, out),
                      postfix=lambda mean, tok_s: {"loss": f"{mean:.3f}", "tok_s": f"{tok_s:,.0f}"})
    return {"epoch": epoch, "lr": lr_at(cfg, epoch, 0, steps), "train_loss": stats.mean,
            "tokens_per_s": stats.count / stats.seconds, "seconds": stats.seconds, "steps": stats.steps}


@torch.no_grad()
def pair_nll(model: Seq2SeqTransformer, pairs: EncodedPairs, cfg: Seq2SeqConfig, device: torch.device
             ) -> tuple[float, int]:
    """Summed target-token NLL (teacher forcing, no smoothing) and the token count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for idx in length_batches(pairs.tgt_lengths, cfg.batch_size * 2):
            src, mask, tgt_in, targets = _batch(pairs, idx, device)
            with autocast_for(device, cfg.amp):
                nll, n = model.token_nll(src, mask, tgt_in, targets)
            total, count = total + nll, count + n
    finally:
        model.train(was_training)
    return total, count


def _bleu(model, pairs: EncodedPairs, idx: list[int], tgt_tok: BPETokenizer, cfg: Seq2SeqConfig, beam: int,
          progress: bool | None = False, desc: str = "decoding") -> dict[str, Any]:
    hyps = translate_ids(model, [pairs.src[i] for i in idx], tgt_tok, cfg, beam, progress, desc, pairs.src_eos)
    return {**bleu_chrf(hyps, [pairs.tgt_text[i] for i in idx]), "hyps": hyps}


def translate_ids(model, src_ids: list[list[int]], tgt_tok: BPETokenizer, cfg: Seq2SeqConfig, beam: int,
                  progress: bool | None = False, desc: str = "decoding", src_pad: int | None = None) -> list[str]:
    """Detokenised translations of source ids (beam 1 = greedy)."""
    ids = translate(model, src_ids, eos=tgt_tok.eos_id, max_len=cfg.max_len, beam=beam, len_penalty=cfg.len_penalty,
                    batch_size=cfg.batch_size, progress=bool(progress), desc=desc, src_pad=src_pad)
    return [tgt_tok.decode(h).strip() for h in ids]


def final_metrics(model, data: dict[str, EncodedPairs], tgt_tok: BPETokenizer, cfg: Seq2SeqConfig, device,
                  progress: bool | None, out: Path | None = None) -> dict[str, Any]:
    """Perplexity of valid/test, BLEU/chrF of greedy (valid, test) and beam (test) translations of
    an evenly spaced sample of `eval_pairs` pairs (all by default), and the copy baseline."""
    m: dict[str, Any] = {"beam": cfg.beam, "len_penalty": cfg.len_penalty}
    for split in ("valid", "test"):
        pairs = data[split]
        m[f"{split}_ppl"] = ppl(*pair_nll(model, pairs, cfg, device))
        idx = evenly_spaced(len(pairs.src), cfg.eval_pairs)
        m[f"{split}_eval_pairs"] = len(idx)
        copy = bleu_chrf([pairs.src_text[i] for i in idx], [pairs.tgt_text[i] for i in idx])
        m[f"{split}_copy_bleu"], m[f"{split}_copy_chrf"] = copy["bleu"], copy["chrf"]
        greedy = _bleu(model, pairs, idx, tgt_tok, cfg, 1, progress, f"{split} greedy")
        m[f"{split}_bleu_greedy"], m[f"{split}_chrf_greedy"] = greedy["bleu"], greedy["chrf"]
        if split == "test":
            beam = _bleu(model, pairs, idx, tgt_tok, cfg, cfg.beam, progress, f"{split} beam {cfg.beam}")
            m["test_bleu"], m["test_chrf"] = beam["bleu"], beam["chrf"]
            if out is not None:
                write_text(out / "test.greedy.txt", "".join(h + "\n" for h in greedy["hyps"]))
                write_text(out / "test.beam.txt", "".join(h + "\n" for h in beam["hyps"]))
    return m


def write_seq2seq_report(out: Path, m: dict[str, Any]) -> None:
    summary = markdown_table([m], ["tie", "shared_vocab", "params", "embedding_params", "valid_ppl", "test_ppl",
                                   ("test_bleu", "test BLEU (beam)"), ("test_chrf", "test chrF (beam)"),
                                   ("test_bleu_greedy", "test BLEU (greedy)"), ("test_copy_bleu", "copy BLEU"),
                                   "best_epoch"])
    cols = ["epoch", "lr", "train_loss", "valid_ppl"] + (["valid_bleu"] if "valid_bleu" in m["history"][0] else [])
    curves = {"valid ppl": "valid_ppl", "train loss": "train_loss"}
    run_report(out, title=f"lmembed seq2seq run: {m['data']}", summary=summary, history=m["history"],
               history_cols=cols + ["tokens_per_s", "seconds"], curves=curves, ylabel="valid ppl / train loss",
               plot_title=f"seq2seq/{m['preset']} tie={m['tie']}", alt="per epoch")


def evaluate_seq2seq_run(run_dir: str | Path, *, data: str | None = None, split: str = "test",
                         beam: int | None = None, device: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Perplexity, BLEU and chrF of a run's best weights on a split (beam 1 = greedy)."""
    model, src_tok, tgt_tok, cfg = load_seq2seq_run(run_dir, device)
    text = load_parallel(recorded_corpus(cfg.data, data, f"{Path(run_dir) / CONFIG}", PARALLEL_REGISTRY))
    if split not in text.splits:
        raise LmembedError(f"--split {split}: expected one of {', '.join(text.splits)}")
    pairs = encode_splits(text, src_tok, tgt_tok, cfg)[split]
    dev = next(model.parameters()).device
    beam = cfg.beam if beam is None else beam
    idx = evenly_spaced(len(pairs.src), cfg.eval_pairs)
    res = _bleu(model, pairs, idx, tgt_tok, cfg, beam, progress)
    return {"run": str(run_dir), "data": text.name, "split": split, "beam": beam, "pairs": len(idx),
            "ppl": ppl(*pair_nll(model, pairs, cfg, dev)), "bleu": res["bleu"], "chrf": res["chrf"]}

