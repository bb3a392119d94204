"""The training loop: SGD/AdamW, clipping, LR schedules, AMP, atomic per-epoch checkpoints,
exact resume, NaN guard, progress bar, metrics.json + report.md + curves.png.

Resume is exact (same numbers as an uninterrupted run on the same machine) because nothing
hidden carries over between epochs: the RNG is re-seeded from (seed, epoch) at each epoch start,
the LR is a pure function of (epoch, step), the data order is fixed, and the optimizer state is
in the checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import dist, runs
from .config import RunConfig
from .data.batching import StreamBatches
from .data.bundled import TextOptions
from .data.corpus import Corpus, load_corpus
from .data.vocab import load_tokenizer, save_tokenizer
from .errors import LmembedError, TrainingDiverged
from .evaluate.perplexity import autocast_for, lm_nll, ppl
from .models import build_model
from .report import markdown_table, plot_curves, write_text
from .utils import count_params, prepare_out_dir, read_json, seed_everything, write_json

# Config fields that may differ when resuming (they do not change the numbers, or extend the run).
RESUMABLE_CHANGES = {"epochs", "device", "compile", "ce_chunk"}


def text_options(cfg: RunConfig) -> TextOptions:
    return TextOptions(split=cfg.tokenize, lowercase=cfg.lowercase, max_vocab=cfg.max_vocab,
                       min_freq=cfg.min_freq, bpe=cfg.bpe)


def lr_at(cfg: RunConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """LR for 1-based `epoch` and 0-based `step` within it (a pure function: resume-safe)."""
    if cfg.lr_schedule == "step":  # Zaremba: lr * decay ** max(i - max_epoch, 0), i = epoch - 1
        lr = cfg.lr * cfg.lr_decay ** max(epoch - 1 - cfg.decay_start, 0)
    elif cfg.lr_schedule == "cosine":
        total = max(1, min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf))
        t = (epoch - 1) * steps_per_epoch + step
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
    else:
        lr = cfg.lr
    t = (epoch - 1) * steps_per_epoch + step
    if cfg.warmup_steps and t < cfg.warmup_steps:
        lr *= (t + 1) / cfg.warmup_steps
    return lr


def make_optimizer(cfg: RunConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _check_resume(cfg: RunConfig, out: Path) -> None:
    saved = RunConfig.from_dict(read_json(out / runs.CONFIG, "run config"), str(out / runs.CONFIG))
    diffs = [f"{k} ({v!r} in the run, {getattr(cfg, k)!r} now)" for k, v in saved.to_dict().items()
             if k not in RESUMABLE_CHANGES and getattr(cfg, k) != v]
    if diffs:
        raise LmembedError(f"{out / runs.CONFIG}: --resume with a different configuration: {'; '.join(diffs)}")


def _check_vocab(corpus: Corpus, out: Path) -> None:
    saved = load_tokenizer(out / runs.TOKENIZER)
    if saved.fingerprint() != corpus.tokenizer.fingerprint():
        raise LmembedError(
            f"{out / runs.TOKENIZER}: vocabulary mismatch on resume: the run has {saved.vocab_size} tokens, "
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
        return _train(cfg, Path(out), env, device, force, resume, corpus, progress, log, stop_after_epoch)
    finally:
        dist.cleanup(env)


def _quiet(msg: str) -> None:
    pass


def _train(cfg: RunConfig, out: Path, env: dist.DistEnv, device: torch.device, force: bool, resume: bool,
           corpus: Corpus | None, progress: bool | None, log: Callable[[str], None],
           stop_after_epoch: int | None) -> dict[str, Any]:
    resume = resume and (out / runs.CHECKPOINT).exists()
    if resume:
        _check_resume(cfg, out)
    else:
        dist.on_main(lambda: prepare_out_dir(out, force=force), env)
    seed_everything(cfg.seed)

    if corpus is None:  # rank 0 builds the token cache, the others then read it
        dist.on_main(lambda: load_corpus(cfg.data, options=text_options(cfg)) and None, env)
        corpus = load_corpus(cfg.data, options=text_options(cfg))
    if resume:
        _check_vocab(corpus, out)
    train_ids = corpus.train if cfg.train_tokens is None else corpus.train[: cfg.train_tokens]
    batches = StreamBatches(train_ids, cfg.batch_size, cfg.bptt, rank=env.rank, world=env.world)

    model = build_model(cfg, corpus.vocab_size).to(device)
    optimizer = make_optimizer(cfg, model, device)
    history: list[dict[str, Any]] = []
    best_valid, start_epoch = math.inf, 1
    if resume:
        ckpt = runs.load_checkpoint(out / runs.CHECKPOINT)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise LmembedError(f"{out / runs.CHECKPOINT}: does not fit this model ({str(e).splitlines()[0][:160]})") \
                from None
        history, best_valid, start_epoch = ckpt["history"], ckpt["best_valid"], ckpt["epoch"] + 1
        log(f"resuming {out} after epoch {ckpt['epoch']}" + (f" on {env.world} processes" if env.enabled else ""))
    elif env.is_main:
        write_json(out / runs.CONFIG, cfg.to_dict())
        save_tokenizer(corpus.tokenizer, out / runs.TOKENIZER)
    step_model = _wrap(model, cfg, env, device)

    info = {
        "arch": cfg.arch, "preset": cfg.preset, "data": cfg.data, "tie": cfg.tie, "proj_reg": cfg.proj_reg,
        "params": count_params(model), "embedding_params": model.embedding_params(),
        "vocab_size": corpus.vocab_size, "train_tokens": int(len(train_ids)), "device": str(device),
        "seed": cfg.seed, "world_size": env.world,
    }
    log(f"{cfg.arch}/{cfg.preset} tie={cfg.tie} proj_reg={cfg.proj_reg:g}: {info['params']:,} params "
        f"({info['embedding_params']:,} in embeddings), vocab {corpus.vocab_size:,}, "
        f"{len(train_ids):,} train tokens, {device}" + (f" x {env.world} processes" if env.enabled else ""))

    for epoch in range(start_epoch, cfg.epochs + 1):
        steps_left = None if cfg.max_steps is None else cfg.max_steps - sum(r.get("steps", 0) for r in history)
        if steps_left is not None and steps_left <= 0:
            break
        # per-epoch RNG (resume needs no RNG state); ranks differ so their dropout masks do too
        torch.manual_seed(cfg.seed * 1_000_003 + epoch + 7919 * env.rank)
        row = _train_epoch(step_model, model, optimizer, batches, cfg, epoch, device, progress, env, steps_left)
        row["valid_ppl"] = ppl(*_eval(model, corpus.valid, cfg, device, env))
        history.append(row)
        improved = row["valid_ppl"] < best_valid
        best_valid = min(best_valid, row["valid_ppl"])
        if env.is_main:
            if improved:
                runs.save_weights(model, out / runs.WEIGHTS)
            runs.save_checkpoint(out / runs.CHECKPOINT, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "history": history, "best_valid": best_valid,
            })
            write_json(out / runs.METRICS, {**info, "epochs": epoch, "history": history, "finished": False})
        log(f"epoch {epoch:3d} | lr {row['lr']:.4g} | train ppl {row['train_ppl']:8.2f} | valid ppl "
            f"{row['valid_ppl']:8.2f}{' *' if improved else ''} | {row['tokens_per_s']:,.0f} tok/s")
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < cfg.epochs and steps_left != 0:
            dist.barrier(env)
            return {**info, "epochs": epoch, "history": history, "finished": False}

    dist.barrier(env)  # rank 0 has written the best weights
    runs.load_weights(model, out / runs.WEIGHTS)
    metrics = finish_metrics(model, corpus, cfg, device, info, history, env)
    if env.is_main:
        write_json(out / runs.METRICS, metrics)
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
                 device: torch.device, progress: bool | None, env: dist.DistEnv | None = None,
                 max_steps: int | None = None) -> dict[str, Any]:
    env = env or dist.DistEnv()
    step_model.train()
    state = None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    steps = len(batches)
    n_steps = steps if max_steps is None else min(steps, max_steps)
    # the NaN check syncs with the device (and, distributed, with the other ranks): do it rarely there
    check_every = 25 if (device.type == "cuda" or env.enabled) else 1
    t0 = time.perf_counter()
    bar = tqdm(range(n_steps), desc=f"epoch {epoch}", disable=(None if progress is None else not progress),
               leave=False, dynamic_ncols=True)
    for step in bar:
        x, y = batches.get(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = lr_at(cfg, epoch, step, steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        with autocast_for(device, cfg.amp):
            loss, state = step_model(x, state, targets=y, ce_chunk=cfg.ce_chunk)
        total = loss
        if cfg.proj_reg:
            total = loss + cfg.proj_reg * model.penalty()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        state = model.detach_state(state)
        loss_sum += loss.detach().double() * y.numel()
        n_tokens += y.numel()
        if (step + 1) % check_every == 0 or step == n_steps - 1:
            s, n = dist.all_reduce_sum([loss_sum.item(), n_tokens], device, env)
            mean = s / n
            if not math.isfinite(mean):
                raise TrainingDiverged(
                    f"epoch {epoch} step {step + 1}: training loss is {mean}; stopped, the last good checkpoint is "
                    f"kept (epoch {epoch - 1}). Lower --lr or --clip and rerun with --force"
                )
            if bar.disable is False and (step % 20 == 0 or step == n_steps - 1):
                bar.set_postfix(ppl=f"{math.exp(min(mean, 50)):.1f}",
                                tok_s=f"{n / (time.perf_counter() - t0):,.0f}")
    seconds = time.perf_counter() - t0
    s, n = dist.all_reduce_sum([loss_sum.item(), n_tokens], device, env)
    mean = s / max(n, 1)
    return {"epoch": epoch, "lr": lr_at(cfg, epoch, 0, steps), "train_ppl": math.exp(min(mean, 50)),
            "tokens_per_s": n / seconds, "seconds": seconds, "steps": n_steps}


def finish_metrics(model, corpus: Corpus, cfg: RunConfig, device, info: dict, history: list[dict],
                   env: dist.DistEnv | None = None) -> dict:
    """Valid and test perplexity of the best-validation weights, plus the run summary."""
    out = dict(info)
    for split in ("valid", "test"):
        out[f"{split}_ppl"] = ppl(*_eval(model, corpus.split(split), cfg, device, env or dist.DistEnv()))
    best = min(history, key=lambda r: r["valid_ppl"])
    out.update({
        "epochs": len(history), "history": history, "best_epoch": best["epoch"], "finished": True,
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in history])),
        "train_seconds": float(sum(r["seconds"] for r in history)),
    })
    return out


def write_run_report(out: Path, m: dict) -> None:
    plot_curves(out / "curves.png", {
        "train": ([r["epoch"] for r in m["history"]], [r["train_ppl"] for r in m["history"]]),
        "valid": ([r["epoch"] for r in m["history"]], [r["valid_ppl"] for r in m["history"]]),
    }, xlabel="epoch", ylabel="perplexity", logy=True, title=f"{m['arch']}/{m['preset']} tie={m['tie']}")
    summary = markdown_table([m], ["arch", "preset", "tie", "proj_reg", "params", "embedding_params",
                                   "valid_ppl", "test_ppl", "tokens_per_s", "best_epoch"])
    hist = markdown_table(m["history"], ["epoch", "lr", "train_ppl", "valid_ppl", "tokens_per_s", "seconds"])
    write_text(out / "report.md", f"# lmembed run: {m['data']}\n\n{summary}\n## Epochs\n\n{hist}\n"
                                  "![perplexity per epoch](curves.png)\n")


def evaluate_run(run_dir: str | Path, *, data: str | None = None, split: str = "test", device: str = "auto",
                 progress: bool = False) -> dict[str, Any]:
    """Perplexity of a run's best weights on a split of its own corpus or another one (same vocab)."""
    model, tok, cfg = runs.load_run(run_dir, device)
    corpus = load_corpus(data or cfg.data, options=text_options(cfg), tokenizer=tok)
    dev = next(model.parameters()).device
    nll, n = lm_nll(model, corpus.split(split), batch_size=cfg.eval_batch_size, bptt=cfg.bptt, device=dev,
                    amp=cfg.amp, progress=progress)
    return {"run": str(run_dir), "data": corpus.name, "split": split, "ppl": ppl(nll, n), "tokens": n,
            "nll": nll / n, "unk_rate": corpus.stats().get(f"{split}_unk_rate")}
