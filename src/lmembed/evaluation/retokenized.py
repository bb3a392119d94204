"""Evaluate a model whose vocabulary was trimmed, with its remapped tokenizer, on the same text.

A trimmed tokenizer splits words whose tokens were dropped into more, shorter tokens, so a
per-token perplexity is no longer comparable with the original's. The causal metric here is the
total negative log-likelihood of the *same stretch of text* divided by the number of tokens the
original tokenizer makes of it: exp(nll_per_new_token * new_tokens / original_tokens). With the
original tokenizer it is exactly the usual perplexity; a trimmed model pays for every extra
token it needs. Unknown tokens produced by the new tokenizer are counted and reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..compression.methods.trim import unk_id
from .fidelity import sentence_embeddings, sentence_fidelity
from .pretrained import causal_ppl, text_ids

Evaluate = Callable[[torch.nn.Module], dict[str, float]]


def text_span(tokenizer: Any, raw: str, n_tokens: int) -> str:
    """The prefix of `raw` that the first n_tokens tokens of the original tokenizer cover."""
    enc = tokenizer(raw, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    offsets = enc["offset_mapping"]
    if n_tokens >= len(offsets):
        return raw
    return raw[: offsets[n_tokens - 1][1]]


def count_unk(tokenizer: Any, ids: list[int] | torch.Tensor) -> int:
    unk = unk_id(tokenizer)
    if unk is None:
        return 0
    return int((torch.as_tensor(ids) == unk).sum())


def causal_evaluator(tokenizer: Any, new_tokenizer: Any, raw: str, n_tokens: int, *, window: int, stride: int,
                     progress: bool) -> Evaluate:
    """Token-count-normalised perplexity of the trimmed model on the original evaluation text."""
    span = text_span(tokenizer, raw, n_tokens)
    ids = text_ids(new_tokenizer, span, None, what="evaluation text (trimmed tokenizer)")
    n_unk = count_unk(new_tokenizer, ids)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        r = causal_ppl(model, ids, window=window, stride=stride, progress=progress)
        return {"ppl": math.exp(r["nll"] * len(ids) / n_tokens), "ppl_per_token": r["ppl"], "nll": r["nll"],
                "tokens": r["tokens"], "tokens_text": len(ids), "tokens_original": n_tokens, "unk_tokens": n_unk}

    return evaluate


def encoder_evaluator(reference: torch.Tensor, new_tokenizer: Any, sentences: list[str]) -> Evaluate:
    """Sentence fidelity against the original model's embeddings, sentences re-tokenised."""
    enc = new_tokenizer(sentences, add_special_tokens=False)["input_ids"]
    n_unk = sum(count_unk(new_tokenizer, ids) for ids in enc if ids)
    n_tok = sum(len(ids) for ids in enc)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {**sentence_fidelity(reference, sentence_embeddings(model, new_tokenizer, sentences)),
                "unk_tokens": n_unk, "tokens_text": n_tok}

    return evaluate
