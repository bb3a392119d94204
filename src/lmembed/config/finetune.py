"""Configuration of downstream fine-tuning (lmembed.training.finetune): everything that decides
the numbers of one seed, saved with every result."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LmembedError
from .base import ConfigBase, setting
from .training import DEVICE_PATTERN

EMBEDDING_MODES = ("train", "decoder", "freeze")
POOLINGS = ("mean", "cls", "last")


@dataclass
class FinetuneConfig(ConfigBase):
    what = "finetune config"
    epochs: int = setting(3, "passes over the training examples", ge=1, le=100_000)
    lr: float = setting(1e-4, "AdamW peak learning rate", gt=0, le=10)
    batch_size: int = setting(32, "examples per step", ge=1, le=1 << 16)
    eval_batch_size: int = setting(128, "examples per evaluation batch", ge=1, le=1 << 16)
    max_length: int = setting(128, "tokens per example (longer are truncated)", ge=1, le=1 << 16)
    warmup: float = setting(0.1, "fraction of steps with linear warm-up", ge=0, lt=1)
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases, norms and quantisation scales)", ge=0)
    clip: float = setting(1.0, "global gradient-norm clip (0: off)", ge=0)
    embeddings: str = setting("train", "train: all embedding parameters (codes, decoder, int scales); decoder: the "
                              "paper's protocol (factorised codes frozen, decoder trained); freeze: token embeddings "
                              "frozen", choices=EMBEDDING_MODES)
    train_scales: bool = setting(True, "in train mode, learn the fp16 scales of int8/int4 codes (the codes stay "
                                 "fixed)")
    pooling: str = setting("mean", "sentence vector: mean of the tokens, first token, or last token",
                           choices=POOLINGS)
    evals_per_epoch: int = setting(1, "validation scores per epoch (points of the learning curve)", ge=1, le=1000)
    max_train: int | None = setting(None, "train on N randomly chosen training examples", ge=1, flag=False)
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda, cuda:N", group="run")

    def check(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise LmembedError(f"--device {self.device}: expected auto, cpu, cuda or cuda:N")
