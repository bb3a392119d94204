"""lmembed: tie, compress and measure the token embeddings of language models.

Python API (the CLI is a thin layer over it). Two flows and the evaluation path they share:

    # train (lmembed.training): tied or untied LMs, translation models, downstream fine-tuning
    cfg = lmembed.make_config("lstm", "small", data="path/to/ptb", tie="tied")
    metrics = lmembed.train(cfg, "runs/ptb-tied")

    # compress (lmembed.compression): swap the embedding modules in place, save, load
    report = lmembed.compress(hf_model, "ae:128")            # or lmembed.Int4(group=32), or a list
    lmembed.save(hf_model, "out/model-ae128"); model = lmembed.load("out/model-ae128")

    # evaluate (lmembed.evaluation): open anything either flow wrote, measure it
    opened = lmembed.open_model("runs/ptb-tied")             # or "out/model-ae128", "smollm2", ...
    lmembed.evaluate_run("runs/ptb-tied", split="test"); lmembed.analyze(opened.model, opened.tokenizer)
"""

from ._version import __version__
from .compression import (
    KQ2,
    KQ3,
    KQ4,
    KQ5,
    KQ6,
    KQ8,
    RTN,
    SVD,
    AutoEncoder,
    CalibStats,
    GroupReduce,
    Int3,
    Int4,
    Int8,
    KLFinetune,
    KMixed,
    Method,
    SuperBlockQuant,
    TransformCoding,
    Trim,
    WeightedSVD,
    compress,
    load,
    parse_method,
    parse_pipeline,
    save,
)
from .compression.calibration.calibrate import calibrate
from .compression.integration.open import Opened, open_model
from .compression.integration.quantizer import install_hook as _install_hook
from .config import FinetuneConfig, RunConfig, Seq2SeqConfig, make_config, make_seq2seq_config, paper_proj_reg
from .data import Corpus, TextOptions, load_corpus
from .data.parallel import load_parallel
from .errors import LmembedError
from .evaluation.embeddings import analyze
from .models.store import load_run, load_seq2seq_run
from .tasks import load_task
from .training.finetune import finetune
from .training.lm import evaluate_run, train
from .training.seq2seq import evaluate_seq2seq_run, train_seq2seq

_install_hook()  # transformers' from_pretrained then knows lmembed's saves (lmembed.compression.integration.quantizer)

__all__ = ["__version__", "LmembedError",
           # configs and data
           "RunConfig", "Seq2SeqConfig", "FinetuneConfig", "make_config", "make_seq2seq_config", "paper_proj_reg",
           "Corpus", "TextOptions", "load_corpus", "load_parallel", "load_task",
           # train
           "train", "evaluate_run", "load_run", "train_seq2seq", "evaluate_seq2seq_run", "load_seq2seq_run",
           "finetune",
           # compress
           "compress", "save", "load", "calibrate", "CalibStats", "Method", "parse_method", "parse_pipeline",
           # every first-class method of the registry (experimental ones: lmembed.experimental)
           "SVD", "AutoEncoder", "RTN", "Int8", "Int4", "Int3", "WeightedSVD", "TransformCoding", "KMixed",
           "KLFinetune", "Trim", "GroupReduce", "SuperBlockQuant", "KQ2", "KQ3", "KQ4", "KQ5", "KQ6", "KQ8",
           # evaluate
           "open_model", "Opened", "analyze"]


def __getattr__(name: str):
    """Methods that moved to lmembed.experimental keep working from here, with a warning."""
    from . import experimental

    if name in experimental.__all__:
        import warnings

        warnings.warn(f"lmembed.{name} is experimental now: import it from lmembed.experimental "
                      f"({getattr(experimental, name).status()})", DeprecationWarning, stacklevel=2)
        return getattr(experimental, name)
    raise AttributeError(f"module 'lmembed' has no attribute {name!r}")
