"""The two formats without codes: a plain dense matrix and rank-k factors.

``DenseEmbedding`` stores the matrix as it is (any float dtype), the baseline every ratio is
against and the form a vocabulary-only pipeline (trim) leaves. ``FactorizedEmbedding`` stores
A (V x k) and B (k x d), what ``svd``, ``wsvd`` and the autoencoders produce; its head multiplies
through the bottleneck, h B^T A^T, which costs k(V + d) per position instead of V d.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompressedEmbedding, build_module, register_module


@register_module
class DenseEmbedding(CompressedEmbedding):
    """A plain matrix (the codes of a factorisation, or a trimmed vocabulary)."""

    kind = "dense"
    FORMAT_VERSION = 1  # formats/base.py: bump when its stored form changes
    gguf_form = "plain"

    def __init__(self, weight: torch.Tensor, *, scale: float = 1.0):
        super().__init__(weight.shape[0], weight.shape[1], scale=scale)
        self.weight = nn.Parameter(weight.detach().clone())

    @classmethod
    def wrap(cls, weight: nn.Parameter, *, scale: float = 1.0) -> DenseEmbedding:
        """A module around an existing Parameter (shared, not copied)."""
        module = cls(weight.new_empty(0, weight.shape[1]), scale=scale)
        module.num_embeddings = int(weight.shape[0])
        module.weight = weight
        return module

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> DenseEmbedding:
        dtype = getattr(torch, spec.get("dtype", "float32"))
        return cls(torch.zeros(spec["num_embeddings"], spec["embedding_dim"], dtype=dtype), scale=spec["scale"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "dtype": str(self.weight.dtype).removeprefix("torch.")}

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.to(h.dtype).t()

    def dense(self) -> torch.Tensor:
        return self.weight.detach().float()

    def plain_parameter(self) -> nn.Parameter:
        return self.weight


@register_module
class FactorizedEmbedding(CompressedEmbedding):
    """E ~ codes @ decoder + bias: codes V x k (itself any CompressedEmbedding, so codes can be
    quantised), decoder k x d, optional bias d (the autoencoder's decoder has one)."""

    kind = "factorized"
    FORMAT_VERSION = 1  # formats/base.py: bump when its stored form changes

    def __init__(self, codes: CompressedEmbedding | torch.Tensor, decoder: torch.Tensor,
                 bias: torch.Tensor | None = None, *, scale: float = 1.0):
        if isinstance(codes, torch.Tensor):
            codes = DenseEmbedding(codes)
        super().__init__(codes.num_embeddings, decoder.shape[1], scale=scale)
        if codes.embedding_dim != decoder.shape[0]:
            raise ValueError(f"codes have rank {codes.embedding_dim}, decoder {tuple(decoder.shape)}")
        self.rank = int(decoder.shape[0])
        self.codes = codes
        self.decoder = nn.Parameter(decoder.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> FactorizedEmbedding:
        codes = build_module(spec["codes"])
        bias = torch.zeros(spec["embedding_dim"]) if spec.get("bias") else None
        return cls(codes, torch.zeros(spec["rank"], spec["embedding_dim"]), bias, scale=spec["scale"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "rank": self.rank, "bias": self.bias is not None, "codes": self.codes.spec()}

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        z = self.codes.lookup(ids)
        out = z @ self.decoder.to(z.dtype)
        return out + self.bias.to(z.dtype) if self.bias is not None else out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.codes.logits(h @ self.decoder.to(h.dtype).t())
        if self.bias is not None:
            out = out + (h @ self.bias.to(h.dtype)).unsqueeze(-1)
        return out

    def plain_codes(self) -> torch.Tensor | None:
        return self.codes.plain_parameter()

    def with_codes(self, codes: CompressedEmbedding) -> FactorizedEmbedding:
        return FactorizedEmbedding(codes, self.decoder.detach(), self.bias.detach() if self.bias is not None else None)

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [self.decoder] + ([self.bias] if self.bias is not None else [])
