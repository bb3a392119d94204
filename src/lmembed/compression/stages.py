"""Modules made of other compressed modules, and how a pipeline stage reaches their parts.

A trimmed vocabulary wraps one module, GroupReduce holds one factorisation per frequency block.
A later stage (``> int8``) must compress what is inside them, not the container, so the pipeline
runs every stage through ``apply_stage``, which recurses into containers and rebuilds them.
"""

from __future__ import annotations

from .formats.base import CompressedEmbedding, Container
from .registry import FitContext, Method


def apply_stage(method: Method, module: CompressedEmbedding, ctx: FitContext) -> CompressedEmbedding:
    """method.apply(module), or applied to each part of a container."""
    if isinstance(module, Container) and not method.whole_module:
        return module.with_parts([apply_stage(method, p, ctx) for p in module.parts()])
    return method.apply(module, ctx)
