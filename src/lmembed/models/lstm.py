"""Zaremba-style LSTM language model (the model of Press & Wolf's PTB experiments)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import RunConfig
from .heads import EmbeddingAPI, LMHead


def single_gate_bias(rnn: nn.LSTM) -> None:
    """One trainable, zero-initialised bias per gate, as the TF LSTM of Zaremba's and Press & Wolf's
    code. PyTorch's LSTM adds two biases (b_ih + b_hh) that receive the same gradient, so their sum
    would learn at twice the rate: b_hh is held at zero and frozen (kept, so checkpoints load)."""
    for name, p in rnn.named_parameters():
        if name.startswith("bias_"):
            nn.init.zeros_(p)
            if name.startswith("bias_hh"):
                p.requires_grad_(False)


class LSTMLM(nn.Module, EmbeddingAPI):
    recurrent = True

    def __init__(self, cfg: RunConfig, vocab_size: int):
        super().__init__()
        self.tied = cfg.tie == "tied"
        self.embedding = nn.Embedding(vocab_size, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.dropout)  # on inputs, between layers (nn.LSTM) and on the output
        self.rnn = nn.LSTM(cfg.emb_dim, cfg.hidden, cfg.layers, batch_first=True,
                           dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.head = LMHead(cfg.hidden, cfg.emb_dim, vocab_size, projection=cfg.proj_reg > 0,
                           proj_bias=cfg.proj_bias)
        for p in self.parameters():  # TF's random_uniform_initializer(-init_scale, init_scale)
            nn.init.uniform_(p, -cfg.init_range, cfg.init_range)
        single_gate_bias(self.rnn)
        self.tie_weights()  # U = V: one Parameter shared by input and output

    def forward(self, x: torch.Tensor, state=None, targets: torch.Tensor | None = None, ce_chunk: int = 0):
        """(logits, state); with targets, (mean token loss, state) — computed inside forward so that
        DistributedDataParallel sees it and the chunked softmax can skip the full logits."""
        h, state = self.rnn(self.drop(self.embedding(x)), state)
        h = self.drop(h)
        if targets is not None:
            return self.head.loss(h, targets, ce_chunk), state
        return self.head(h), state

    @staticmethod
    def detach_state(state):
        return None if state is None else tuple(s.detach() for s in state)
