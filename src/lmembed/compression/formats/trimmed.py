"""A smaller vocabulary's matrix that still answers in the original token ids.

``TrimmedEmbedding`` wraps the V' x d inner format that later stages compressed and the ``kept``
ids (counted in its bytes), so a saved model still says which original token each row is; the
tokenizer and config are remapped to V' by methods/trim.py, which is what makes the trimmed model
a real smaller model rather than a lookup shim.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import CompressedEmbedding, Container, build_module, index_dtype, register_module


@register_module
class TrimmedEmbedding(Container):
    """A module over a trimmed vocabulary: rows are the kept tokens, renumbered 0..V'-1.

    Lookups and logits go straight to `inner` (the tokenizer already speaks the new ids);
    `kept` (new id -> original id, the smallest integer dtype that fits) is bookkeeping."""

    kind = "trimmed"
    FORMAT_VERSION = 1  # formats/base.py: bump when its stored form changes

    def __init__(self, inner: CompressedEmbedding, kept: torch.Tensor, original_vocab: int):
        super().__init__(inner.num_embeddings, inner.embedding_dim)
        if kept.shape != (inner.num_embeddings,):
            raise ValueError(f"kept ids {tuple(kept.shape)} do not match {inner.num_embeddings} rows")
        self.inner = inner
        self.original_vocab = int(original_vocab)
        self.register_buffer("kept", kept.to(index_dtype(self.original_vocab)))

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> TrimmedEmbedding:
        inner = build_module(spec["inner"])
        return cls(inner, torch.zeros(inner.num_embeddings, dtype=torch.int64), spec["original_vocab"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "original_vocab": self.original_vocab, "inner": self.inner.spec()}

    def parts(self) -> list[CompressedEmbedding]:
        return [self.inner]

    def with_parts(self, parts: list[CompressedEmbedding]) -> TrimmedEmbedding:
        (inner,) = parts
        return TrimmedEmbedding(inner, self.kept, self.original_vocab)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.lookup(ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(h)

    def dense(self) -> torch.Tensor:
        return self.inner.dense()

    def split_vocabulary(self) -> tuple[CompressedEmbedding, torch.Tensor]:
        return self.inner, self.kept
