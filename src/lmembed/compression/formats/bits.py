"""Bit packing and code grids shared by every integer format.

Codes of B bits are packed densely along a row (``pack_bits``), so a row of d codes takes
ceil(d*B/8) bytes whatever B is: 3- and 5-bit codes cost what they say. The two grids name where
the B-bit levels sit: ``int`` is the symmetric integers -2^(B-1) .. 2^(B-1)-1, ``half`` the
mid-rise half-integers (no zero level, one more usable level at the same bits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_ROWS = 4096


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (rows x n, values < 2**bits) into (rows x ceil(n*bits/8)) uint8,
    little-endian bit order: exactly `bits` bits per value, each row padded to a whole byte."""
    if bits == 8:
        return q.to(torch.uint8)
    rows, n = q.shape
    if bits == 4:  # two nibbles per byte, low nibble first: no per-bit expansion
        q = F.pad(q.to(torch.uint8), (0, n % 2))
        return q[:, 0::2] | (q[:, 1::2] << 4)
    if rows > PACK_ROWS:  # the per-bit expansion is 32x the codes: bound it
        return torch.cat([pack_bits(c, bits) for c in q.split(PACK_ROWS)])
    shifts = torch.arange(bits, device=q.device, dtype=torch.int32)
    b = ((q.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    pad = (-b.shape[1]) % 8
    if pad:
        b = F.pad(b, (0, pad))
    weights = (1 << torch.arange(8, device=q.device, dtype=torch.int32))
    return (b.reshape(rows, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: (rows x bytes) uint8 -> (rows x n) int32 codes."""
    if bits == 8:
        return packed.to(torch.int32)
    if bits == 4:  # the common case, two nibbles per byte: a fast path
        p = packed.to(torch.int32)
        return torch.stack((p & 15, p >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :n]
    rows = packed.shape[0]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    b = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, : n * bits]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    return (b.reshape(rows, n, bits) * weights).sum(-1)


GRIDS = ("int", "half")


def top_level(bits: int, grid: str) -> float:
    """Largest |level| of a symmetric grid: `int` uses 2**bits - 1 integer levels (zero included,
    one code unused), `half` all 2**bits levels at half-integers (±0.5, ±1.5, ...; no zero)."""
    return (1 << (bits - 1)) - (0.5 if grid == "half" else 1)


def to_codes(x: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    """Nearest level of x (already divided by the scale) as an unsigned code in [0, 2**bits)."""
    off = 1 << (bits - 1)
    if grid == "half":
        return (torch.floor(x) + off).clamp(0, 2 * off - 1).to(torch.int32)
    return (torch.round(x).clamp(-(off - 1), off - 1) + off).to(torch.int32)


def from_codes(q: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    off = 1 << (bits - 1)
    return q - off + 0.5 if grid == "half" else q - off
