"""Find a model's token-embedding matrices, swap compressed modules in place, keep ties.

Works through the conventions every `transformers` model (and lmembed's own LMs) follows:
``get_input_embeddings()`` / ``get_output_embeddings()``. A matrix can sit at several module
paths (T5's ``shared``, ``encoder.embed_tokens`` and ``decoder.embed_tokens`` hold one
Parameter; a tied ``lm_head`` holds it too), so sites are found by Parameter identity and every
path gets the same compressed module — a tied model stays tied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import LmembedError
from ..formats.base import CompressedEmbedding, CompressedHead

SIDES = ("auto", "input", "output", "both")


@dataclass
class Sites:
    input_module: nn.Module
    input_paths: list[str]
    output_module: nn.Module | None = None
    output_paths: list[str] = field(default_factory=list)
    tied: bool = False

    @property
    def input_weight(self) -> torch.Tensor:
        return self.input_module.weight

    @property
    def output_weight(self) -> torch.Tensor | None:
        return None if self.output_module is None else self.output_module.weight


def _named(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.named_modules(remove_duplicate=False))


def find_sites(model: nn.Module) -> Sites:
    """Input embedding paths (everything sharing its Parameter), output head paths, tie state."""
    get_in = getattr(model, "get_input_embeddings", None)
    inp = get_in() if callable(get_in) else None
    if inp is None:
        raise LmembedError(f"{type(model).__name__} has no input embeddings (get_input_embeddings() returned "
                           "nothing): not a token-embedding model")
    if isinstance(inp, CompressedEmbedding):
        raise LmembedError(f"{type(model).__name__}'s embeddings are already compressed ({inp.method or inp.kind}); "
                           "compress the original model, or give one pipeline ('a > b')")
    weight = getattr(inp, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise LmembedError(f"{type(model).__name__}: input embeddings {type(inp).__name__} have no 2-D weight")
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if isinstance(out, CompressedHead):
        raise LmembedError(f"{type(model).__name__}'s output layer is already compressed")
    out_weight = getattr(out, "weight", None) if out is not None else None
    if out is not None and (not isinstance(out_weight, torch.Tensor) or out_weight.shape[0] != weight.shape[0]):
        out = None  # e.g. a classification head: not a vocabulary projection
    tied = out is not None and out_weight is weight
    named = _named(model)
    in_paths = [n for n, m in named if m is inp or (isinstance(m, nn.Embedding) and m.weight is weight)]
    out_paths = [n for n, m in named if out is not None and (m is out or (tied and isinstance(m, nn.Linear)
                                                                           and m.weight is weight))]
    return Sites(inp, in_paths, out, out_paths, tied)


def resolve_side(sites: Sites, side: str) -> str:
    """auto: both sides where there is an output layer (one module if tied), else the input."""
    if side not in SIDES:
        raise LmembedError(f"--side {side}: expected one of {', '.join(SIDES)}")
    if side == "auto":
        return "both" if sites.output_module is not None else "input"
    if side in ("output", "both") and sites.output_module is None:
        raise LmembedError(f"--side {side}: this model has no output embedding layer (use --side input)")
    return side


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def embed_scale(module: nn.Module) -> float:
    """Scale a model applies to looked-up rows inside its embedding module (Gemma), else 1."""
    s = getattr(module, "scalar_embed_scale", None)
    if s is None:
        s = getattr(module, "embed_scale", None)
        s = float(s) if isinstance(s, (int, float)) or (isinstance(s, torch.Tensor) and s.numel() == 1) else None
    return float(s) if s is not None else 1.0


def install(model: nn.Module, sites: Sites, side: str, input_module: CompressedEmbedding | None,
            output_module: CompressedEmbedding | None) -> None:
    """Put compressed modules at the sites; a tied model compressed on both sides gets one module."""
    replaced: list[str] = []
    if side in ("input", "both") and input_module is not None:
        input_module.scale = embed_scale(sites.input_module)
        input_module.out_dtype = sites.input_weight.dtype
        for p in sites.input_paths:
            set_module(model, p, input_module)
        replaced += sites.input_paths
    if side in ("output", "both") and output_module is not None:
        head = CompressedHead(output_module, getattr(sites.output_module, "bias", None))
        for p in sites.output_paths:
            set_module(model, p, head)
        replaced += sites.output_paths
    drop_hf_ties(model, replaced)


def drop_hf_ties(model: nn.Module, replaced: list[str]) -> None:
    """Remove `transformers`' tie entries that point at replaced modules: lmembed now holds the tie
    (one module object on both sides) and a later ``model.tie_weights()`` must not look for the
    ``.weight`` Parameters that no longer exist. The removed entries are kept on the module
    (restore_hf_ties puts them back when plain modules return). The config is left untouched
    (T5 reads meaning into ``tie_word_embeddings``)."""
    if not replaced:
        return
    prefixes = tuple(p + "." for p in replaced)
    for prefix, sub in _named(model):
        local = f"{prefix}." if prefix else ""
        for attr in ("_tied_weights_keys", "all_tied_weights_keys"):
            keys = getattr(sub, attr, None)
            if not isinstance(keys, dict) or not keys:
                continue
            gone = {t: s for t, s in keys.items()
                    if f"{local}{t}".startswith(prefixes) or f"{local}{s}".startswith(prefixes)}
            if gone:
                setattr(sub, attr, {t: s for t, s in keys.items() if t not in gone})
                sub.__dict__.setdefault("_lmembed_dropped_ties", {}).setdefault(attr, {}).update(gone)


def restore_hf_ties(model: nn.Module) -> None:
    """Put back the tie entries drop_hf_ties removed (the tied sites hold plain modules again)."""
    for _, sub in _named(model):
        for attr, gone in sub.__dict__.pop("_lmembed_dropped_ties", {}).items():
            setattr(sub, attr, {**(getattr(sub, attr, None) or {}), **gone})


def compressed_modules(model: nn.Module) -> dict[int, tuple[CompressedEmbedding, list[str], list[str]]]:
    """id -> (module, input paths, head paths) for every compressed matrix installed in the model."""
    found: dict[int, tuple[CompressedEmbedding, list[str], list[str]]] = {}
    named = _named(model)
    outer = [n for n, m in named if isinstance(m, (CompressedEmbedding, CompressedHead))]
    for name, m in named:
        if not isinstance(m, (CompressedEmbedding, CompressedHead)) or any(name.startswith(o + ".") for o in outer):
            continue  # not compressed, or a part of one (a factorisation's codes, a head's matrix)
        if isinstance(m, CompressedHead):
            found.setdefault(id(m.embedding), (m.embedding, [], []))[2].append(name)
        else:
            found.setdefault(id(m), (m, [], []))[1].append(name)
    return found
