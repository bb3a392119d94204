"""Vocabulary trimming (Ushio et al. 2023): keep the tokens a target corpus uses, drop the rest.

``trim:CORPUS[:MIN_COUNT|topN]`` keeps the tokens the corpus uses at least MIN_COUNT times (or its
N most frequent), every special, added or config-named token, what the tokenizer needs to encode any
text (a byte-level BPE's base alphabet; WordPiece's single characters seen in the corpus) and, for
BPE, the tokens kept tokens are merged from (remap.bpe_closure). It is a *vocabulary* stage: it
changes V for the whole model (input, output head and bias, config.vocab_size, the tokenizer), so it
must come first in a pipeline; the kept ids are stored with the module (formats/trimmed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import LmembedError
from ..formats.base import CompressedEmbedding, index_dtype
from ..formats.trimmed import TrimmedEmbedding
from ..integration.sites import find_sites
from ..registry import Arg, FitContext, Method, choice, non_negative_int, register
from .counts import SPLIT, corpus_files, token_counts
from .remap import alphabet_ids, backend_json, base_ids, bpe_closure, id_to_token, remap_tokenizer


def keep_arg(s: str) -> tuple[str, int]:
    """MIN_COUNT (an integer >= 1) or topN."""
    kind, num = ("top", s[3:]) if s.startswith("top") else ("min", s)
    v = int(num)
    if v <= 0:
        raise ValueError("expected a count >= 1 or topN with N >= 1")
    return kind, v


keep_arg.show = lambda v: f"top{v[1]}" if v[0] == "top" else str(v[1])  # type: ignore[attr-defined]


alphabet_arg = choice("corpus", "all", "none")


@dataclass
class VocabTrim:
    """What trimming did: the kept ids, the remapped tokenizer, counts over the new ids, a report."""

    kept: torch.Tensor  # (V',) int64, sorted original ids
    tokenizer: Any
    freqs: torch.Tensor  # (V',) corpus counts of the kept tokens
    original_vocab: int
    report: dict[str, Any] = field(default_factory=dict)

    def remapped(self, tokenizer: Any, freqs: torch.Tensor | None) -> tuple[Any, torch.Tensor]:
        """(tokenizer, token counts) for the stages after trimming: both in the new ids."""
        return self.tokenizer, self.freqs if freqs is None else torch.as_tensor(freqs)[self.kept]

    def wrap(self, module: CompressedEmbedding | None) -> TrimmedEmbedding | None:
        return None if module is None else TrimmedEmbedding(module, self.kept, self.original_vocab)


@register
class Trim(Method):
    name, vocabulary = "trim", True
    summary = ("vocabulary trimming (Ushio et al. 2023): keep special tokens + tokens CORPUS (file, folder or bundled "
               "name: its train split) uses >= MIN_COUNT times, or its topN; remaps model and tokenizer; first only")
    positional = (Arg("corpus", str, required=True, help="file, folder or bundled corpus name"),
                  Arg("keep", keep_arg, ("min", 1), "MIN_COUNT (default 1) or topN"))
    options = (SPLIT,
               Arg("alphabet", alphabet_arg, "corpus", "WordPiece single characters kept: those of the corpus "
                                                       "(default), all, or none"),
               Arg("base", non_negative_int, 0, "also keep the N lowest token ids: for BPE the earliest merges, "
                                               "the most frequent tokens of the tokenizer's own training text; "
                                               "a cushion for words the target corpus never used"))

    def makes(self, given: str) -> str:
        return "plain"

    def check(self, num_embeddings: int, dim: int) -> None:
        try:
            corpus_files(self.corpus, self.split)
        except LmembedError as e:
            raise LmembedError(f"method {self.text!r}: {e}") from None

    def apply(self, module: CompressedEmbedding, ctx: FitContext) -> CompressedEmbedding:
        raise LmembedError(f"method {self.text!r} changes the vocabulary: it must be the first pipeline stage")

    def select(self, tokenizer: Any, vocab_size: int, extra_ids: set[int]) -> tuple[list[int], dict[str, Any]]:
        """Sorted kept ids, and a report of where they come from."""
        j = backend_json(tokenizer)
        cc = token_counts(tokenizer, self.corpus, vocab_size, self.split)
        counts = cc.counts
        kind, n = self.keep
        if kind == "min":
            corpus_ids = set((counts >= n).nonzero().flatten().tolist())
        else:
            order = torch.argsort(-counts, stable=True)[:n]
            corpus_ids = set(order[counts[order] > 0].tolist())
        if not corpus_ids:
            most = int(counts.max()) if counts.numel() else 0
            raise LmembedError(f"method {self.text!r}: keeps no corpus token (corpus {self.corpus!r}: {cc.total} "
                               f"tokens, the most frequent occurs {most} times); lower MIN_COUNT or use a bigger "
                               "corpus")
        names = id_to_token(j)
        special = set(getattr(tokenizer, "all_special_ids", []) or []) | {a["id"] for a in j.get("added_tokens") or []}
        special |= {i for i in extra_ids if i in names}  # config ids of rows the tokenizer has no token for: dropped
        chars = {"corpus": cc.chars, "all": None, "none": ()}[self.alphabet]
        alphabet = base_ids(j) | alphabet_ids(j, chars)
        base = set(range(min(self.base, vocab_size))) & set(names)
        seed = corpus_ids | special | alphabet | base
        kept_set = bpe_closure(j, seed)
        beyond = sorted(i for i in kept_set if i >= vocab_size)
        if beyond:
            raise LmembedError(f"method {self.text!r}: the tokenizer's ids {beyond[:5]} are beyond the model's "
                               f"{vocab_size} embedding rows; tokenizer and model do not match")
        kept = sorted(kept_set)
        dropped = counts.clone()
        dropped[kept] = 0
        stats = {
            "corpus": self.corpus, "split": self.split or "train", "keep": f"{kind} {n}", "corpus_lines": cc.lines,
            "corpus_files": cc.files, "corpus_tokens": cc.total, "corpus_distinct": int((counts > 0).sum()),
            "original_vocab": vocab_size, "kept": len(kept), "kept_from_corpus": len(corpus_ids),
            "kept_special": len(special - corpus_ids), "kept_alphabet": len(alphabet - corpus_ids - special),
            "kept_base": len(base - corpus_ids - special - alphabet),
            "kept_merge_parents": len(kept_set - seed), "corpus_tokens_dropped": int(dropped.sum()),
        }
        return kept, stats

    def prepare(self, model: nn.Module, tokenizer: Any, log=lambda s: None) -> VocabTrim:
        """Select, remap the tokenizer, then trim the model in place (nothing changes on error)."""
        if tokenizer is None:
            raise LmembedError(f"method {self.text!r} needs the model's tokenizer: "
                               "lmembed.compress(model, method, tokenizer=tok)")
        sites = find_sites(model)
        v = sites.input_weight.shape[0]
        check_trimmable(model, sites)
        kept, stats = self.select(tokenizer, v, config_token_ids(model, v))
        new_tok = remap_tokenizer(tokenizer, kept)
        if len(new_tok) != len(kept):
            raise LmembedError(f"method {self.text!r}: the remapped tokenizer has {len(new_tok)} tokens, expected "
                               f"{len(kept)}")
        before = token_counts(tokenizer, self.corpus, v, self.split).counts  # cached by select()
        after = token_counts(new_tok, self.corpus, len(kept), self.split)
        unk_before, unk_after = unk_id(tokenizer), unk_id(new_tok)
        stats.update({
            "corpus_tokens_after": after.total, "unk_token": new_tok.unk_token if unk_after is not None else None,
            "corpus_unk_before": int(before[unk_before]) if unk_before is not None else 0,
            "corpus_unk_after": int(after.counts[unk_after]) if unk_after is not None else 0,
            "index_bytes": len(kept) * index_dtype(v).itemsize,
        })
        kept_t = torch.tensor(kept, dtype=torch.long)
        freqs = before[kept_t].clone()
        trim_model(model, kept_t)
        log(f"{self.text}: kept {len(kept)} of {v} tokens; {stats['corpus_tokens_dropped']} corpus tokens dropped, "
            f"{stats['corpus_unk_after']} now unknown")
        return VocabTrim(kept_t, new_tok, freqs, v, stats)


def unk_id(tokenizer: Any) -> int | None:
    """The unknown token's id if the tokenizer's model has one (a byte-level BPE has none: its
    config's unk_token is then just a name, never produced)."""
    model = backend_json(tokenizer)["model"]
    if model["type"] == "Unigram":
        return model.get("unk_id")
    unk = model.get("unk_token")
    return model["vocab"].get(unk) if unk else None


def config_token_ids(model: nn.Module, vocab_size: int) -> set[int]:
    """Token ids the model's (generation) config names: pad, bos, eos, decoder start, ..."""
    out: set[int] = set()
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        for k, val in vars(cfg).items():
            if not k.endswith(("_token_id", "_token_ids")) or val is None:
                continue
            for i in val if isinstance(val, (list, tuple)) else [val]:
                if isinstance(i, int) and 0 <= i < vocab_size:
                    out.add(i)
    return out


KNOWN_VOCAB_BUFFERS = ("final_logits_bias",)


def check_trimmable(model: nn.Module, sites) -> None:
    """Refuse models holding vocabulary-sized tensors we do not know how to remap."""
    v = sites.input_weight.shape[0]
    known = {id(sites.input_weight)}
    if sites.output_module is not None:
        known.add(id(sites.output_weight))
        bias = getattr(sites.output_module, "bias", None)
        if bias is not None:
            known.add(id(bias))
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if id(t) in known or name.rsplit(".", 1)[-1] in KNOWN_VOCAB_BUFFERS:
            continue
        if v in t.shape:
            raise LmembedError(f"cannot trim {type(model).__name__}: {name} {tuple(t.shape)} has a vocabulary-sized "
                               "dimension that lmembed does not know how to remap")


def trim_model(model: nn.Module, kept: torch.Tensor) -> None:
    """Keep rows `kept` (sorted original ids) of the input embedding, the output head and its
    bias (every alias of each Parameter is replaced: a tie stays a tie), and remap the config."""
    sites = find_sites(model)
    v = sites.input_weight.shape[0]
    new_v = len(kept)
    new_id = {int(o): n for n, o in enumerate(kept.tolist())}
    replace: dict[int, nn.Parameter] = {}

    def trimmed(p: torch.Tensor) -> nn.Parameter:
        if id(p) not in replace:
            replace[id(p)] = nn.Parameter(p.detach()[kept.to(p.device)].clone(), requires_grad=p.requires_grad)
        return replace[id(p)]

    new_in = trimmed(sites.input_weight)
    new_out = trimmed(sites.output_weight) if sites.output_module is not None else None
    bias = getattr(sites.output_module, "bias", None) if sites.output_module is not None else None
    if isinstance(bias, torch.Tensor) and bias.shape == (v,):
        trimmed(bias)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in replace:
                mod._parameters[name] = replace[id(p)]
        for name, b in list(mod._buffers.items()):
            if name in KNOWN_VOCAB_BUFFERS and b is not None and b.shape[-1] == v:
                mod._buffers[name] = b[..., kept.to(b.device)].clone()
        if isinstance(mod, nn.Embedding) and mod.weight is new_in:
            mod.num_embeddings = new_v
            if mod.padding_idx is not None:
                mod.padding_idx = new_id.get(int(mod.padding_idx))
        if isinstance(mod, nn.Linear) and new_out is not None and mod.weight is new_out:
            mod.out_features = new_v
        if getattr(mod, "vocab_size", None) == v and not isinstance(getattr(type(mod), "vocab_size", None), property):
            mod.vocab_size = new_v
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        if getattr(cfg, "vocab_size", None) == v:
            cfg.vocab_size = new_v
        for k, val in list(vars(cfg).items()):  # ids of dropped rows (no token in the tokenizer) become None
            if k.endswith(("_token_id", "_token_ids")) and val is not None:
                setattr(cfg, k, [new_id[i] for i in val if i in new_id] if isinstance(val, (list, tuple))
                        else new_id.get(val) if isinstance(val, int) else val)


__all__ = ["Trim", "TrimmedEmbedding", "VocabTrim", "trim_model", "unk_id"]
