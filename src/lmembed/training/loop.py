"""What every lmembed trainer shares (language models in lm.py, translation models in
seq2seq.py, classifiers in finetune.py): the step loop, the epoch loop with its atomic
checkpoints, the NaN guard, the learning-rate schedule and the optimizer step.

Resume is exact (same numbers as an uninterrupted run on the same machine) because nothing
hidden carries over between epochs: the RNG is re-seeded from (seed, epoch) at each epoch start,
the LR is a pure function of (epoch, step), the data order is a pure function of (seed, epoch),
and the optimizer state is in the checkpoint.

A trainer's config is any dataclass with ``to_dict``/``from_dict`` and the fields ``seed``,
``epochs`` and ``max_steps`` (lmembed.config.training.TrainingSettings).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..common.faults import fault_point
from ..common.files import write_json
from ..errors import LmembedError, TrainingDiverged
from ..models.store import CHECKPOINT, METRICS, WEIGHTS, load_checkpoint, save_weights
from . import dist
from .runs import save_checkpoint

# Per-epoch seeds: distinct for every (seed, epoch, rank) and stable across runs and resumes.
SEED_STRIDE, RANK_STRIDE = 1_000_003, 7919  # primes, so no two (seed, epoch, rank) collide in practice
# The NaN check syncs with the device (and, distributed, with the other ranks): on CPU every step,
# elsewhere every this many steps.
SYNC_EVERY = 25
POSTFIX_EVERY = 20  # steps between progress-bar updates


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return seed * SEED_STRIDE + epoch + RANK_STRIDE * rank


def lr_at(cfg: Any, epoch: int, step: int, steps_per_epoch: int) -> float:
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


def make_optimizer(cfg: Any, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   clip: float) -> None:
    """Backward, optional global-norm clipping, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()


@dataclass
class StepStats:
    """What a run of optimizer steps leaves: summed loss x tokens and tokens over all ranks."""

    loss_sum: float
    count: int
    seconds: float
    steps: int

    @property
    def mean(self) -> float:
        return self.loss_sum / max(self.count, 1)


StepLoss = Callable[[int], tuple[torch.Tensor, torch.Tensor, int]]


def run_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step_loss: StepLoss, *, n_steps: int,
              lr: Callable[[int], float], clip: float, device: torch.device, desc: str, progress: bool | None,
              diverged: Callable[[float, int], str], env: dist.DistEnv | None = None,
              postfix: Callable[[float, float], dict[str, str]] | None = None,
              after_step: Callable[[int, float, int], None] | None = None) -> StepStats:
    """The one step loop of every trainer: set the LR, compute the loss, backward, clip, step,
    keep the running loss, stop on NaN (before anything is saved), show progress.

    step_loss(step) returns (objective to minimise, loss to report, tokens it covers);
    diverged(mean, step) words the error for a non-finite running loss; after_step(step, loss,
    tokens) runs after each update (evaluations inside an epoch); postfix(mean, tokens/s) fills
    the progress bar."""
    env = env or dist.DistEnv()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    check_every = SYNC_EVERY if (device.type == "cuda" or env.enabled) else 1
    t0 = time.perf_counter()
    bar = tqdm(range(n_steps), desc=desc, disable=(None if progress is None else not progress), leave=False,
               dynamic_ncols=True)
    for step in bar:
        set_lr(optimizer, lr(step))
        objective, loss, n = step_loss(step)
        optimizer_step(model, optimizer, objective, clip)
        loss_sum += loss.detach().double() * n
        count += n
        if after_step is not None:
            after_step(step, loss.item(), n)
        if (step + 1) % check_every == 0 or step == n_steps - 1:
            total, tokens = dist.all_reduce_sum([loss_sum.item(), count], device, env)
            mean = total / max(tokens, 1)
            if not math.isfinite(mean):
                raise TrainingDiverged(diverged(mean, step + 1))
            if postfix is not None and bar.disable is False and (step % POSTFIX_EVERY == 0 or step == n_steps - 1):
                bar.set_postfix(postfix(mean, tokens / (time.perf_counter() - t0)))
    seconds = time.perf_counter() - t0
    total, tokens = dist.all_reduce_sum([loss_sum.item(), count], device, env)
    return StepStats(total, int(tokens), seconds, n_steps)


