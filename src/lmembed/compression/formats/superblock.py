"""Super-block codes: the ``kqB[:gG]`` format (llama.cpp's K-quant layout for one row).

A row is one super-block with an fp16 super-scale D and super-min M; each group of G columns keeps
a 6-bit sub-scale and a 6-bit sub-min, and its values are x ~ D*a_g*q - M*b_g with B-bit codes q.
A row costs ceil(d*B/8) + ceil(12*ceil(d/G)/8) + 4 bytes: B + 12/G + 32/d bits per value when G
divides d. The fit lives in methods/superblock.py; this module only stores, decodes and serves.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from . import kernels
from .base import LOGIT_CHUNK, PackedRows, register_module
from .bits import unpack_bits

SUB_BITS = 6  # bits of a group's sub-scale and of its sub-min


SUB_MAX = (1 << SUB_BITS) - 1


BITS_RANGE = (2, 8)


def row_bytes(dim: int, bits: int, group: int) -> int:
    """Stored bytes of one row: packed codes + packed sub-parameters + two fp16 super-parameters."""
    return math.ceil(dim * bits / 8) + math.ceil(2 * SUB_BITS * math.ceil(dim / group) / 8) + 4


def bits_per_value(dim: int, bits: int, group: int) -> float:
    """Exact stored bits per matrix value (B + 12/G + 32/d when nothing is padded)."""
    return row_bytes(dim, bits, group) * 8 / dim


@register_module
class SuperBlockEmbedding(PackedRows):
    """Asymmetric B-bit codes in groups of G columns; a group's scale and min are 6-bit multiples of
    its row's fp16 super-scale and super-min: x = (D * a_g) * q - (M * b_g)."""

    kind = "superblock"
    FORMAT_VERSION = 1  # formats/base.py: bump when its stored form changes
    gguf_form = "superblock"

    def __init__(self, codes: torch.Tensor, subs: torch.Tensor, supers: torch.Tensor, *, bits: int,
                 group_size: int, embedding_dim: int, scale: float = 1.0):
        super().__init__(codes.shape[0], embedding_dim, scale=scale)
        self.bits, self.group_size = int(bits), int(group_size)
        self.groups = math.ceil(self.embedding_dim / self.group_size)
        self.register_buffer("codes", codes)
        self.register_buffer("subs", subs)
        self.register_buffer("supers", supers)

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> SuperBlockEmbedding:
        v, d, bits, g = spec["num_embeddings"], spec["embedding_dim"], spec["bits"], spec["group_size"]
        if spec.get("sub_bits", SUB_BITS) != SUB_BITS:
            raise ValueError(f"sub_bits {spec['sub_bits']} is not {SUB_BITS}")
        if not BITS_RANGE[0] <= bits <= BITS_RANGE[1] or not 1 <= g:
            raise ValueError(f"bits {bits} or group_size {g} out of range")
        n_groups = math.ceil(d / g)
        return cls(torch.zeros(v, math.ceil(d * bits / 8), dtype=torch.uint8),
                   torch.zeros(v, math.ceil(2 * SUB_BITS * n_groups / 8), dtype=torch.uint8),
                   torch.zeros(v, 2, dtype=torch.float16),
                   bits=bits, group_size=g, embedding_dim=d, scale=spec["scale"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "bits": self.bits, "group_size": self.group_size, "sub_bits": SUB_BITS}

    def _group_params(self, subs: torch.Tensor, supers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, min) of every group of the given rows, float32 (rows x groups)."""
        sub = unpack_bits(subs, SUB_BITS, 2 * self.groups).float()
        sup = supers.float()
        return sup[:, :1] * sub[:, : self.groups], sup[:, 1:] * sub[:, self.groups :]

    def _rows(self, codes: torch.Tensor, subs: torch.Tensor, supers: torch.Tensor) -> torch.Tensor:
        """Dequantised float32 rows from their stored parts."""
        n, d, g, groups = codes.shape[0], self.embedding_dim, self.group_size, self.groups
        q = unpack_bits(codes, self.bits, d).float()
        q = F.pad(q, (0, groups * g - d)).view(n, groups, g)
        s, m = self._group_params(subs, supers)
        return (s.unsqueeze(-1) * q - m.unsqueeze(-1)).view(n, groups * g)[:, :d]

    def row_codes(self) -> kernels.Codes:
        """The rows as the C kernels read them: (D * a_g) * q - (M * b_g), sub-parameters unpacked on the fly."""
        return kernels.Codes("kq", rows=self.num_embeddings, bits=self.bits, group=self.group_size, codes=self.codes,
                             subs=self.subs, supers=self.supers)

    def layout(self) -> kernels.Layout:
        return kernels.Layout(self.num_embeddings, self.embedding_dim,
                              [kernels.Columns(0, self.embedding_dim, [self.row_codes()])])

    def lookup_torch(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows(self.codes[ids], self.subs[ids], self.supers[ids])

    def logits_torch(self, h: torch.Tensor) -> torch.Tensor:
        """Chunks of dequantised rows for a matmul (nothing decoded is kept between calls)."""
        out = torch.empty(len(h), self.num_embeddings, dtype=h.dtype, device=h.device)
        for s0 in range(0, self.num_embeddings, LOGIT_CHUNK):
            e = slice(s0, s0 + LOGIT_CHUNK)
            w = self._rows(self.codes[e], self.subs[e], self.supers[e]).to(h.dtype)
            out[:, s0 : s0 + w.shape[0]] = h @ w.t()
        return out
