"""Quality of a pretrained (`transformers`) model on raw text, with its own tokenizer.

One function per kind of model:
- causal LMs: perplexity with a sliding window (each window scores only the tokens the previous
  one did not, so every token after the first window sees at least window - stride of context);
- masked LMs: pseudo-perplexity (Salazar et al. 2020): mask each token in turn, score it;
- encoders: mean-pooled sentence embeddings, compared against the original model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LmembedError
from ..models.pretrained import context_length
from .perplexity import window_nll

EVAL_TOKENS = 8192  # tokens of an evaluation text scored by default (lmembed compress, bench compress)
EVAL_WINDOW = 512  # sliding-window length of causal perplexity; the stride is half of it


def model_kind(model) -> str:
    """causal | masked | seq2seq | encoder, from the class the model was loaded as."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    if name.endswith("ForMaskedLM"):
        return "masked"
    if name.endswith("ForConditionalGeneration"):
        return "seq2seq"
    return "encoder"


def text_ids(tokenizer, text: str, max_tokens: int | None = None, *, what: str = "text") -> torch.Tensor:
    """Token ids of a text (no special tokens), cut to max_tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise LmembedError(f"{what}: only {len(ids)} token(s) after tokenisation; need at least 2")
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def causal_ppl(model, ids: torch.Tensor, *, window: int = 512, stride: int | None = None, batch: int = 4,
               progress: bool = False) -> dict[str, float]:
    """Perplexity of a token stream, cut into `batch` equal rows scored with sliding windows."""
    model.eval()
    device = next(model.parameters()).device
    window = min(window, context_length(model))
    b = max(1, min(batch, len(ids) // (window + 1) or 1))
    n = len(ids) // b
    rows = ids[: b * n].view(b, n).to(device)
    window = min(window, n - 1)  # a short text: one window over all of it
    if stride is not None:
        stride = min(stride, window)
    nll, count = window_nll(lambda x: model(input_ids=x).logits, rows, window=window, stride=stride,
                           progress=progress)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count}


@torch.no_grad()
def masked_pseudo_ppl(model, tokenizer, lines: list[str], *, max_tokens: int = 2000, max_length: int = 64,
                      batch: int = 64, progress: bool = False) -> dict[str, float]:
    """exp(mean NLL of each token when it alone is masked), over the first `max_tokens` tokens."""
    if tokenizer.mask_token_id is None:
        raise LmembedError("pseudo-perplexity needs a tokenizer with a mask token")
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    bar = tqdm(total=max_tokens, desc="pseudo-ppl", disable=not progress, leave=False)
    for line in lines:
        if count >= max_tokens:
            break
        enc = tokenizer(line.strip(), truncation=True, max_length=max_length, return_tensors="pt")
        ids = enc["input_ids"][0]
        special = torch.tensor(tokenizer.get_special_tokens_mask(ids.tolist(), already_has_special_tokens=True),
                               dtype=torch.bool)
        positions = (~special).nonzero().flatten()[: max_tokens - count]
        for s in range(0, len(positions), batch):
            pos = positions[s : s + batch]
            x = ids.repeat(len(pos), 1)
            x[torch.arange(len(pos)), pos] = tokenizer.mask_token_id
            logits = model(input_ids=x.to(device)).logits[torch.arange(len(pos)), pos.to(device)]
            nll += F.cross_entropy(logits.float(), ids[pos].to(device), reduction="sum").item()
            count += len(pos)
            bar.update(len(pos))
    bar.close()
    if not count:
        raise LmembedError("pseudo-perplexity: the text has no maskable tokens")
    return {"pseudo_ppl": math.exp(nll / count), "nll": nll / count, "tokens": count}


def sentences_of(text: str, max_sentences: int) -> list[str]:
    """Sentences from raw text: split lines at '. ', '! ', '? ' and keep those of 4+ words."""
    out: list[str] = []
    for line in text.splitlines():
        buf = line.replace("? ", "?\n").replace("! ", "!\n").replace(". ", ".\n")
        for s in buf.splitlines():
            if len(s.split()) >= 4:
                out.append(s.strip())
                if len(out) >= max_sentences:
                    return out
    return out
