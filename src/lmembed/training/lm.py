"""Language-model training: SGD/AdamW, clipping, LR schedules, AMP, atomic per-epoch
checkpoints, exact resume, NaN guard, progress bar, metrics.json + report.md + curves.png.

The step and epoch loops are shared with the other trainers (loop.py, which also explains why
resume is exact); what is here is specific to LMs: token streams, recurrent state, the
projection penalty, perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.files import write_json
from ..common.locks import locked
from ..common.report import markdown_table, run_report
from ..common.runtime import count_params, seed_everything
from ..config import RunConfig
from ..data.batching import StreamBatches
from ..data.bundled import TextOptions
from ..data.corpus import Corpus, load_corpus, recorded_corpus
from ..data.vocab import load_tokenizer, save_tokenizer
from ..errors import LmembedError
from ..evaluation.perplexity import autocast_for, lm_nll, ppl
from ..models import build_model, check_fits_memory
from ..models.store import CONFIG, METRICS, TOKENIZER, WEIGHTS, load_run, load_weights
from . import dist
from .loop import EpochLoop, diverged_in_epoch, lr_at, make_optimizer, run_steps
from .runs import start_run

# Config fields that may differ when resuming (they do not change the numbers, or extend the run).
RESUMABLE_CHANGES = {"epochs", "device", "compile", "ce_chunk"}


def _check_vocab(corpus: Corpus, out: Path) -> None:
    saved = load_tokenizer(out / TOKENIZER)
    if saved.fingerprint() != corpus.tokenizer.fingerprint():
        raise LmembedError(
            f"{out / TOKENIZER}: vocabulary mismatch on resume: the run has {saved.vocab_size} tokens, "
            f"corpus {corpus.name} gives {corpus.vocab_size} (different --data or vocabulary options?)"
        )


def train(
    cfg: RunConfig,
    out: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    corpus: Corpus | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Train a word-level LM; returns the final metrics (also in OUT/metrics.json).

    Under torchrun (WORLD_SIZE > 1) this is data-parallel: rank r reads rows [r*B/W, (r+1)*B/W) of
    the global batch layout, gradients and metrics are all-reduced, only rank 0 writes files.
    stop_after_epoch simulates an interruption (tests, benchmarks): the run stops after that
    epoch's checkpoint, exactly as if killed between epochs.
    """
    cfg.validate()
    env, device = dist.setup(cfg.device)
    if not env.is_main:
        log = _quiet
        progress = False
    try:
        with locked(out, "run directory") if env.is_main else nullcontext():
            return _train(cfg, Path(out), env, device, force, resume, corpus, progress, log, stop_after_epoch)
    finally:
        dist.cleanup(env)


def _quiet(msg: str) -> None:
    pass


def _train(cfg: RunConfig, out: Path, env: dist.DistEnv, device: torch.device, force: bool, resume: bool,
           corpus: Corpus | None, progress: bool | None, log: Callable[[str], None],
           stop_after_epoch: int | None) -> dict[str, Any]:
    if corpus is None:  # rank 0 builds the token cache, the others then read it
        dist.on_main(lambda: load_corpus(cfg.data, options=TextOptions.of(cfg)) and None, env)
        corpus = load_corpus(cfg.data, options=TextOptions.of(cfg))
    check_fits_memory(cfg, corpus.vocab_size)  # every input checked before the run folder is touched
    resume = start_run(cfg, out, resume=resume, force=force, resumable=RESUMABLE_CHANGES, env=env)
    seed_everything(cfg.seed)
    if resume:
        _check_vocab(corpus, out)
    train_ids = corpus.train if cfg.train_tokens is None else corpus.train[: cfg.train_tokens]
    batches = StreamBatches(train_ids, cfg.batch_size, cfg.bptt, rank=env.rank, world=env.world)

    model = build_model(cfg, corpus.vocab_size).to(device)
    optimizer = make_optimizer(cfg, model, device)
    info = {
        "arch": cfg.arch, "preset": cfg.preset, "data": cfg.data, "tie": cfg.tie, "proj_reg": cfg.proj_reg,
        "params": count_params(model), "embedding_params": model.embedding_params(),
        "vocab_size": corpus.vocab_size, "train_tokens": int(len(train_ids)), "device": str(device),
        "seed": cfg.seed, "world_size": env.world,
    }
    epochs = EpochLoop(cfg, out, model, optimizer, info, select="valid_ppl", env=env, log=log)
    if resume:
        epochs.restore()
        log(f"resuming {out} after epoch {epochs.start_epoch - 1}"
            + (f" on {env.world} processes" if env.enabled else ""))
    elif env.is_main:
        write_json(out / CONFIG, cfg.to_dict())
        save_tokenizer(corpus.tokenizer, out / TOKENIZER)
    step_model = _wrap(model, cfg, env, device)
    log(f"{cfg.arch}/{cfg.preset} tie={cfg.tie} proj_reg={cfg.proj_reg:g}: {info['params']:,} params "
        f"({info['embedding_params']:,} in embeddings), vocab {corpus.vocab_size:,}, "
        f"{len(train_ids):,} train tokens, {device}" + (f" x {env.world} processes" if env.enabled else ""))

    def train_epoch(epoch: int, steps_left: int | None) -> dict[str, Any]:
        return _train_epoch(step_model, model, optimizer, batches, cfg, epoch, device, progress, env, out,
                            steps_left)

    def describe(row: dict[str, Any], improved: bool) -> str:
        return (f"epoch {row['epoch']:3d} | lr {row['lr']:.4g} | train ppl {row['train_ppl']:8.2f} | valid ppl "
                f"{row['valid_ppl']:8.2f}{' *' if improved else ''} | {row['tokens_per_s']:,.0f} tok/s")

    if not epochs.run(train_epoch, lambda: {"valid_ppl": ppl(*_eval(model, corpus.valid, cfg, device, env))},
                      describe, stop_after_epoch):
        return epochs.interrupted()

    dist.barrier(env)  # rank 0 has written the best weights
    load_weights(model, out / WEIGHTS)
    metrics = finish_metrics(model, corpus, cfg, device, info, epochs.summary(), env)
    if env.is_main:
        write_json(out / METRICS, metrics)
        write_run_report(out, metrics)
    dist.barrier(env)
    log(f"done: valid ppl {metrics['valid_ppl']:.2f}, test ppl {metrics['test_ppl']:.2f} -> {out}")
    return metrics


