"""Run configurations: each field declared once (type, bounds, help), checked the same way
whether it comes from a flag, the Python API or a file, and turned into CLI flags."""

from .finetune import EMBEDDING_MODES, POOLINGS, FinetuneConfig
from .lm import ARCHS, PRESETS, TIE_MODES, RunConfig, make_config, paper_proj_reg, preset_names
from .seq2seq import SEQ2SEQ_PRESETS, SEQ2SEQ_TIE_MODES, Seq2SeqConfig, make_seq2seq_config

__all__ = ["ARCHS", "PRESETS", "TIE_MODES", "RunConfig", "make_config", "paper_proj_reg", "preset_names",
           "SEQ2SEQ_PRESETS", "SEQ2SEQ_TIE_MODES", "Seq2SeqConfig", "make_seq2seq_config", "FinetuneConfig",
           "EMBEDDING_MODES", "POOLINGS"]
