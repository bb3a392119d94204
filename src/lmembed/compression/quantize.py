"""Round-to-nearest integer quantisation: int8, int4, int3, int2, row-wise or in groups."""

from __future__ import annotations

import torch

from ..errors import LmembedError
from .modules import GRIDS, CompressedEmbedding, DenseEmbedding, FactorizedEmbedding, quantize_rows
from .registry import Arg, FitContext, Method, bool_flag, choice, group_size, register

grid_name = choice(*GRIDS)
# Arguments every integer-code method shares (RTN, GPTQ, mixed precision).
GROUP = Arg("group", group_size, default=None, help="gG: G columns per scale (default: whole row)")
GRID = Arg("grid", grid_name, "int", "int (zero is a level) or half (all 2**bits levels, ±0.5, ±1.5...)")
CLIP = Arg("clip", bool_flag, False, "search a clipped scale per group that lowers the rounding error")


def check_group(method: Method, group: int | None, dim: int) -> None:
    if group is not None and group > dim:
        raise LmembedError(f"method {method.text!r}: group size {group} exceeds the embedding dimension {dim}")


def width_variant(base: type[Method], cls_name: str, name: str, bits: int, summary: str) -> type[Method]:
    """A registered subclass of `base` that fixes the bit width (Int4, GPTQInt4, ...): one
    definition per method family, one importable class per width."""
    return register(type(cls_name, (base,), {"name": name, "bits": bits, "summary": summary,
                                             "__module__": base.__module__, "__qualname__": cls_name}))


class RowQuantizer(Method):
    """A method that quantises the rows of a matrix: after a factorisation it quantises the codes
    (the V x k part that holds the bytes) and keeps the decoder."""

    follows = ("plain", "factors")

    def makes(self, given: str) -> str:
        return "tunable"

    def apply(self, module: CompressedEmbedding, ctx: FitContext) -> CompressedEmbedding:
        if isinstance(module, FactorizedEmbedding) and isinstance(module.codes, DenseEmbedding):
            codes = self.fit(module.codes.weight.detach(), ctx)
            return FactorizedEmbedding(codes, module.decoder.detach(),
                                       module.bias.detach() if module.bias is not None else None)
        return super().apply(module, ctx)


class RTN(RowQuantizer):
    """Symmetric per-row (default) or per-group scales in fp16; `intB:gG` sets the group size."""

    bits = 8
    positional = (GROUP,)
    options = (GRID, CLIP)

    def check(self, num_embeddings: int, dim: int) -> None:
        check_group(self, self.group, dim)

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        self.check(*weight.shape)
        return quantize_rows(weight.detach().float().cpu(), self.bits, self.group or weight.shape[1], self.grid,
                             self.clip)


Int8, Int4, Int3, Int2 = (
    width_variant(RTN, f"Int{b}", f"int{b}", b, f"round-to-nearest {b}-bit codes, fp16 scale per row or per group "
                  "of G columns") for b in (8, 4, 3, 2))
