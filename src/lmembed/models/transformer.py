"""Decoder-only pre-LN Transformer LM with causal scaled-dot-product attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from .heads import EmbeddingAPI, LMHead


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.attn_out(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TransformerLM(nn.Module, EmbeddingAPI):
    recurrent = False

    def __init__(self, cfg: RunConfig, vocab_size: int):
        super().__init__()
        self.tied = cfg.tie == "tied"
        self.max_len = cfg.bptt
        self.embedding = nn.Embedding(vocab_size, cfg.emb_dim)
        self.in_proj = nn.Linear(cfg.emb_dim, cfg.hidden) if cfg.emb_dim != cfg.hidden else nn.Identity()
        self.pos = nn.Embedding(cfg.bptt, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads, cfg.ff, cfg.dropout) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.head = LMHead(cfg.hidden, cfg.emb_dim, vocab_size, projection=cfg.proj_reg > 0,
                           proj_bias=cfg.proj_bias)
        for m in self.modules():  # GPT-2 style: N(0, init_range) weights, zero biases, LayerNorm as is
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.init_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.tie_weights()

    def forward(self, x: torch.Tensor, state=None, targets: torch.Tensor | None = None, ce_chunk: int = 0):
        """(logits, None); with targets, (mean token loss, None) — see LSTMLM.forward."""
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's context of {self.max_len}")
        h = self.in_proj(self.embedding(x)) + self.pos(torch.arange(t, device=x.device))
        h = self.drop(h)
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        if targets is not None:
            return self.head.loss(h, targets, ce_chunk), None
        return self.head(h), None

    @staticmethod
    def detach_state(state):
        return None
