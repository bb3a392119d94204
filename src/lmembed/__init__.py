"""lmembed: tie, compress and measure the token embeddings of language models.

Python API (the CLI is a thin layer over it):

    cfg = lmembed.make_config("lstm", "small", data="path/to/ptb", tie="tied")
    metrics = lmembed.train(cfg, "runs/ptb-tied")
    model, tokenizer, cfg = lmembed.load_run("runs/ptb-tied")
    lmembed.evaluate_run("runs/ptb-tied", split="test")

    report = lmembed.compress(hf_model, "ae:128")   # swaps the embedding modules in place
    lmembed.save(hf_model, "out/model-ae128"); model = lmembed.load("out/model-ae128")
"""

__version__ = "0.1.0"

from .analysis import analyze  # noqa: E402
from .compress import compress, load, save  # noqa: E402
from .compress.calibrate import calibrate  # noqa: E402
from .config import RunConfig, make_config, paper_proj_reg  # noqa: E402
from .data import Corpus, TextOptions, load_corpus  # noqa: E402
from .data.parallel import load_parallel  # noqa: E402
from .errors import LmembedError  # noqa: E402
from .runs import load_run  # noqa: E402
from .seq2seq_config import Seq2SeqConfig, make_seq2seq_config  # noqa: E402
from .tasks import load_task  # noqa: E402
from .train import evaluate_run, train  # noqa: E402
from .train_seq2seq import evaluate_seq2seq_run, load_seq2seq_run, train_seq2seq  # noqa: E402

__all__ = ["__version__", "analyze", "compress", "calibrate", "save", "load", "RunConfig", "make_config",
           "paper_proj_reg", "Corpus", "TextOptions", "load_corpus", "load_parallel", "LmembedError", "load_run",
           "Seq2SeqConfig", "load_task", "make_seq2seq_config", "evaluate_run",
           "train", "evaluate_seq2seq_run", "load_seq2seq_run", "train_seq2seq"]
