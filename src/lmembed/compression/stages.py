"""Modules made of other compressed modules, and how a pipeline stage reaches their parts.

A trimmed vocabulary wraps one module, GroupReduce holds one factorisation per frequency block.
A later stage (``> int8``) must compress what is inside them, not the container, so the pipeline
runs every stage through ``apply_stage``, which recurses into containers and rebuilds them.
"""

from __future__ import annotations

import torch

from .modules import CompressedEmbedding
from .registry import FitContext, Method


class Container(CompressedEmbedding):
    """A compressed matrix stored as other compressed modules plus small index maps."""

    def parts(self) -> list[CompressedEmbedding]:
        raise NotImplementedError

    def with_parts(self, parts: list[CompressedEmbedding]) -> Container:
        """The same container around new parts (same shapes in the first dimension)."""
        raise NotImplementedError


def apply_stage(method: Method, module: CompressedEmbedding, ctx: FitContext) -> CompressedEmbedding:
    """method.apply(module), or applied to each part of a container."""
    if isinstance(module, Container) and not method.whole_module:
        return module.with_parts([apply_stage(method, p, ctx) for p in module.parts()])
    return method.apply(module, ctx)


def index_dtype(n: int) -> torch.dtype:
    """Smallest dtype that holds ids 0..n-1 (index maps count in stored bytes)."""
    if n <= 1 << 8:
        return torch.uint8
    if n <= 1 << 16:
        return torch.uint16
    return torch.int32
