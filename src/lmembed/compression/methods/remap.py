"""A Hugging Face fast tokenizer restricted to a subset of its token ids, renumbered 0..V'-1.

``transformers``' ``resize_token_embeddings`` only cuts the tail of a vocabulary; trimming to
the tokens a corpus uses needs a real id remap of the tokenizer itself. We rewrite the
``tokenizers`` JSON: the model's vocabulary (BPE, WordPiece, WordLevel, Unigram), the BPE merges,
the added tokens, and every id the post-processor and padding hold.

BPE needs care: a merge whose result is dropped must go, and a kept token is only reachable if
the tokens its merges start from are kept too. ``bpe_closure`` adds those ancestors. Then the
trimmed tokenizer segments every word whose original tokens were all kept *exactly* as before
(the merges it applies are a subset that contains every merge the original applied, and BPE
always applies the lowest-ranked applicable merge), and any other word falls back to shorter
kept pieces, down to the base alphabet (the 256 byte symbols of a byte-level BPE), so text never
fails to encode. WordPiece (greedy longest match) and Unigram (best path) have the same
property on words made of kept tokens; elsewhere WordPiece yields the unknown token unless the
single characters are kept (``alphabet_ids``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ...errors import LmembedError

MODEL_TYPES = ("BPE", "WordPiece", "WordLevel", "Unigram")


def backend_json(tokenizer: Any) -> dict[str, Any]:
    """The `tokenizers` JSON of a fast tokenizer; a clear error for anything else."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LmembedError(f"{type(tokenizer).__name__}: trimming needs a Hugging Face fast tokenizer "
                           "(with a backend_tokenizer); this one cannot be remapped")
    j = json.loads(backend.to_str())
    kind = j.get("model", {}).get("type")
    if kind not in MODEL_TYPES:
        raise LmembedError(f"{type(tokenizer).__name__}: tokenizer model {kind!r} cannot be trimmed "
                           f"(supported: {', '.join(MODEL_TYPES)})")
    return j


def counting_backend(tokenizer: Any):
    """A copy of the backend without padding/truncation (MiniLM pads every line to 128)."""
    from tokenizers import Tokenizer

    j = backend_json(tokenizer)
    j["padding"], j["truncation"] = None, None
    return Tokenizer.from_str(json.dumps(j))


def id_to_token(j: dict[str, Any]) -> dict[int, str]:
    model = j["model"]
    if model["type"] == "Unigram":
        out = {i: piece for i, (piece, _) in enumerate(model["vocab"])}
    else:
        out = {i: t for t, i in model["vocab"].items()}
    for a in j.get("added_tokens") or []:
        out[a["id"]] = a["content"]
    return out


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]


def _merged(a: str, b: str, model: dict[str, Any]) -> str:
    prefix = model.get("continuing_subword_prefix") or ""
    return a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)


def base_ids(j: dict[str, Any]) -> set[int]:
    """Ids a BPE cannot rebuild from merges (its alphabet): kept so any text still encodes."""
    model = j["model"]
    if model["type"] != "BPE":
        return set()
    produced = {_merged(a, b, model) for a, b in _merge_pairs(model)}
    return {i for t, i in model["vocab"].items() if t not in produced}


def alphabet_ids(j: dict[str, Any], chars: Iterable[str] | None) -> set[int]:
    """WordPiece single-character tokens (and their ##-continuations) for `chars` (None: all):
    kept, a word made of those characters decomposes instead of becoming the unknown token."""
    model = j["model"]
    if model["type"] != "WordPiece":
        return set()
    prefix = model.get("continuing_subword_prefix") or "##"
    wanted = None if chars is None else set(chars)
    out = set()
    for t, i in model["vocab"].items():
        c = t[len(prefix):] if t.startswith(prefix) and len(t) > len(prefix) else t
        if len(c) == 1 and (wanted is None or c in wanted):
            out.add(i)
    return out


