"""Round-to-nearest integer quantisation: int8, int4, int3, int2, row-wise or in groups."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import LmembedError
from ..formats.base import CompressedEmbedding
from ..formats.bits import GRIDS, from_codes, pack_bits, to_codes, top_level
from ..formats.quantized import QuantizedEmbedding
from ..registry import Arg, FitContext, Method, bool_flag, choice, group_size, register

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
        codes = module.plain_codes()
        if codes is not None:
            return module.with_codes(self.fit(codes.detach(), ctx))
        return super().apply(module, ctx)


class RTN(RowQuantizer):
    """Symmetric per-row (default) or per-group scales in fp16; `intB:gG` sets the group size."""

    bits = 8
    gguf_form = "codes"
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
Int2.superseded_by = "kq2 and tc:2 (no bench reports int2 on top at any budget)"


CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def group_scales(x: torch.Tensor, bits: int, grid: str, clip: bool = False) -> torch.Tensor:
    """fp16 scale per group (last dim): max|x| / top level, or with `clip` the clipped max from
    CLIPS that minimises the group's squared rounding error."""
    amax = x.abs().amax(-1)
    best = (amax / top_level(bits, grid)).to(torch.float16)
    if not clip:
        return best
    best_err = None
    for c in CLIPS:
        s = (amax * c / top_level(bits, grid)).to(torch.float16)
        sf = s.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
        err = (x - from_codes(to_codes(x / sf, bits, grid), bits, grid) * sf).pow(2).sum(-1)
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


FIT_ROWS = 4096  # rows quantised at a time: the temporaries stay a small fraction of the matrix


def quantize_rows(x: torch.Tensor, bits: int, group_size: int, grid: str = "int",
                  clip: bool = False) -> QuantizedEmbedding:
    """Round-to-nearest symmetric quantisation of a V x d matrix (the RTN baseline), in chunks of
    rows (each row's codes depend on that row alone)."""
    packed, scales = [], []
    for chunk in x.split(FIT_ROWS):
        s, q = rtn_codes(chunk, bits, group_size, grid, clip)
        packed.append(pack_bits(q, bits))
        scales.append(s)
    return QuantizedEmbedding(torch.cat(packed), torch.cat(scales), bits=bits, group_size=group_size,
                              embedding_dim=x.shape[1], grid=grid)


def rtn_codes(x: torch.Tensor, bits: int, group_size: int, grid: str = "int",
              clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scales V x G, unsigned codes V x d), codes rounded against the fp16-rounded scale so
    that dequantisation matches."""
    v, d = x.shape
    g = math.ceil(d / group_size)
    xp = F.pad(x.float(), (0, g * group_size - d)).reshape(v, g, group_size)
    scales = group_scales(xp, bits, grid, clip)
    s = scales.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
    q = to_codes(xp / s, bits, grid).reshape(v, g * group_size)[:, :d]
    return scales, q
