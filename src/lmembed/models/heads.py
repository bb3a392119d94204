"""Output heads. One class covers Press & Wolf's four variants through two orthogonal switches.

- tie: the output matrix V *is* the input embedding's Parameter (U = V): one V x d matrix.
- projection (PR): an extra matrix P between the last hidden layer and V, penalised by
  ``penalty() = ||P||_F^2`` (the trainer multiplies it by ``proj_reg``).
"""

from __future__ import annotations

import torch
from torch import nn

from .softmax import chunked_cross_entropy, full_cross_entropy


class LMHead(nn.Module):
    def __init__(self, hidden: int, emb_dim: int, vocab_size: int, *, projection: bool, bias: bool = True,
                 proj_bias: bool = True):
        super().__init__()
        # P maps the hidden state to the embedding size; without it, V's width is the hidden size.
        # P has a bias by default, as in Press & Wolf's TF code (the paper writes P alone). With it
        # the tied+PR model starts slowly (PTB small: valid ppl 817 after epoch 1, tied 167) and
        # ends far better (valid / test 107.0 / 102.0; paper 104.9 / 100.9); without it
        # (proj_bias=False) tied+PR only matched tied. Measured in README, section 1.
        self.proj = nn.Linear(hidden, emb_dim, bias=proj_bias) if projection else None
        self.out = nn.Linear(emb_dim if projection else hidden, vocab_size, bias=bias)

    def tie_to(self, embedding: nn.Embedding) -> None:
        if embedding.weight.shape != self.out.weight.shape:
            raise ValueError(
                f"cannot tie: embedding {tuple(embedding.weight.shape)} vs output {tuple(self.out.weight.shape)}"
            )
        self.out.weight = embedding.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            h = self.proj(h)
        return self.out(h)

    def loss(self, h: torch.Tensor, target: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """Mean token cross-entropy; chunk > 0 never holds all (tokens x V) logits at once."""
        if not chunk or not isinstance(self.out, nn.Linear):
            return full_cross_entropy(self(h), target)
        if self.proj is not None:
            h = self.proj(h)
        return chunked_cross_entropy(h.reshape(-1, h.shape[-1]), self.out.weight, self.out.bias,
                                     target.reshape(-1), chunk)

    def penalty(self) -> torch.Tensor | None:
        return None if self.proj is None else self.proj.weight.pow(2).sum()


class EmbeddingAPI:
    """The transformers conventions (get/set input/output embeddings, tie_weights) for lmembed's
    own models, so that compression and analysis code treats them like any HF model."""

    embedding: nn.Module
    head: LMHead
    tied: bool

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.embedding = module

    def get_output_embeddings(self) -> nn.Module:
        return self.head.out

    def set_output_embeddings(self, module: nn.Module) -> None:
        self.head.out = module

    def tie_weights(self) -> None:
        if self.tied:
            self.head.tie_to(self.embedding)

    def penalty(self) -> torch.Tensor | None:
        return self.head.penalty()

    def embedding_params(self) -> int:
        """Distinct parameters in the input and output embedding matrices (tied counts once)."""
        seen = {id(self.embedding.weight): self.embedding.weight.numel()}
        seen[id(self.head.out.weight)] = self.head.out.weight.numel()
        return sum(seen.values())
