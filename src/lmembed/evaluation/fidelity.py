"""How close a compressed encoder stays to the original: sentence fidelity compares what the
encoder does with its rows (mean-pooled sentence embeddings of a real text, before and after).
The matrix itself is compared in lmembed.compression.methods.fit_quality."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: list[str], *, batch_size: int = 32,
                        max_length: int = 128, device: torch.device | None = None) -> torch.Tensor:
    """Attention-mask-weighted mean of the last hidden state (sentence-transformers' pooling)."""
    device = device or next(model.parameters()).device
    out = []
    for s in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[s : s + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = getattr(model(**enc), "last_hidden_state", None)
        if hidden is None:
            raise ValueError(f"{type(model).__name__} returns no last_hidden_state")
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out).float().cpu()


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        # average the ranks of tied values
        uniq, inv = torch.unique(v, return_inverse=True)
        if len(uniq) < len(v):
            sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
            counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
            r = (sums / counts)[inv]
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx @ ry / (rx.norm() * ry.norm()).clamp_min(1e-30)).item()


def sentence_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean cosine between paired sentence embeddings, and Spearman of all pairwise similarities."""
    cos = F.cosine_similarity(reference, candidate, dim=-1).mean().item()
    ra, rb = F.normalize(reference, dim=-1), F.normalize(candidate, dim=-1)
    iu = torch.triu_indices(len(ra), len(ra), offset=1)
    sa, sb = (ra @ ra.t())[iu[0], iu[1]], (rb @ rb.t())[iu[0], iu[1]]
    return {"sentence_cosine": cos, "pairwise_spearman": spearman(sa, sb)}
