"""Settings every trainer shares (optimiser, schedule, run), declared once for the LM and
translation configs, and the size limits that keep a typo from allocating terabytes."""

from __future__ import annotations

import re
from dataclasses import Field, dataclass, field, fields

from ..errors import LmembedError
from .base import ConfigBase, setting

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
MAX_DIM = 1 << 16  # widest layer any preset or paper uses is 1500; beyond this it is a typo
MAX_LAYERS = 1024
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class TrainingSettings(ConfigBase):
    """Optimisation and run fields with one meaning in every trainer (lr_at, make_optimizer)."""

    optimizer: str = setting("sgd", "optimiser", choices=OPTIMIZERS)
    lr: float = setting(20.0, "peak learning rate (mean-loss units: Zaremba's 1.0 is 1.0*bptt)", gt=0, le=1e6)
    lr_schedule: str = setting("step", "learning-rate schedule", choices=SCHEDULES)
    lr_decay: float = setting(0.5, "step schedule: factor per epoch after --decay-start", gt=0, le=1)
    decay_start: int = setting(4, "step schedule: epochs at the initial learning rate", ge=0)
    warmup_steps: int = setting(0, "steps of linear learning-rate warm-up", ge=0)
    weight_decay: float = setting(0.0, "decoupled weight decay (adamw) or L2 (sgd)", ge=0)
    clip: float = setting(0.25, "global gradient-norm clip (0: off)", ge=0)
    batch_size: int = setting(20, "sequences per optimizer step", ge=1, le=1 << 20)
    epochs: int = setting(13, "passes over the training data", ge=1, le=100_000)
    max_steps: int | None = setting(None, "stop after this many optimizer steps in all (big corpora)", ge=1)
    seed: int = setting(0, "seed of initialisation, data order and dropout", ge=0, group="run")
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda, cuda:N", group="run")
    amp: str = setting("auto", "mixed precision: auto (bf16 on CUDA), bf16, fp16 or off", choices=AMP_MODES,
                       group="run")

    def check(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise LmembedError(f"--device {self.device}: expected auto, cpu, cuda or cuda:N")


def like(cls: type, name: str, default: object) -> Field:
    """The field `name` of `cls` (help, bounds) with another default, for a subclass."""
    f = next(f for f in fields(cls) if f.name == name)
    return field(default=default, metadata=f.metadata)