def diverged_in_epoch(epoch: int, out: Path) -> Callable[[float, int], str]:
    """The NaN message of an epoch trainer: says what is kept, and only what exists."""
    def message(mean: float, step: int) -> str:
        kept = (f"the last good checkpoint is kept (epoch {epoch - 1})" if (out / CHECKPOINT).exists()
                else "no checkpoint was written")
        return (f"epoch {epoch} step {step}: training loss is {mean}; stopped, {kept}. Lower --lr or --clip and "
                "rerun with --force")
    return message


@dataclass
class EpochLoop:
    """Epochs with per-epoch seeding, best-weights selection and an atomic checkpoint after each.

    `train_epoch(epoch, steps_left)` returns the epoch's history row (with "steps"), `validate()`
    the validation numbers added to it; `select` names the row key whose minimum picks the
    weights kept in model.safetensors.
    """

    cfg: Any
    out: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    info: dict[str, Any]
    select: str = "valid_ppl"
    env: dist.DistEnv = field(default_factory=dist.DistEnv)
    log: Callable[[str], None] = print
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = math.inf
    start_epoch: int = 1

    def restore(self) -> None:
        """Model, optimizer and history from OUT/checkpoint.pt (for --resume)."""
        path = self.out / CHECKPOINT
        ckpt = load_checkpoint(path)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise LmembedError(f"{path}: does not fit this model ({str(e).splitlines()[0][:160]})") from None
        self.history, self.best, self.start_epoch = ckpt["history"], ckpt["best_valid"], ckpt["epoch"] + 1

    def steps_done(self) -> int:
        return sum(r.get("steps", 0) for r in self.history)

    def run(self, train_epoch: Callable[[int, int | None], dict[str, Any]], validate: Callable[[], dict[str, Any]],
            describe: Callable[[dict[str, Any], bool], str], stop_after_epoch: int | None = None) -> bool:
        """Train the remaining epochs; False when stopped early by `stop_after_epoch` (tests)."""
        cfg, env = self.cfg, self.env
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            steps_left = None if cfg.max_steps is None else cfg.max_steps - self.steps_done()
            if steps_left is not None and steps_left <= 0:
                break
            # per-epoch RNG (resume needs no RNG state); ranks differ so their dropout masks do too
            torch.manual_seed(epoch_seed(cfg.seed, epoch, env.rank))
            row = train_epoch(epoch, steps_left)
            row.update(validate())
            self.history.append(row)
            improved = row[self.select] < self.best
            self.best = min(self.best, row[self.select])
            if env.is_main:
                if improved:
                    save_weights(self.model, self.out / WEIGHTS)
                save_checkpoint(self.out / CHECKPOINT, {
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                    "history": self.history, "best_valid": self.best,
                })
                write_json(self.out / METRICS, {**self.info, "epochs": epoch, "history": self.history,
                                                     "finished": False})
                fault_point("train:epoch")
            self.log(describe(row, improved))
            if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < cfg.epochs and steps_left != 0:
                dist.barrier(env)
                return False
        return True

    def summary(self) -> dict[str, Any]:
        """The finished run's history and its totals (part of metrics.json)."""
        best = min(self.history, key=lambda r: r[self.select])
        return {"epochs": len(self.history), "history": self.history, "best_epoch": best["epoch"], "finished": True,
                "tokens_per_s": sum(r["tokens_per_s"] for r in self.history) / len(self.history),
                "train_seconds": float(sum(r["seconds"] for r in self.history))}

    def interrupted(self) -> dict[str, Any]:
        """What a trainer returns when `run` stopped early."""
        epochs = self.history[-1]["epoch"] if self.history else 0
        return {**self.info, "epochs": epochs, "history": self.history, "finished": False}
