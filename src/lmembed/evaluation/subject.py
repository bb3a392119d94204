"""The model under test (of `lmembed compress --eval-text` and the compression bench), with
the metric that suits it.

- causal LMs (transformers): sliding-window perplexity of a held-out text;
- masked LMs: pseudo-perplexity;
- encoders without an LM head (MiniLM): sentence fidelity, the mean cosine between the original
  and the compressed model's mean-pooled sentence embeddings (higher is better);
- lmembed runs: perplexity on their corpus' test split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..compression.integration.open import Opened, open_model
from ..data.bundled import TextOptions
from ..data.corpus import load_corpus, recorded_corpus
from ..data.texts import load_text
from ..errors import LmembedError
from .fidelity import sentence_embeddings, sentence_fidelity
from .perplexity import lm_nll, ppl
from .pretrained import EVAL_TOKENS, EVAL_WINDOW, causal_ppl, masked_pseudo_ppl, model_kind, sentences_of, text_ids
from .retokenized import causal_evaluator, encoder_evaluator


@dataclass
class Subject:
    model: torch.nn.Module
    tokenizer: Any
    kind: str
    metric: str
    lower_is_better: bool
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    eval_settings: str
    # new tokenizer -> evaluate() on the same text with it (a trimmed vocabulary); None: unsupported
    for_tokenizer: Callable[[Any], Callable[[torch.nn.Module], dict[str, float]]] | None = None


def load_subject(spec: str | Opened, *, text: str | None, max_tokens: int = EVAL_TOKENS,
                 window: int = EVAL_WINDOW, stride: int | None = None, progress: bool | None = None) -> Subject:
    """The model `spec` names (see open_model; or a model opened already) with the evaluation that
    suits it on `text`. Causal perplexity slides windows by `stride` (default: half a window)."""
    opened = spec if isinstance(spec, Opened) else open_model(spec)
    if opened.run_config is not None:
        return _run_subject(opened, text)
    model, tok = opened.model, opened.tokenizer
    kind = model_kind(model)
    raw = load_text(text or "lee:train")
    if kind == "causal":
        ids = text_ids(tok, raw, max_tokens, what=f"text {text}")
        stride = stride or window // 2
        return Subject(model, tok, kind, "ppl", True,
                       lambda m: causal_ppl(m, ids, window=window, stride=stride, progress=bool(progress)),
                       f"{len(ids)} tokens, window {window}, stride {stride}",
                       lambda t: causal_evaluator(tok, t, raw, len(ids), window=window, stride=stride,
                                                  progress=bool(progress)))
    if kind == "masked":
        lines = [ln for ln in raw.splitlines() if ln.strip()]
        budget = min(max_tokens, 4096)
        return Subject(model, tok, kind, "pseudo_ppl", True,
                       lambda m: masked_pseudo_ppl(m, tok, lines, max_tokens=budget, progress=bool(progress)),
                       f"pseudo-perplexity over {budget} tokens")
    if kind == "encoder":
        sents = sentences_of(raw, max(64, max_tokens // 16))
        if len(sents) < 8:
            raise LmembedError(f"text {text}: only {len(sents)} sentences of 4+ words; need at least 8")
        ref = sentence_embeddings(model, tok, sents)
        return Subject(model, tok, kind, "sentence_cosine", False,
                       lambda m: sentence_fidelity(ref, sentence_embeddings(m, tok, sents)),
                       f"{len(sents)} sentences, mean-pooled", lambda t: encoder_evaluator(ref, t, sents))
    raise LmembedError(f"{spec}: {type(model).__name__} ({kind}) has no bench metric yet; causal LMs, masked LMs, "
                       "encoders and lmembed runs do")


def _run_subject(opened: Opened, text: str | None) -> Subject:
    """An lmembed LM (a run, or a compressed save of one): perplexity on its corpus' split."""
    model, tok, cfg = opened.model, opened.tokenizer, opened.run_config
    spec, _, split = (text or "").partition(":")
    spec = recorded_corpus(cfg.data, spec, f"{opened.source}/config.json")
    corpus = load_corpus(spec, options=TextOptions.of(cfg), tokenizer=tok)
    ids = corpus.split(split or "test")

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        nll, n = lm_nll(m, ids, batch_size=cfg.eval_batch_size, bptt=cfg.bptt, device=torch.device("cpu"))
        return {"ppl": ppl(nll, n), "tokens": n}

    return Subject(model, tok, "lmembed", "ppl", True, evaluate, f"{corpus.name} {split or 'test'} split")
