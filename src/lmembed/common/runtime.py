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
LARGE_ALLOCATION = 4 << 20  # the CLI's threshold (see tune_allocator)
EXACT_RSS = 1 << 20  # benchmarks that read RSS as what is live


def tune_allocator(threshold: int = LARGE_ALLOCATION) -> bool:
    """Fix glibc's mmap and trim thresholds at `threshold` bytes (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold each time a big block is freed, after which big temporaries
    (a chunk of dequantised rows, a Gram matrix) come from the heap and stay resident when freed:
    the same compression then peaks 50-150 MB higher from run to run. A fixed threshold bounds what
    the heap keeps. The CLI's is 4 MiB. Lower, every temporary of a few MB is a fresh mapping,
    zeroed page by page: at 1 MiB the fits and the GGUF rounding ran 1.3-4x slower
    (`benchmarks/scale.py --mmap-mib 1`; tc:4.5 of Gemma 3's 262,144 x 640 matrix, one thread:
    319 s against 78 s). 4 MiB is the lowest threshold measured at full speed: the higher it is,
    the more freed memory the heap may keep. Called by the CLI, which owns its
    process; a library call leaves the allocator to its host."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
