"""llama.cpp's block types: a row of values cut into blocks of 32 (or 256) values, each holding
small integer codes and one or two fp16 numbers (K-quants: an fp16 scale per 256 values and small
integer scales per sub-block of 16 or 32). This module knows each type's layout: how codes and
parameters decode (`Coded.values`, what llama.cpp computes) and how they are packed into the
bytes a GGUF file stores (`pack`). Fitting codes is block_fit's (plain) and calibrated_blocks'
(against the model's sensitivity)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LmembedError

# ---------------------------------------------------------------------------------------------
# Block types


@dataclass(frozen=True)
class BlockType:
    """One llama.cpp tensor type: `block` values stored in `nbytes` bytes.

    `bits` > 0 for the 32-value integer types: a value is d * (q - 2**(bits-1)) (symmetric; Q8_0
    stores q - 128 as int8), or with `affine` d * q + m, q in [0, 2**bits). K-quants (`kbits` > 0)
    cut a 256-value block into sub-blocks of `sub` values, each with an integer sub-scale of
    `sub_bits` bits (signed for the symmetric ones) times the block's fp16 d; affine K-quants add
    an unsigned sub-min times an fp16 dmin: x = d*sc*q - dmin*mn, symmetric x = d*sc*(q - zero).
    A codebook type (`lut`, IQ4_NL) decodes code q to d * lut[q]: non-uniform levels, denser near
    zero, in Q4_0's bytes."""

    name: str
    ggml: int  # the type's number in the file
    block: int
    nbytes: int
    bits: int = 0
    affine: bool = False
    kbits: int = 0
    sub: int = 32
    sub_bits: int = 0
    lut: tuple[int, ...] = ()

    @property
    def bits_per_value(self) -> float:
        return 8 * self.nbytes / self.block

    def row_bytes(self, n: int) -> int:
        return n // self.block * self.nbytes

    @property
    def integer(self) -> bool:
        """Whether values are integer codes (every type but F32 / F16 / BF16)."""
        return bool(self.bits or self.kbits)

    @property
    def code_range(self) -> tuple[int, int]:
        """(lowest, highest) stored code; Q8_0 stores signed codes."""
        b = self.bits or self.kbits
        return (-128, 127) if self.name == "Q8_0" else (0, (1 << b) - 1)

    @property
    def zero(self) -> int:
        """The stored code of value 0 in a symmetric type (0 for affine types, Q8_0 and codebooks,
        whose levels come from `lut`)."""
        b = self.bits or self.kbits
        return 0 if self.affine or self.lut or self.name == "Q8_0" else 1 << (b - 1)

    def levels(self, q: torch.Tensor) -> torch.Tensor:
        """The level each stored code stands for (what the step multiplies), float32."""
        if self.lut:
            return _codebook(self.lut)[0][q.long()]
        return q.float() - self.zero

    def nearest(self, u: torch.Tensor) -> torch.Tensor:
        """Codebook types: the code whose level is nearest to u (in level units), as float. The
        levels are integers, so every midpoint is a multiple of 1/2 and floor(2u) alone says which
        side of each midpoint u lies on: one table lookup instead of a search."""
        table, low = _codebook(self.lut)[1:]
        idx = (u * 2).floor_().clamp_(low, low + len(table) - 1).sub_(low).long()
        return table[idx]

    @property
    def level_span(self) -> tuple[float, float]:
        """(lowest, highest) level."""
        if self.lut:
            return float(self.lut[0]), float(self.lut[-1])
        lo, hi = self.code_range
        return float(lo - self.zero), float(hi - self.zero)

    @property
    def sub_range(self) -> tuple[int, int]:
        """K-quants: (lowest, highest) integer sub-scale."""
        if self.affine:
            return 0, (1 << self.sub_bits) - 1
        return -(1 << (self.sub_bits - 1)), (1 << (self.sub_bits - 1)) - 1


