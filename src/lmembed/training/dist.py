"""Data-parallel plumbing for `torchrun --nproc_per_node N -m lmembed train ...`.

PyTorch's own engine: DistributedDataParallel over NCCL (GPUs) or gloo (CPU). Without torchrun
(WORLD_SIZE unset or 1) every helper here is a cheap no-op, so the trainer has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..common.runtime import pick_device
from ..errors import LmembedError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str = "auto") -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), pick_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name.startswith("cuda") and not use_cuda:
        raise LmembedError(f"--device {device_name}: CUDA is not available on this machine")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank, world, local), device


def all_reduce_sum(values: list[float], device: torch.device, env: DistEnv) -> list[float]:
    """Sum a few scalars over ranks (float64, so token counts and NLL sums stay exact enough)."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def on_main(fn: Callable[[], T], env: DistEnv) -> T:
    """Run fn on rank 0 only; its result, or its LmembedError, reaches every rank (no rank hangs)."""
    if not env.enabled:
        return fn()
    payload: list[Any] = [None]
    if env.is_main:
        try:
            payload[0] = ("ok", fn())
        except LmembedError as e:
            payload[0] = ("error", str(e))
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise LmembedError(value)
    return value


def cleanup(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
