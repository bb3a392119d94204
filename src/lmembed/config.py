"""Run configuration: one flat dataclass, presets as dicts of field values, flags override.

Units. lmembed's loss is the *mean* cross-entropy per target token. Zaremba et al.'s TF code
(and Press & Wolf's, built on it) sums the loss over the `bptt` steps of a sequence, so its
learning rate 1.0 and clip norm 5 become lr = 1.0 * bptt and clip = 5 / bptt here (the same
updates, exactly). ``proj_reg`` is the coefficient of ||P||_F^2 added to that mean loss; Press &
Wolf's code adds ``l2_loss(P) / (batch * 6.5)`` to the per-sequence loss, i.e. what the paper
calls lambda = 1/6.5 ~ 0.15, which is ``paper_proj_reg(batch, bptt)`` = 1.92e-4 for the small
model (batch 20, bptt 20).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import LmembedError

ARCHS = ("lstm", "transformer")
TIE_MODES = ("none", "tied")


def paper_proj_reg(batch_size: int, bptt: int, lam: float = 1 / 6.5) -> float:
    """Press & Wolf's projection penalty expressed per target token (see module docstring)."""
    return lam / (2 * batch_size * bptt)


class ConfigDict:
    """JSON round trip shared by the run configs: unknown fields are an error naming `where`."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config"):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmembedError(f"{where}: unknown config field(s) {', '.join(unknown)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        raise NotImplementedError

    def require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise LmembedError(f"{name} = {getattr(self, name)}: must be positive")


@dataclass
class RunConfig(ConfigDict):
    # data
    data: str = "shakespeare"
    tokenize: str | None = None  # whitespace | words (None: the corpus default)
    lowercase: bool | None = None
    max_vocab: int | None = None
    min_freq: int | None = None
    bpe: int | None = None
    train_tokens: int | None = None  # use only the first N training tokens (quick runs)
    # model
    arch: str = "lstm"
    preset: str = "small"
    emb_dim: int = 200
    hidden: int = 200
    layers: int = 2
    heads: int = 4
    ff: int = 1024
    dropout: float = 0.0
    init_range: float = 0.1
    tie: str = "none"
    proj_reg: float = 0.0
    proj_bias: bool = True  # P has a bias, as in Press & Wolf's code (models/heads.py)
    # optimisation
    optimizer: str = "sgd"
    lr: float = 20.0
    lr_schedule: str = "step"  # step (Zaremba) | cosine | constant
    lr_decay: float = 0.5
    decay_start: int = 4  # epochs at the initial lr before step decay
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip: float = 0.25
    batch_size: int = 20
    bptt: int = 20
    eval_batch_size: int = 1
    epochs: int = 13
    max_steps: int | None = None  # stop after this many optimizer steps in all (big corpora)
    # run
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | fp16 | off
    ce_chunk: int = 0  # >0: chunked softmax cross-entropy, never all (tokens x V) logits at once
    compile: bool = False  # torch.compile the model for training

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise LmembedError(f"--arch {self.arch}: expected one of {', '.join(ARCHS)}")
        if self.tie not in TIE_MODES:
            raise LmembedError(f"--tie {self.tie}: expected one of {', '.join(TIE_MODES)}")
        if self.proj_reg < 0:
            raise LmembedError(f"--proj-reg {self.proj_reg}: must be >= 0 (0 turns it off)")
        if self.optimizer not in ("sgd", "adamw"):
            raise LmembedError(f"optimizer {self.optimizer!r}: expected sgd or adamw")
        if self.lr_schedule not in ("step", "cosine", "constant"):
            raise LmembedError(f"lr_schedule {self.lr_schedule!r}: expected step, cosine or constant")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise LmembedError(f"--amp {self.amp}: expected auto, bf16, fp16 or off")
        self.require_positive("emb_dim", "hidden", "layers", "batch_size", "bptt", "eval_batch_size", "epochs")
        if self.ce_chunk < 0:
            raise LmembedError(f"--ce-chunk {self.ce_chunk}: must be >= 0 (0 = off)")
        if not 0 <= self.dropout < 1:
            raise LmembedError(f"--dropout {self.dropout}: must be in [0, 1)")
        if self.tie == "tied" and self.emb_dim != self.hidden and self.proj_reg == 0:
            raise LmembedError(
                f"--tie tied needs emb_dim == hidden ({self.emb_dim} != {self.hidden}) unless a projection "
                "(--proj-reg > 0) maps the hidden state to the embedding size"
            )
        if self.arch == "transformer" and self.hidden % self.heads:
            raise LmembedError(f"transformer hidden size {self.hidden} is not divisible by heads {self.heads}")


def _lstm(size: int, **kw: Any) -> dict[str, Any]:
    return {"arch": "lstm", "emb_dim": size, "hidden": size, **kw}


# Zaremba et al. 2014 (TF `ptb_word_lm`), converted to mean-loss units (module docstring).
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("lstm", "tiny"): _lstm(32, layers=1, dropout=0.0, init_range=0.1, lr=20.0, clip=0.25, lr_decay=0.5,
                          decay_start=1, epochs=2, batch_size=8, bptt=16, eval_batch_size=4),
    ("lstm", "demo"): _lstm(128, layers=2, dropout=0.0, init_range=0.1, lr=20.0, clip=0.25, lr_decay=0.5,
                          decay_start=2, epochs=4, batch_size=20, bptt=20, eval_batch_size=10,
                          train_tokens=300_000),
    ("lstm", "small"): _lstm(200, layers=2, dropout=0.0, init_range=0.1, lr=20.0, clip=5 / 20, lr_decay=0.5,
                           decay_start=4, epochs=13, batch_size=20, bptt=20, eval_batch_size=1),
    ("lstm", "medium"): _lstm(650, layers=2, dropout=0.5, init_range=0.05, lr=35.0, clip=5 / 35, lr_decay=0.8,
                            decay_start=6, epochs=39, batch_size=20, bptt=35, eval_batch_size=1),
    ("lstm", "large"): _lstm(1500, layers=2, dropout=0.65, init_range=0.04, lr=35.0, clip=10 / 35,
                           lr_decay=1 / 1.15, decay_start=14, epochs=55, batch_size=20, bptt=35,
                           eval_batch_size=1),
    ("transformer", "tiny"): {"arch": "transformer", "emb_dim": 64, "hidden": 64, "layers": 2, "heads": 2,
                              "ff": 256, "dropout": 0.0, "init_range": 0.02, "optimizer": "adamw", "lr": 3e-3,
                              "lr_schedule": "cosine", "warmup_steps": 20, "weight_decay": 0.01, "clip": 1.0,
                              "epochs": 2, "batch_size": 8, "bptt": 32, "eval_batch_size": 8},
    ("transformer", "small"): {"arch": "transformer", "emb_dim": 256, "hidden": 256, "layers": 4, "heads": 4,
                               "ff": 1024, "dropout": 0.2, "init_range": 0.02, "optimizer": "adamw", "lr": 1e-3,
                               "lr_schedule": "cosine", "warmup_steps": 200, "weight_decay": 0.01, "clip": 1.0,
                               "epochs": 10, "batch_size": 32, "bptt": 128, "eval_batch_size": 16},
}


def preset_names(arch: str) -> list[str]:
    return [p for a, p in PRESETS if a == arch]


def make_config(arch: str = "lstm", preset: str = "small", **overrides: Any) -> RunConfig:
    """Preset values, then every override that is not None."""
    if arch not in ARCHS:
        raise LmembedError(f"--arch {arch}: expected one of {', '.join(ARCHS)}")
    if (arch, preset) not in PRESETS:
        raise LmembedError(f"--preset {preset}: unknown for {arch}; expected one of {', '.join(preset_names(arch))}")
    known = {f.name for f in fields(RunConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise LmembedError(f"unknown config field(s): {', '.join(bad)}")
    values = {**PRESETS[(arch, preset)], "arch": arch, "preset": preset}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = RunConfig(**values)
    cfg.validate()
    return cfg
