"""Configuration of an encoder-decoder (translation) run: one flat dataclass plus presets.

The optimisation fields have the same names and meaning as in RunConfig, so the LM trainer's
``lr_at`` and ``make_optimizer`` serve both trainers.

Tie modes (Press & Wolf 2017, section 6):
- ``none``: encoder input embedding, decoder input embedding and decoder output matrix are three
  separate matrices;
- ``decoder``: the decoder's input and output embeddings are one matrix;
- ``three-way`` (TWWT): the encoder's input embedding is that matrix too, which needs one
  vocabulary for both languages (``shared_vocab``: a single BPE model trained on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .config import ConfigDict
from .errors import LmembedError

SEQ2SEQ_TIE_MODES = ("none", "decoder", "three-way")


@dataclass
class Seq2SeqConfig(ConfigDict):
    # data
    data: str = "shakespeare-folio"
    bpe: int = 8000  # size of each byte-level BPE vocabulary (one if shared_vocab)
    shared_vocab: bool = False  # one BPE model trained on train.src + train.tgt
    max_len: int = 64  # tokens per side, <eos> included; longer training pairs are truncated
    train_pairs: int | None = None  # use only the first N training pairs (quick runs)
    # model: pre-LN Transformer, d_model wide
    preset: str = "small"
    d_model: int = 256
    enc_layers: int = 3
    dec_layers: int = 3
    heads: int = 4
    ff: int = 1024
    dropout: float = 0.1
    tie: str = "none"
    # optimisation (names as in RunConfig)
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    lr_decay: float = 0.5
    decay_start: int = 1
    warmup_steps: int = 200
    weight_decay: float = 0.01
    clip: float = 1.0
    label_smoothing: float = 0.1
    batch_size: int = 64  # sentence pairs per step
    epochs: int = 5
    max_steps: int | None = None
    # evaluation
    beam: int = 4
    len_penalty: float = 1.0  # beam hypotheses are ranked by log-prob / length ** len_penalty
    bleu_sample: int = 200  # valid pairs decoded greedily after each epoch (0: none)
    eval_pairs: int | None = None  # final decoding of valid/test on an evenly spaced sample of N pairs
    # run
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"

    def validate(self) -> None:
        if self.tie not in SEQ2SEQ_TIE_MODES:
            raise LmembedError(f"--tie {self.tie}: expected one of {', '.join(SEQ2SEQ_TIE_MODES)}")
        if self.tie == "three-way" and not self.shared_vocab:
            raise LmembedError("--tie three-way needs one vocabulary for source and target: add --shared-vocab "
                               "(a single BPE model trained on train.src + train.tgt)")
        if self.bpe < 260:
            raise LmembedError(f"--bpe {self.bpe}: byte-level BPE needs a vocabulary of at least 260")
        self.require_positive("d_model", "enc_layers", "dec_layers", "heads", "ff", "batch_size", "epochs", "beam")
        if self.max_len < 2:
            raise LmembedError(f"--max-len {self.max_len}: must be at least 2")
        if self.d_model % self.heads:
            raise LmembedError(f"--d-model {self.d_model} is not divisible by --heads {self.heads}")
        if not 0 <= self.dropout < 1:
            raise LmembedError(f"--dropout {self.dropout}: must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise LmembedError(f"--label-smoothing {self.label_smoothing}: must be in [0, 1)")
        if self.optimizer not in ("sgd", "adamw"):
            raise LmembedError(f"optimizer {self.optimizer!r}: expected sgd or adamw")
        if self.lr_schedule not in ("step", "cosine", "constant"):
            raise LmembedError(f"lr_schedule {self.lr_schedule!r}: expected step, cosine or constant")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise LmembedError(f"--amp {self.amp}: expected auto, bf16, fp16 or off")
        for name in ("train_pairs", "eval_pairs", "max_steps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise LmembedError(f"{name} = {v}: must be positive (or unset)")
        if self.bleu_sample < 0:
            raise LmembedError(f"--bleu-sample {self.bleu_sample}: must be >= 0")


SEQ2SEQ_PRESETS: dict[str, dict[str, Any]] = {
    # tests and smoke runs: seconds on a CPU
    "tiny": {"bpe": 300, "d_model": 32, "enc_layers": 1, "dec_layers": 1, "heads": 2, "ff": 64, "dropout": 0.0,
             "max_len": 32, "lr": 3e-3, "warmup_steps": 10, "batch_size": 16, "epochs": 2, "beam": 2,
             "bleu_sample": 20},
    # the bench on a 2-core CPU: about 13 minutes per tie mode on shakespeare-folio (2 epochs of
    # 70k pairs, full valid/test decoding). Vocabulary 8000 x width 128 puts 77 % of the untied
    # model in its three embedding matrices, so three-way tying removes 51 % of it (paper: ~52 %).
    "small": {"bpe": 8000, "d_model": 128, "enc_layers": 2, "dec_layers": 2, "heads": 4, "ff": 512, "dropout": 0.0,
              "max_len": 64, "lr": 3e-3, "warmup_steps": 200, "batch_size": 64, "epochs": 2, "beam": 4,
              "bleu_sample": 200},
}


def make_seq2seq_config(preset: str = "small", **overrides: Any) -> Seq2SeqConfig:
    """Preset values, then every override that is not None."""
    if preset not in SEQ2SEQ_PRESETS:
        raise LmembedError(f"--preset {preset}: unknown for seq2seq; expected one of {', '.join(SEQ2SEQ_PRESETS)}")
    known = {f.name for f in fields(Seq2SeqConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise LmembedError(f"unknown config field(s): {', '.join(bad)}")
    values = {**SEQ2SEQ_PRESETS[preset], "preset": preset}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = Seq2SeqConfig(**values)
    cfg.validate()
    return cfg
