"""Translation quality: greedy and beam-search decoding, corpus BLEU and chrF via sacrebleu.

Decoding feeds <eos> as the start symbol (as in training) and stops a hypothesis at its first
<eos>. Beam search keeps `beam` hypotheses per sentence; a finished one is carried along
unchanged, and the final choice is the hypothesis with the best log-probability / length **
`len_penalty` (length in tokens, <eos> included; 0 = raw log-probability). Sentences are
decoded in batches sorted by source length, and returned in their original order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.parallel import collate_source, length_batches
from ..errors import LmembedError


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise LmembedError("BLEU and chrF need sacrebleu: pip install sacrebleu (or lmembed[seq2seq])") from None
    return sacrebleu


def bleu_chrf(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (13a tokenisation) and chrF (character 6-grams, beta 2), both 0-100."""
    sb = _sacrebleu()
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    return {"bleu": float(sb.corpus_bleu(list(hyps), [list(refs)]).score),
            "chrf": float(sb.corpus_chrf(list(hyps), [list(refs)]).score)}


def _max_steps(src_len: int, limit: int) -> int:
    return min(limit, int(src_len * 1.5) + 10)


@torch.no_grad()
def greedy(model, src: torch.Tensor, mask: torch.Tensor, eos: int, max_len: int) -> list[list[int]]:
    """Most probable next token at each step; ids without the final <eos>."""
    b = src.shape[0]
    state = model.start(model.encode(src, mask), mask)
    tokens = torch.full((b,), eos, dtype=torch.long, device=src.device)
    out = torch.zeros((b, 0), dtype=torch.long, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    for _ in range(_max_steps(src.shape[1], max_len)):
        logp, state = model.step(tokens, state)
        tokens = logp.argmax(-1)
        tokens = torch.where(done, torch.full_like(tokens, eos), tokens)
        out = torch.cat([out, tokens[:, None]], dim=1)
        done |= tokens == eos
        if bool(done.all()):
            break
    return [_strip(row, eos) for row in out.tolist()]


@torch.no_grad()
def beam_search(model, src: torch.Tensor, mask: torch.Tensor, eos: int, max_len: int, beam: int,
                len_penalty: float = 1.0) -> list[list[int]]:
    """Batched beam search (module docstring); ids of the best hypothesis without its <eos>."""
    b, k, dev = src.shape[0], beam, src.device
    memory = model.encode(src, mask)
    rows = torch.arange(b, device=dev).repeat_interleave(k)  # (b*k,): sentence of each hypothesis
    state = model.reorder(model.start(memory, mask), rows)
    scores = torch.zeros(b, k, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    tokens = torch.full((b * k,), eos, dtype=torch.long, device=dev)
    seqs = torch.zeros((b * k, 0), dtype=torch.long, device=dev)
    done = torch.zeros(b * k, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b * k, device=dev)
    for _ in range(_max_steps(src.shape[1], max_len)):
        logp, state = model.step(tokens, state)
        v = logp.shape[-1]
        # a finished hypothesis can only "emit" <eos> again, at no cost
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, eos] = 0.0
        logp = torch.where(done[:, None], frozen, logp)
        cand = (scores.view(-1, 1) + logp).view(b, k * v)
        top, idx = cand.topk(k, dim=1)
        parent = (idx // v) + torch.arange(b, device=dev)[:, None] * k  # flat index of the parent hypothesis
        parent, tokens = parent.view(-1), (idx % v).view(-1)
        state = model.reorder(state, parent)
        seqs = torch.cat([seqs.index_select(0, parent), tokens[:, None]], dim=1)
        was_done = done.index_select(0, parent)
        lengths = lengths.index_select(0, parent) + (~was_done).float()
        done = was_done | (tokens == eos)
        scores = top
        if bool(done.all()):
            break
    norm = scores.view(-1) / lengths.clamp(min=1) ** len_penalty if len_penalty else scores.view(-1)
    best = norm.view(b, k).argmax(1) + torch.arange(b, device=dev) * k
    return [_strip(row, eos) for row in seqs.index_select(0, best).tolist()]


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def translate(model, src_ids: list[list[int]], *, eos: int, max_len: int, beam: int = 1, len_penalty: float = 1.0,
              batch_size: int = 64, progress: bool | None = False, desc: str = "decoding",
              src_pad: int | None = None) -> list[list[int]]:
    """Output ids for every source (greedy when beam == 1), in input order. `eos` is the target
    vocabulary's (start symbol and end), `src_pad` any source id (masked; default eos)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in src_ids]
    batches = length_batches(np.array([len(s) for s in src_ids]), max(1, batch_size // beam))
    try:
        for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
            src, mask = collate_source([src_ids[i] for i in idx], eos if src_pad is None else src_pad)
            src, mask = src.to(device), mask.to(device)
            if beam == 1:
                hyps = greedy(model, src, mask, eos, max_len)
            else:
                hyps = beam_search(model, src, mask, eos, max_len, beam, len_penalty)
            for i, h in zip(idx, hyps, strict=True):
                out[i] = h
    finally:
        model.train(was_training)
    return out


def evenly_spaced(n: int, k: int | None) -> list[int]:
    """k indices spread over range(n) (all of them when k is None or >= n): a fixed, fair sample."""
    if k is None or k >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k).round()})
