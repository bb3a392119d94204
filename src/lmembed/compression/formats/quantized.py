"""Per-group integer codes with an fp16 scale per group: the ``intB[:gG]`` format.

Each row is cut into groups of G columns; a group stores B-bit codes on the ``int`` or ``half``
grid (bits.py) and one fp16 scale, so a row costs ceil(d*B/8) + 2*ceil(d/G) bytes. It is what
``intB``, ``gptq-intB`` and every width of ``mixed`` store, and what GGUF's Q8_0 / Q4_0-style
blocks map onto. The head reads the packed codes in place (kernels/).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import kernels
from .base import LOGIT_CHUNK, PackedRows, register_module
from .bits import GRIDS, from_codes, unpack_bits
from .kernels import Layout


@register_module
class QuantizedEmbedding(PackedRows):
    """Symmetric integer codes with one fp16 scale per group of `group_size` columns of a row.

    x ~ scale * level(q), q in [0, 2**bits): `int` grid levels are q - 2**(bits-1), `half` grid
    levels q - 2**(bits-1) + 0.5 (all codes used; better for 3-4 bits). Codes are bit-packed:
    int8 takes a byte per value, int4 half a byte, int3 three eighths.
    """

    kind = "quantized"
    FORMAT_VERSION = 1  # formats/base.py: bump when its stored form changes
    gguf_form = "codes"
    tunable_scales = True

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int,
                 embedding_dim: int, scale: float = 1.0, grid: str = "int"):
        super().__init__(packed.shape[0], embedding_dim, scale=scale)
        self.bits, self.group_size, self.grid = int(bits), int(group_size), grid
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> QuantizedEmbedding:
        v, d, bits, g = spec["num_embeddings"], spec["embedding_dim"], spec["bits"], spec["group_size"]
        grid = spec.get("grid", "int")
        if grid not in GRIDS:
            raise ValueError(f"grid {grid!r} is not one of {GRIDS}")
        return cls(torch.zeros(v, math.ceil(d * bits / 8), dtype=torch.uint8),
                   torch.zeros(v, math.ceil(d / g), dtype=torch.float16),
                   bits=bits, group_size=g, embedding_dim=d, scale=spec["scale"], grid=grid)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "bits": self.bits, "group_size": self.group_size, "grid": self.grid}

    def levels(self, packed: torch.Tensor) -> torch.Tensor:
        """Integer (or half-integer) levels of packed rows, as float32."""
        return from_codes(unpack_bits(packed, self.bits, self.embedding_dim), self.bits, self.grid).float()

    def _rows(self, packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        s = scales.to(dtype).repeat_interleave(self.group_size, dim=1)[:, : self.embedding_dim]
        return self.levels(packed).to(dtype) * s

    def _shift(self) -> float:
        return (0.5 if self.grid == "half" else 0.0) - (1 << (self.bits - 1))

    def row_codes(self) -> kernels.Codes:
        """The rows as the C kernels read them: (code + shift) * the fp16 scale of its group."""
        return kernels.Codes("sym", rows=self.num_embeddings, bits=self.bits, group=self.group_size,
                             codes=self.packed, scales=self.scales, shift=self._shift())

    def layout(self) -> Layout:
        return Layout(self.num_embeddings, self.embedding_dim,
                      [kernels.Columns(0, self.embedding_dim, [self.row_codes()])])

    def lookup_torch(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows(self.packed[ids], self.scales[ids], torch.float32)

    def logits_torch(self, h: torch.Tensor) -> torch.Tensor:
        """Chunks of rows dequantised for a matmul: the temporary stays LOGIT_CHUNK x d."""
        out = torch.empty(len(h), self.num_embeddings, dtype=h.dtype, device=h.device)
        for s in range(0, self.num_embeddings, LOGIT_CHUNK):
            e = slice(s, s + LOGIT_CHUNK)
            w = self._rows(self.packed[e], self.scales[e], h.dtype)
            out[:, s : s + w.shape[0]] = h @ w.t()
        return out