def bpe_closure(j: dict[str, Any], keep: set[int]) -> set[int]:
    """`keep` plus every token a kept BPE token is merged from, recursively."""
    model = j["model"]
    if model["type"] != "BPE":
        return set(keep)
    vocab = model["vocab"]
    parts: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merge_pairs(model):
        parts.setdefault(_merged(a, b, model), []).append((a, b))
    names = id_to_token(j)
    out = set(keep)
    stack = [names[i] for i in keep if i in names]
    while stack:
        for pair in parts.get(stack.pop(), ()):
            for p in pair:
                i = vocab.get(p)
                if i is not None and i not in out:
                    out.add(i)
                    stack.append(p)
    return out


def _remap_ids(obj: Any, new_id: dict[int, int], where: str) -> Any:
    """Post-processor / padding: rewrite the ids they hold (TemplateProcessing, Bert/Roberta)."""
    if isinstance(obj, list):
        return [_remap_ids(v, new_id, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = dict(obj)
    kind = obj.get("type")
    if kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            tok, i = obj[key]
            out[key] = [tok, _new(new_id, i, f"{where}.{key}")]
        return out
    if kind == "TemplateProcessing":
        out["special_tokens"] = {k: {**v, "ids": [_new(new_id, i, f"{where} {k}") for i in v.get("ids", [])]}
                                 for k, v in (obj.get("special_tokens") or {}).items()}
        return out
    if kind == "Sequence" and "processors" in obj:
        out["processors"] = [_remap_ids(p, new_id, where) for p in obj["processors"]]
        return out
    if "pad_id" in obj:  # the padding section
        out["pad_id"] = _new(new_id, obj["pad_id"], f"{where} pad_id")
    return out


def _new(new_id: dict[int, int], i: int, where: str) -> int:
    if i not in new_id:
        raise LmembedError(f"tokenizer {where} uses token id {i}, which trimming dropped")
    return new_id[i]


def remap_json(j: dict[str, Any], kept: list[int]) -> dict[str, Any]:
    """The tokenizer JSON restricted to `kept` (sorted old ids; new id = position)."""
    new_id = {old: new for new, old in enumerate(kept)}
    j = json.loads(json.dumps(j))  # deep copy
    model = j["model"]
    if model["type"] == "Unigram":
        vocab = model["vocab"]
        model["vocab"] = [vocab[i] for i in kept if i < len(vocab)]
        if model.get("unk_id") is not None:
            model["unk_id"] = _new(new_id, model["unk_id"], "model unk_id")
    else:
        tokens = {i: t for t, i in model["vocab"].items()}
        model["vocab"] = {tokens[i]: new_id[i] for i in kept if i in tokens}
        if model["type"] == "BPE":
            vocab = model["vocab"]
            fmt_str = any(isinstance(m, str) for m in model.get("merges") or [])
            merges = [(a, b) for a, b in _merge_pairs(model)
                      if a in vocab and b in vocab and _merged(a, b, model) in vocab]
            model["merges"] = [f"{a} {b}" for a, b in merges] if fmt_str else [[a, b] for a, b in merges]
    j["added_tokens"] = [{**a, "id": new_id[a["id"]]} for a in j.get("added_tokens") or [] if a["id"] in new_id]
    if j.get("post_processor"):
        j["post_processor"] = _remap_ids(j["post_processor"], new_id, "post_processor")
    if j.get("padding"):
        j["padding"] = _remap_ids(j["padding"], new_id, "padding")
    return j


def remap_tokenizer(tokenizer: Any, kept: list[int]) -> Any:
    """A new `transformers` fast tokenizer over the kept ids (the special tokens, chat template
    and length settings carried over); save_pretrained + AutoTokenizer round-trips it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(json.dumps(remap_json(backend_json(tokenizer), kept)))
    special = {k: v for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()
               if isinstance(v, str)}
    kwargs: dict[str, Any] = {"model_max_length": tokenizer.model_max_length,
                              "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side,
                              "model_input_names": list(tokenizer.model_input_names)}
    template = getattr(tokenizer, "chat_template", None)
    if template:
        kwargs["chat_template"] = template
    extra = [t for t in getattr(tokenizer, "additional_special_tokens", None) or [] if isinstance(t, str)]
    if extra:
        kwargs["additional_special_tokens"] = extra
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special, **kwargs)
