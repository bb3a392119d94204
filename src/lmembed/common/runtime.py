"""Where and how a computation runs: seeds, devices, parameter counts."""

from __future__ import annotations

import ctypes
import random

import numpy as np
import torch

from ..errors import LmembedError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmembedError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise LmembedError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return torch.device(name)


def count_params(module: torch.nn.Module) -> int:
    """Distinct trainable parameters: a tied matrix counts once (module.parameters() de-duplicates),
    frozen ones (the LSTM's constant-zero second bias) do not count."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
LARGE_ALLOCATION = 1 << 20


def tune_allocator() -> bool:
    """Give large freed blocks back to the OS at once (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold each time a big block is freed, after which big temporaries
    (a chunk of dequantised rows, a Gram matrix) come from the heap and stay resident when freed:
    the same compression then peaks 50-150 MB higher from run to run. A fixed 1 MiB threshold makes
    the peak what is live. Called by the CLI, which owns its process; a library call leaves the
    allocator to its host."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, LARGE_ALLOCATION))
    except (OSError, AttributeError):
        return False
