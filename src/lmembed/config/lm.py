"""Configuration of a language-model run: one flat dataclass, presets as dicts of field values.

Units. lmembed's loss is the *mean* cross-entropy per target token. Zaremba et al.'s TF code
(and Press & Wolf's, built on it) sums the loss over the `bptt` steps of a sequence, so its
learning rate 1.0 and clip norm 5 become lr = 1.0 * bptt and clip = 5 / bptt here (the same
updates, exactly). ``proj_reg`` is the coefficient of ||P||_F^2 added to that mean loss; Press &
Wolf's code adds ``l2_loss(P) / (batch * 6.5)`` to the per-sequence loss, i.e. what the paper
calls lambda = 1/6.5 ~ 0.15, which is ``paper_proj_reg(batch, bptt)`` = 1.92e-4 for the small
model (batch 20, bptt 20).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.vocab import BPE_MIN_VOCAB
from ..errors import LmembedError
from .base import setting
from .training import MAX_DIM, MAX_LAYERS, TrainingSettings

ARCHS = ("lstm", "transformer")
TIE_MODES = ("none", "tied")
SPLITTERS = ("whitespace", "words")


def paper_proj_reg(batch_size: int, bptt: int, lam: float = 1 / 6.5) -> float:
    """Press & Wolf's projection penalty expressed per target token (see module docstring)."""
    return lam / (2 * batch_size * bptt)


@dataclass
class RunConfig(TrainingSettings):
    what = "run config"
    # data
    data: str = setting("shakespeare", "bundled corpus name or a directory in PTB / WikiText / "
                        "{train,valid,test}.txt layout", group="data")
    tokenize: str | None = setting(None, "split on whitespace (pre-tokenised corpora) or into words and "
                                   "punctuation (raw text); default: the corpus' own", choices=SPLITTERS, group="data")
    lowercase: bool | None = setting(None, "lower-case the text (default: the corpus' own)", group="data")
    max_vocab: int | None = setting(None, "keep the N most frequent words, the rest become <unk>", ge=1,
                                    group="data")
    min_freq: int | None = setting(None, "words seen fewer times in train become <unk>", ge=1, group="data")
    bpe: int | None = setting(None, "byte-level BPE vocabulary of size N instead of words", ge=BPE_MIN_VOCAB,
                              le=1 << 22, group="data")
    train_tokens: int | None = setting(None, "train on the first N tokens only", ge=1, group="data")
    # model
    arch: str = setting("lstm", "model family", choices=ARCHS)
    preset: str = setting("small", "lstm: tiny, demo, small, medium, large; transformer: tiny, small")
    emb_dim: int = setting(200, "embedding size d", ge=1, le=MAX_DIM)
    hidden: int = setting(200, "hidden size", ge=1, le=MAX_DIM)
    layers: int = setting(2, "LSTM / Transformer layers", ge=1, le=MAX_LAYERS)
    heads: int = setting(4, "attention heads (transformer)", ge=1, le=1024)
    ff: int = setting(1024, "feed-forward width (transformer)", ge=1, le=16 * MAX_DIM)
    dropout: float = setting(0.0, "dropout probability", ge=0, lt=1)
    init_range: float = setting(0.1, "weights start uniform in [-r, r] (LSTM) or normal with std r", gt=0, le=10)
    tie: str = setting("none", "tied: one matrix for input and output (U = V)", choices=TIE_MODES)
    proj_reg: float = setting(0.0, "projection P before the output embedding with penalty LAMBDA*||P||^2 added "
                              "to the mean token loss (0 = off; Press & Wolf's setting is 1/(13*batch*bptt))", ge=0)
    proj_bias: bool = setting(True, "give the projection P a bias (as in Press & Wolf's code; --no-proj-bias: P "
                              "alone, as the paper writes it)")
    bptt: int = setting(20, "tokens per training sequence (backpropagation through time)", ge=1, le=1 << 20)
    eval_batch_size: int = setting(1, "rows of the evaluation stream", ge=1, le=1 << 20)
    ce_chunk: int = setting(0, "chunked softmax cross-entropy, N tokens at a time: never holds all (tokens x V) "
                            "logits (large vocabularies; 0 = off)", ge=0, group="run")
    compile: bool = setting(False, "torch.compile the model", group="run")

    def check(self) -> None:
        super().check()
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
                          decay_start=2, epochs=2, batch_size=20, bptt=20, eval_batch_size=10,
                          train_tokens=150_000),  # `make demo`: the two models in about 3 minutes on 2 cores
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
    return RunConfig.from_values({**PRESETS[(arch, preset)], "arch": arch, "preset": preset}, overrides)
