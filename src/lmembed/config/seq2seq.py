"""Configuration of an encoder-decoder (translation) run: one flat dataclass plus presets.

The optimisation fields are declared once (config.training.TrainingSettings), so the trainers'
``lr_at`` and ``make_optimizer`` serve both.

Tie modes (Press & Wolf 2017, section 6):
- ``none``: encoder input embedding, decoder input embedding and decoder output matrix are three
  separate matrices;
- ``decoder``: the decoder's input and output embeddings are one matrix;
- ``three-way`` (TWWT): the encoder's input embedding is that matrix too, which needs one
  vocabulary for both languages (``shared_vocab``: a single BPE model trained on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.vocab import BPE_MIN_VOCAB
from ..errors import LmembedError
from .base import setting
from .training import MAX_DIM, MAX_LAYERS, TrainingSettings, like

SEQ2SEQ_TIE_MODES = ("none", "decoder", "three-way")


@dataclass
class Seq2SeqConfig(TrainingSettings):
    what = "seq2seq run config"
    # optimisation defaults of a Transformer (the fields themselves: TrainingSettings)
    optimizer: str = like(TrainingSettings, "optimizer", "adamw")
    lr: float = like(TrainingSettings, "lr", 1e-3)
    lr_schedule: str = like(TrainingSettings, "lr_schedule", "cosine")
    decay_start: int = like(TrainingSettings, "decay_start", 1)
    warmup_steps: int = like(TrainingSettings, "warmup_steps", 200)
    weight_decay: float = like(TrainingSettings, "weight_decay", 0.01)
    clip: float = like(TrainingSettings, "clip", 1.0)
    batch_size: int = like(TrainingSettings, "batch_size", 64)
    epochs: int = like(TrainingSettings, "epochs", 5)
    # data
    data: str = setting("shakespeare-folio", "bundled parallel corpus (shakespeare-folio) or a directory with "
                        "train/valid/test .src/.tgt", group="data")
    bpe: int = setting(8000, "size of each byte-level BPE vocabulary (one if --shared-vocab)", ge=BPE_MIN_VOCAB,
                       le=1 << 22, group="data")
    shared_vocab: bool = setting(False, "one BPE vocabulary trained on both sides (required by --tie three-way)",
                                 group="data")
    max_len: int = setting(64, "tokens per side, <eos> included; longer training pairs are truncated", ge=2,
                           le=1 << 16, group="data")
    train_pairs: int | None = setting(None, "use only the first N training pairs (quick runs)", ge=1, group="data")
    # model: pre-LN Transformer, d_model wide
    preset: str = setting("small", "tiny or small")
    d_model: int = setting(256, "model width", ge=1, le=MAX_DIM)
    enc_layers: int = setting(3, "encoder layers", ge=1, le=MAX_LAYERS)
    dec_layers: int = setting(3, "decoder layers", ge=1, le=MAX_LAYERS)
    heads: int = setting(4, "attention heads", ge=1, le=1024)
    ff: int = setting(1024, "feed-forward width", ge=1, le=16 * MAX_DIM)
    dropout: float = setting(0.1, "dropout probability", ge=0, lt=1)
    tie: str = setting("none", "none: 3 matrices; decoder: decoder input = output embedding; three-way: also the "
                       "encoder's (needs --shared-vocab)", choices=SEQ2SEQ_TIE_MODES)
    label_smoothing: float = setting(0.1, "label smoothing of the training loss", ge=0, lt=1)
    # evaluation
    beam: int = setting(4, "beam size of the final test decoding", ge=1, le=256)
    len_penalty: float = setting(1.0, "beam hypotheses are ranked by log-prob / length ** len_penalty", ge=0)
    bleu_sample: int = setting(200, "valid pairs decoded greedily after each epoch (0: none)", ge=0)
    eval_pairs: int | None = setting(None, "final decoding of valid/test on an evenly spaced sample of N pairs",
                                     ge=1)

    def check(self) -> None:
        super().check()
        if self.tie == "three-way" and not self.shared_vocab:
            raise LmembedError("--tie three-way needs one vocabulary for source and target: add --shared-vocab "
                               "(a single BPE model trained on train.src + train.tgt)")
        if self.d_model % self.heads:
            raise LmembedError(f"--d-model {self.d_model} is not divisible by --heads {self.heads}")


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
    return Seq2SeqConfig.from_values({**SEQ2SEQ_PRESETS[preset], "preset": preset}, overrides)
