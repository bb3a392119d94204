"""Where and how a computation runs: seeds, devices, parameter counts."""

from __future__ import annotations

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