@functools.cache
def _codebook(lut: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(levels as float32, the nearest code of every half-step k/2 from low/2 to the top level's,
    low), built once per table. A value on a midpoint goes to the upper level."""
    levels = torch.tensor(lut, dtype=torch.float32)
    low, high = 2 * lut[0], 2 * lut[-1]
    halves = torch.arange(low, high + 1, dtype=torch.float32) / 2
    return levels, torch.bucketize(halves, (levels[1:] + levels[:-1]) / 2, right=True).float(), low


# ggml's kvalues_iq4nl: 16 levels placed for the values of a block scaled by its largest magnitude
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("F32", 0, 1, 4),
    BlockType("F16", 1, 1, 2),
    BlockType("BF16", 30, 1, 2),
    BlockType("Q8_0", 8, 32, 34, bits=8),
    BlockType("Q5_1", 7, 32, 24, bits=5, affine=True),
    BlockType("Q5_0", 6, 32, 22, bits=5),
    BlockType("Q4_1", 3, 32, 20, bits=4, affine=True),
    BlockType("Q4_0", 2, 32, 18, bits=4),
    BlockType("IQ4_NL", 20, 32, 18, bits=4, lut=IQ4_NL_LEVELS),
    BlockType("Q6_K", 14, 256, 210, kbits=6, sub=16, sub_bits=8),
    BlockType("Q5_K", 13, 256, 176, kbits=5, affine=True, sub=32, sub_bits=6),
    BlockType("Q4_K", 12, 256, 144, kbits=4, affine=True, sub=32, sub_bits=6),
    BlockType("Q3_K", 11, 256, 110, kbits=3, sub=16, sub_bits=6),
    BlockType("Q2_K", 10, 256, 84, kbits=2, affine=True, sub=16, sub_bits=4),
)}
TYPE_BY_NUMBER = {t.ggml: t for t in BLOCK_TYPES.values()}


def types_for_row(n: int) -> list[str]:
    """The block types lmembed can write for rows of `n` values (a block never straddles rows)."""
    return [name for name, t in BLOCK_TYPES.items() if n > 0 and n % t.block == 0]


def check_type(name: str, n: int, what: str = "token_embd") -> BlockType:
    ok = types_for_row(n)
    if name not in BLOCK_TYPES:
        raise LmembedError(f"gguf_type {name!r}: not a block type lmembed writes; for {what} rows of {n} values use "
                           f"one of {', '.join(ok)}")
    if name not in ok:
        raise LmembedError(f"gguf_type {name}: its blocks hold {BLOCK_TYPES[name].block} values and {what} rows have "
                           f"{n}; use one of {', '.join(ok)}")
    return BLOCK_TYPES[name]


def gguf_package():
    try:
        import gguf
    except ImportError:
        raise LmembedError("GGUF files need the gguf package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# Codes and parameters of a matrix in one integer block type


@dataclass
class Coded:
    """Rows of a matrix in integer block type `t`, before packing (torch tensors, rows first):
    `q` the stored codes (rows x n); `d` the fp16 scale of each block (rows x n/block, as float32);
    `m` the fp16 min (Q4_1 / Q5_1) or dmin (affine K-quants) per block; `sc` / `mn` the integer
    sub-scales / sub-mins of the K-quants (rows x n/sub)."""

    t: BlockType
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sub-block (rows x n/sub): the step A and offset B of its values, x = A*q + B."""
        t = self.t
        if not t.kbits:
            return self.d, (self.m if t.affine else -t.zero * self.d)
        per = t.block // t.sub
        a = self.d.repeat_interleave(per, 1) * self.sc.float()
        if t.affine:
            return a, -self.m.repeat_interleave(per, 1) * self.mn.float()
        return a, -t.zero * a

    def values(self) -> torch.Tensor:
        """The decoded rows (float32), as llama.cpp computes them."""
        a, b = (p.repeat_interleave(self.t.sub, 1) for p in self.scale_offset())
        if self.t.affine:
            return a * self.q.float() + b
        return a * self.t.levels(self.q)


def fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest fp16 value, as float32 (clamped to fp16's finite range)."""
    top = float(torch.finfo(torch.float16).max)
    return x.float().clamp(-top, top).half().float()


# ---------------------------------------------------------------------------------------------
# Packing: the bytes of each block type (the layouts of ggml's block_* structs)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def pack_blocks(t: BlockType, d: np.ndarray, q: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Rows of 32-value blocks: d, m (rows x blocks, fp16), q (rows x values, in [0, 2**bits),
    for Q8_0 the signed int8 levels) -> uint8 rows x (blocks * nbytes)."""
    rows, nb = d.shape
    q = q.reshape(rows, nb, 32)
    parts = [_fp16_bytes(d)]
    if t.affine:
        parts.append(_fp16_bytes(m))
    if t.bits == 8:
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        q = q.astype(np.uint8)
        if t.bits == 5:  # bit 4 of value j is bit j of a little-endian uint32
            high = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
            parts.append(high.sum(-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(rows, nb, 4))
        low = q & 15
        parts.append(low[..., :16] | (low[..., 16:] << 4))  # values j and j + 16 share byte j
    out = np.concatenate(parts, axis=-1)
    assert out.shape[-1] == t.nbytes
    return out.reshape(rows, nb * t.nbytes)


def _pack_six_bit(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: 8 six-bit scales and mins -> 12 bytes: the low 6 bits of the first four of each
    in bytes 0-3 and 4-7, the last four split into low nibbles (bytes 8-11) and their top 2 bits
    (bits 6-7 of bytes 0-7)."""
    out = np.empty((len(sc), 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _pack_q3_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K: 16 six-bit scales (stored + 32) -> 12 bytes: low nibbles of scales i and i + 8 in byte
    i (0-7); the top 2 bits of scale 4j + k in bits 2j of byte 8 + k."""
    out = np.empty((len(s), 12), dtype=np.uint8)
    out[:, :8] = (s[:, :8] & 15) | ((s[:, 8:] & 15) << 4)
    high = (s >> 4).reshape(-1, 4, 4)  # [j, k] = scale 4j + k
    out[:, 8:] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return out


def _two_bit_planes(q: np.ndarray) -> np.ndarray:
    """256 two-bit values -> 64 bytes: value 128h + 32s + j in bits 2s of byte 32h + j (Q2_K, Q3_K)."""
    q = q.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_k(c: Coded) -> np.ndarray:
    """K-quant super-blocks (one per 256 values) in ggml's byte order."""
    t, rows = c.t, c.q.shape[0]
    q = c.q.numpy().astype(np.uint8).reshape(-1, 256)
    d = _fp16_bytes(c.d.numpy().reshape(-1, 1))[:, 0]
    subs = 256 // t.sub
    sc = c.sc.numpy().astype(np.int64).reshape(-1, subs)
    if t.name == "Q2_K":
        mn = c.mn.numpy().astype(np.uint8).reshape(-1, subs)
        parts = [sc.astype(np.uint8) | (mn << 4), _two_bit_planes(q), d, _fp16_bytes(c.m.numpy().reshape(-1, 1))[:, 0]]
    elif t.name == "Q3_K":
        high = ((q >> 2) & 1).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[:, None]  # bit k of byte j: 32k + j
        parts = [high.sum(1, dtype=np.uint8), _two_bit_planes(q & 3), _pack_q3_scales((sc + 32).astype(np.uint8)), d]
    elif t.name == "Q6_K":
        low = (q & 15).reshape(-1, 2, 2, 64)  # value 128h + 64n + j: nibble n of ql[64h + j]
        ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
        high = (q >> 4).reshape(-1, 2, 4, 32)  # value 128h + 32s + j: bits 2s of qh[32h + j]
        qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8), d]
    else:  # Q4_K, Q5_K
        mn = c.mn.numpy().astype(np.uint8).reshape(-1, subs)
        parts = [d, _fp16_bytes(c.m.numpy().reshape(-1, 1))[:, 0], _pack_six_bit(sc.astype(np.uint8), mn)]
        if t.kbits == 5:  # bit 4 of value 32k + j is bit k of byte j
            high = ((q >> 4) & 1).reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[:, None]
            parts.append(high.sum(1, dtype=np.uint8))
        low = (q & 15).reshape(-1, 4, 2, 32)
        parts.append((low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128))  # 64 values per 32 bytes
    out = np.concatenate(parts, axis=1)
    assert out.shape[1] == t.nbytes, (t.name, out.shape)
    return out.reshape(rows, -1)


def pack(c: Coded) -> np.ndarray:
    """The stored bytes of coded rows: uint8 rows x row_bytes."""
    t = c.t
    lo, hi = t.code_range
    if int(c.q.min()) < lo or int(c.q.max()) > hi:
        raise ValueError(f"{t.name}: codes outside {lo}..{hi}")
    if t.kbits:
        return _pack_k(c)
    m = c.m.numpy().astype(np.float16) if t.affine else None
    return pack_blocks(t, c.d.numpy().astype(np.float16), c.q.numpy(), m)


def decode_matrix(data: np.ndarray, type_name: str, n: int) -> np.ndarray:
    """uint8 rows x bytes of block type `type_name` -> float32 rows x n (the gguf package's decoder)."""
    gguf = gguf_package()
    data = np.ascontiguousarray(data).view(np.uint8).reshape(data.shape[0], BLOCK_TYPES[type_name].row_bytes(n))
    return np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType(BLOCK_TYPES[type_name].ggml)),
                      dtype=np.float32).reshape(data.shape[0], n)
