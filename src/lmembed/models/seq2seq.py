"""Encoder-decoder Transformer (pre-LN, sinusoidal positions) with Press & Wolf's tie modes.

Tying shares the one Parameter, so the parameter count drops by exactly the shared matrices:
with d = d_model, Vs / Vt the source / target vocabularies,
    none:      Vs*d (encoder input) + Vt*d (decoder input) + Vt*d (decoder output)
    decoder:   Vs*d + Vt*d                        (output matrix = decoder input embedding)
    three-way: V*d                                (Vs = Vt = V, one matrix everywhere)
plus the output bias (Vt) and the Transformer layers, which tying does not touch.

Decoding (evaluate/translation.py) runs the decoder one token at a time with cached keys and
values: ``encode`` once, ``start`` a state, ``step`` per token, ``reorder`` for beam search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Seq2SeqConfig
from ..errors import LmembedError
from .heads import LMHead

IGNORE = -100  # target id of padding positions (skipped by the loss)


def sinusoid(start: int, length: int, d: int, device: torch.device) -> torch.Tensor:
    """Vaswani et al.'s fixed position encodings for positions start .. start+length-1 (no parameters)."""
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    out = torch.zeros(length, d, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return out


class Attention(nn.Module):
    """Multi-head attention; keys/values come from the same sequence (self) or the encoder (cross)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, heads, T, d / heads)
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               causal: bool = False) -> torch.Tensor:
        """mask: bool (B, 1, 1, S), True where a key may be attended to."""
        a = F.scaled_dot_product_attention(self._split(self.q(x)), k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        b, _, n, _ = a.shape
        return self.out(a.transpose(1, 2).reshape(b, n, -1))


def _mlp(d: int, ff: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(d), Attention(d, heads, dropout), nn.LayerNorm(d), \
            _mlp(d, ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.attn.attend(h, *self.attn.keys_values(h), mask=mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.ln1, self.self_attn = nn.LayerNorm(d), Attention(d, heads, dropout)
        self.ln2, self.cross_attn = nn.LayerNorm(d), Attention(d, heads, dropout)
        self.ln3, self.mlp = nn.LayerNorm(d), _mlp(d, ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Whole target prefix (training, cache None) or one new position per sequence (decoding):
        then `cache` holds the earlier positions' keys/values and (x, new cache) is returned."""
        h = self.ln1(x)
        k, v = self.self_attn.keys_values(h)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        x = x + self.drop(self.self_attn.attend(h, k, v, causal=cache is None))
        x = x + self.drop(self.cross_attn.attend(self.ln2(x), *memory_kv, mask=mask))
        x = x + self.drop(self.mlp(self.ln3(x)))
        return x if cache is None else (x, (k, v))


@dataclass
class DecoderState:
    """Per-sequence decoding state: encoder keys/values per layer, self-attention caches, position."""

    memory_kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    cache: list[tuple[torch.Tensor, torch.Tensor]]
    pos: int = 0


class Seq2SeqTransformer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, src_vocab: int, tgt_vocab: int):
        super().__init__()
        cfg.validate()
        if cfg.tie == "three-way" and src_vocab != tgt_vocab:
            raise LmembedError(f"--tie three-way needs one shared vocabulary, got {src_vocab:,} source and "
                               f"{tgt_vocab:,} target tokens (use --shared-vocab)")
        d = cfg.d_model
        self.tie = cfg.tie
        self.d_model = d
        self.src_embedding = nn.Embedding(src_vocab, d)
        self.tgt_embedding = nn.Embedding(tgt_vocab, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(d, cfg.heads, cfg.ff, cfg.dropout) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d, cfg.heads, cfg.ff, cfg.dropout) for _ in range(cfg.dec_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.head = LMHead(d, d, tgt_vocab, projection=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):  # std d^-1/2: scaled by sqrt(d) on input, unit scale as output
                nn.init.normal_(m.weight, std=d ** -0.5)
        self.tie_weights()

    # --- the embedding conventions of models/heads.EmbeddingAPI, for an encoder-decoder --------
    def get_input_embeddings(self) -> nn.Module:
        """The encoder's input embedding (transformers' convention for encoder-decoders)."""
        return self.src_embedding

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.src_embedding = module

    def get_decoder_input_embeddings(self) -> nn.Module:
        return self.tgt_embedding

    def get_output_embeddings(self) -> nn.Module:
        return self.head.out

    def set_output_embeddings(self, module: nn.Module) -> None:
        self.head.out = module

    def tie_weights(self) -> None:
        """Share Parameters as the tie mode says (again after loading or replacing modules)."""
        if self.tie in ("decoder", "three-way"):
            self.head.tie_to(self.tgt_embedding)
        if self.tie == "three-way":
            self.src_embedding.weight = self.tgt_embedding.weight

    def embedding_params(self) -> int:
        """Distinct parameters in the three embedding matrices (a shared one counts once)."""
        mats = {id(m.weight): m.weight.numel() for m in (self.src_embedding, self.tgt_embedding, self.head.out)}
        return sum(mats.values())

    # --- forward ----------------------------------------------------------------------------------
    def _embed(self, emb: nn.Module, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = emb(ids) * math.sqrt(self.d_model) + sinusoid(start, ids.shape[1], self.d_model, ids.device)
        return self.drop(x)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """src: (B, S) ids, src_mask: (B, S) True on real tokens."""
        mask = src_mask[:, None, None, :]
        x = self._embed(self.src_embedding, src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x)

    def decode(self, memory: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Final decoder states for a whole (teacher-forced) target prefix."""
        mask = src_mask[:, None, None, :]
        x = self._embed(self.tgt_embedding, tgt_in)
        for layer in self.decoder:
            x = layer(x, layer.cross_attn.keys_values(memory), mask)
        return self.dec_norm(x)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor,
                targets: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
        """Logits (B, T, Vt); with targets, the mean loss over non-padding target tokens."""
        h = self.decode(self.encode(src, src_mask), src_mask, tgt_in)
        logits = self.head(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE, label_smoothing=label_smoothing)

    @torch.no_grad()
    def token_nll(self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor,
                  targets: torch.Tensor) -> tuple[float, int]:
        """Summed NLL (no smoothing) and number of target tokens: perplexity's two halves."""
        logits = self(src, src_mask, tgt_in)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              ignore_index=IGNORE, reduction="sum")
        return nll.item(), int((targets != IGNORE).sum())

    # --- incremental decoding -----------------------------------------------------------------
    def start(self, memory: torch.Tensor, src_mask: torch.Tensor) -> DecoderState:
        kv = [layer.cross_attn.keys_values(memory) for layer in self.decoder]
        b, dev = memory.shape[0], memory.device
        dh = self.d_model // self.decoder[0].self_attn.heads if len(self.decoder) else 0
        empty = [(memory.new_zeros(b, layer.self_attn.heads, 0, dh), memory.new_zeros(b, layer.self_attn.heads, 0, dh))
                 for layer in self.decoder]
        return DecoderState(kv, src_mask[:, None, None, :].to(dev), empty, 0)

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """Log-probabilities (B, Vt) of the next token after `tokens` (B,), the last ones fed."""
        x = self._embed(self.tgt_embedding, tokens[:, None], state.pos)
        cache = []
        for layer, kv, c in zip(self.decoder, state.memory_kv, state.cache, strict=True):
            x, c = layer(x, kv, state.mask, c)
            cache.append(c)
        logits = self.head(self.dec_norm(x))[:, 0].float()
        return torch.log_softmax(logits, dim=-1), DecoderState(state.memory_kv, state.mask, cache, state.pos + 1)

    @staticmethod
    def reorder(state: DecoderState, index: torch.Tensor) -> DecoderState:
        """Keep/duplicate sequences by batch index (beam search)."""
        def sel(kv):
            return kv[0].index_select(0, index), kv[1].index_select(0, index)

        return DecoderState([sel(kv) for kv in state.memory_kv], state.mask.index_select(0, index),
                            [sel(c) for c in state.cache], state.pos)


def build_seq2seq(cfg: Seq2SeqConfig, src_vocab: int, tgt_vocab: int) -> Seq2SeqTransformer:
    return Seq2SeqTransformer(cfg, src_vocab, tgt_vocab)
