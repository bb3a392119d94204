"""Compressed modules out and plain ones in: what a model looks like to anyone without lmembed.

A model whose compression only changed the vocabulary (``trim:CORPUS``) is, weight for weight, a
standard transformers model with a smaller vocabulary: lmembed saves it as one, so that
``AutoModel*.from_pretrained(folder)`` in a process that never imports lmembed gives the same
logits. ``lmembed export --format hf`` (lmembed.export.hf) does the same for any compressed
model with the dense reconstruction of its matrices. Both swap plain ``nn.Embedding`` / ``nn.Linear`` modules in for
the compressed ones, keeping every tie (one Parameter at every tied site), and can swap back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..formats.base import CompressedEmbedding, CompressedHead
from .sites import compressed_modules, drop_hf_ties, restore_hf_ties, set_module


def trimmed_plain(module: CompressedEmbedding) -> nn.Parameter | None:
    """The Parameter of a trimmed plain matrix (nothing but a new vocabulary), else None."""
    inner, kept = module.split_vocabulary()
    return inner.plain_parameter() if kept is not None else None


def vocabulary_only(model: nn.Module) -> bool:
    """True when every compressed matrix is a trimmed plain matrix (nothing but a new vocabulary)."""
    found = compressed_modules(model)
    return bool(found) and all(trimmed_plain(m) is not None for m, _, _ in found.values())


def plain_weight(module: CompressedEmbedding) -> torch.Tensor:
    """The matrix a plain module gets: a trimmed plain matrix's own Parameter (no copy), else the
    dense reconstruction."""
    weight = trimmed_plain(module)
    return weight if weight is not None else module.dense().to(module.out_dtype)


@contextmanager
def plain_modules(model: nn.Module, weight: Callable[[CompressedEmbedding], torch.Tensor] = plain_weight
                  ) -> Iterator[nn.Module]:
    """Within the block the model holds plain embedding and output modules (tied ones share one
    Parameter); afterwards the compressed modules are back in place."""
    found = compressed_modules(model)
    swapped: list[tuple[str, nn.Module]] = []
    for module, in_paths, head_paths in found.values():
        w = weight(module)
        param = w if isinstance(w, nn.Parameter) else nn.Parameter(w.detach(), requires_grad=False)
        for p in in_paths:
            swapped.append((p, model.get_submodule(p)))
            emb = nn.Embedding(param.shape[0], param.shape[1], _weight=param)
            emb.weight = param
            set_module(model, p, emb)
        for p in head_paths:
            head = model.get_submodule(p)
            swapped.append((p, head))
            bias = head.bias if isinstance(head, CompressedHead) else None
            lin = nn.Linear(param.shape[1], param.shape[0], bias=False)
            lin.weight = param
            if bias is not None:
                lin.bias = bias
            set_module(model, p, lin)
    restore_hf_ties(model)
    try:
        yield model
    finally:
        for p, m in reversed(swapped):
            set_module(model, p, m)
        drop_hf_ties(model, [p for p, _ in swapped])