def _wrap(model: torch.nn.Module, cfg: RunConfig, env: dist.DistEnv, device: torch.device) -> torch.nn.Module:
    """The module the training step calls: optionally compiled, DDP-wrapped under torchrun."""
    step_model = model
    if cfg.compile:
        step_model = torch.compile(step_model)
    if env.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_model = DDP(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    return step_model


def _eval(model, ids: np.ndarray, cfg: RunConfig, device: torch.device, env: dist.DistEnv) -> tuple[float, int]:
    """Summed NLL and count over all ranks: rows are split when the eval batch divides evenly."""
    shard = env.enabled and cfg.eval_batch_size % env.world == 0
    nll, n = lm_nll(model, ids, batch_size=cfg.eval_batch_size, bptt=cfg.bptt, device=device, amp=cfg.amp,
                    rank=env.rank if shard else 0, world=env.world if shard else 1)
    if shard:
        nll, n = dist.all_reduce_sum([nll, n], device, env)
    return nll, int(n)


def _train_epoch(step_model, model, optimizer, batches: StreamBatches, cfg: RunConfig, epoch: int,
                 device: torch.device, progress: bool | None, env: dist.DistEnv, out: Path,
                 max_steps: int | None = None) -> dict[str, Any]:
    step_model.train()
    steps = len(batches)
    state = None

    def step_loss(step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        nonlocal state
        x, y = batches.get(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_for(device, cfg.amp):
            loss, state = step_model(x, state, targets=y, ce_chunk=cfg.ce_chunk)
        state = model.detach_state(state)
        objective = loss + cfg.proj_reg * model.penalty() if cfg.proj_reg else loss
        return objective, loss, y.numel()

    stats = run_steps(model, optimizer, step_loss, n_steps=steps if max_steps is None else min(steps, max_steps),
                      lr=lambda step: lr_at(cfg, epoch, step, steps), clip=cfg.clip, device=device,
                      desc=f"epoch {epoch}", progress=progress, env=env, diverged=diverged_in_epoch(epoch, out),
                      postfix=lambda mean, tok_s: {"ppl": f"{math.exp(min(mean, 50)):.1f}", "tok_s": f"{tok_s:,.0f}"})
    return {"epoch": epoch, "lr": lr_at(cfg, epoch, 0, steps), "train_ppl": math.exp(min(stats.mean, 50)),
            "tokens_per_s": stats.count / stats.seconds, "seconds": stats.seconds, "steps": stats.steps}


def finish_metrics(model, corpus: Corpus, cfg: RunConfig, device, info: dict, summary: dict,
                   env: dist.DistEnv | None = None) -> dict:
    """Valid and test perplexity of the best-validation weights, plus the run summary."""
    out = dict(info)
    for split in ("valid", "test"):
        out[f"{split}_ppl"] = ppl(*_eval(model, corpus.split(split), cfg, device, env or dist.DistEnv()))
    return {**out, **summary}


def write_run_report(out: Path, m: dict) -> None:
    summary = markdown_table([m], ["arch", "preset", "tie", "proj_reg", "params", "embedding_params",
                                   "valid_ppl", "test_ppl", "tokens_per_s", "best_epoch"])
    run_report(out, title=f"lmembed run: {m['data']}", summary=summary, history=m["history"],
               history_cols=["epoch", "lr", "train_ppl", "valid_ppl", "tokens_per_s", "seconds"],
               curves={"train": "train_ppl", "valid": "valid_ppl"}, ylabel="perplexity", logy=True,
               plot_title=f"{m['arch']}/{m['preset']} tie={m['tie']}", alt="perplexity per epoch")


def evaluate_run(run_dir: str | Path, *, data: str | None = None, split: str = "test", device: str = "auto",
                 progress: bool = False) -> dict[str, Any]:
    """Perplexity of a run's best weights on a split of its own corpus or another one (same vocab)."""
    model, tok, cfg = load_run(run_dir, device)
    spec = recorded_corpus(cfg.data, data, f"{Path(run_dir) / CONFIG}")
    corpus = load_corpus(spec, options=TextOptions.of(cfg), tokenizer=tok)
    dev = next(model.parameters()).device
    nll, n = lm_nll(model, corpus.split(split), batch_size=cfg.eval_batch_size, bptt=cfg.bptt, device=dev,
                    amp=cfg.amp, progress=progress)
    return {"run": str(run_dir), "data": corpus.name, "split": split, "ppl": ppl(nll, n), "tokens": n,
            "nll": nll / n, "unk_rate": corpus.stats().get(f"{split}_unk_rate")}
