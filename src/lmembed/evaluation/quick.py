"""The quality figure `lmembed compress` prints by default: fast, on text no calibration reads.

Matrix proxies (relative error, kNN overlap) can rank methods backwards: on SmolLM2 `tc:4.5` has a
larger relative error than `kq4:g32` (0.10 vs 0.08) and a sixth of its perplexity cost (+1.0 % vs
+6.8 %). So compress measures what users judge by, on the bundled `wiki:test` (Wikipedia article
leads; the default calibration samples the model itself and never reads it), sized to take
seconds, not minutes: perplexity over 4,096 tokens in non-overlapping 512-token windows for a
causal LM, pseudo-perplexity over 512 tokens for a masked LM, the cosine of mean-pooled sentence
embeddings over 256 sentences for an encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..common.steps import Steps
from ..compression.integration.open import Opened
from ..errors import LmembedError
from .pretrained import model_kind
from .subject import Subject, load_subject

QUICK_TEXT = "wiki:test"
QUICK_TOKENS = {"causal": 4096, "masked": 512, "encoder": 4096}  # encoders: max_tokens // 16 sentences
QUICK_WINDOW = 512


@dataclass
class QualityCheck:
    """The dense model's figure, measured before compression, and how to measure it again after."""

    subject: Subject
    text: str
    before: dict[str, float]

    def after(self, model: torch.nn.Module, new_tok: Any, steps: Steps) -> dict[str, Any]:
        if new_tok is not None and self.subject.for_tokenizer is None:
            raise LmembedError(f"quality check: a {self.subject.metric} evaluation of a trimmed vocabulary is not "
                               "supported; pass --no-eval")
        measure = self.subject.evaluate if new_tok is None else self.subject.for_tokenizer(new_tok)
        with steps.step("evaluate compressed") as s:
            after = measure(model)
            s.note = f"{self.subject.metric} {after[self.subject.metric]:.4g}"
        m = self.subject.metric
        return {"text": self.text, "metric": m, "settings": self.subject.eval_settings, "dense": self.before,
                "compressed": after, "delta_pct": 100 * (after[m] / self.before[m] - 1),
                "lower_is_better": self.subject.lower_is_better}


def quality_check(opened: Opened, text: str | None, max_tokens: int | None, steps: Steps) -> QualityCheck | None:
    """Measure the dense model now (it is compressed in place next). None, with one line saying why,
    when the default text cannot serve (its package is missing, the model has no metric yet); a
    text the user named fails loudly instead."""
    kind = "run" if opened.run_config is not None else model_kind(opened.model)
    chosen = text if text is not None or kind == "run" else QUICK_TEXT
    tokens = max_tokens or QUICK_TOKENS.get(kind, 4096)
    try:
        subject = load_subject(opened, text=chosen, max_tokens=tokens, window=QUICK_WINDOW, stride=QUICK_WINDOW,
                               progress=steps.bars)
    except LmembedError as e:
        if text is not None:
            raise
        steps.say(f"quality check skipped ({e}); pass --eval-text, or --no-eval")
        return None
    text = chosen
    with steps.step("evaluate dense") as s:
        before = subject.evaluate(subject.model)
        where = text or "its test split"
        s.note = f"{subject.metric} {before[subject.metric]:.4g} on {where} ({subject.eval_settings})"
    return QualityCheck(subject, text or "test split", before)
