"""llama.cpp's block types: a row of values cut into blocks of 32 (or 256) values, each holding
small integers and one or two fp16 numbers; lmembed's encoders for them (the gguf package
quantises the 32-value types, the K-quant writers here are lmembed's own) and decoders."""

from __future__ import annotations

from collections.abc import Callable
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
    stores q - 128 as int8), or with `affine` d * q + m, q in [0, 2**bits)."""

    name: str
    ggml: int  # the type's number in the file
    block: int
    nbytes: int
    bits: int = 0
    affine: bool = False

    @property
    def bits_per_value(self) -> float:
        return 8 * self.nbytes / self.block

    def row_bytes(self, n: int) -> int:
        return n // self.block * self.nbytes


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("F32", 0, 1, 4),
    BlockType("F16", 1, 1, 2),
    BlockType("BF16", 30, 1, 2),
    BlockType("Q8_0", 8, 32, 34, bits=8),
    BlockType("Q5_1", 7, 32, 24, bits=5, affine=True),
    BlockType("Q5_0", 6, 32, 22, bits=5),
    BlockType("Q4_1", 3, 32, 20, bits=4, affine=True),
    BlockType("Q4_0", 2, 32, 18, bits=4),
    BlockType("Q6_K", 14, 256, 210),
    BlockType("Q5_K", 13, 256, 176),
    BlockType("Q4_K", 12, 256, 144),
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


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LmembedError("GGUF files need the gguf package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# Packing blocks: d (fp16), [m (fp16)], [high bits], low bits, per 32-value block


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


# ---------------------------------------------------------------------------------------------
# K-quants: super-blocks of 256 values (own writers; rows must hold a multiple of 256 values)


def _fit_affine(x: np.ndarray, top: int, iters: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """x (n x k) ~ a*q - b, q in [0, top], a >= 0, b >= 0: per row, start from the min/max range,
    then alternate rounding and a least-squares refit of (a, b); the best seen is kept."""
    lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
    a, b = (hi - lo) / top, -lo
    best_a, best_b, best_e = a.copy(), b.copy(), np.full(len(x), np.inf, dtype=np.float32)
    for _ in range(iters):
        safe = np.where(a > 0, a, 1)
        q = np.clip(np.rint((x + b[:, None]) / safe[:, None]), 0, top)
        q = np.where(a[:, None] > 0, q, 0)
        err = ((a[:, None] * q - b[:, None] - x) ** 2).sum(1)
        better = err < best_e
        best_a, best_b, best_e = np.where(better, a, best_a), np.where(better, b, best_b), np.where(better, err, best_e)
        qm, xm = q.mean(1), x.mean(1)
        var = ((q - qm[:, None]) ** 2).sum(1)
        cov = ((q - qm[:, None]) * (x - xm[:, None])).sum(1)
        a_ls = np.where(var > 0, cov / np.where(var > 0, var, 1), a)
        b_ls = a_ls * qm - xm
        neg = b_ls < 0  # the offset must not be positive: refit the scale alone through zero
        qq = (q * q).sum(1)
        a = np.maximum(np.where(neg, (q * x).sum(1) / np.where(qq > 0, qq, 1), a_ls), 0)
        b = np.where(neg, 0, b_ls)
    return best_a.astype(np.float32), best_b.astype(np.float32)


def _six_bit(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per super-block (rows of v, >= 0): fp16 step and 6-bit multiples of it."""
    step = (v.max(1) / 63).astype(np.float16)
    s = step.astype(np.float32)
    k = np.clip(np.rint(v / np.where(s > 0, s, 1)[:, None]), 0, 63).astype(np.uint8)
    return step, k


def _pack_six_bit(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> 12 bytes: the low 6 bits of the first four of each in bytes
    0-3 and 4-7, the last four split into low nibbles (bytes 8-11) and their top 2 bits (bits 6-7
    of bytes 0-7)."""
    out = np.empty((len(sc), 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _quantize_qk_affine(x: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K / Q5_K: 8 sub-blocks of 32 values, x = d*sc*q - dmin*mn, sc and mn 6-bit."""
    top = (1 << bits) - 1
    xb = x.reshape(-1, 256)
    nb = len(xb)
    a, b = _fit_affine(xb.reshape(-1, 32), top)
    d, sc = _six_bit(a.reshape(nb, 8))
    dmin, mn = _six_bit(b.reshape(nb, 8))
    scale = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * mn
    q = np.rint((xb.reshape(nb, 8, 32) + offset[..., None]) / np.where(scale > 0, scale, 1)[..., None])
    q = np.where(scale[..., None] > 0, np.clip(q, 0, top), 0).astype(np.uint8).reshape(nb, 4, 2, 32)
    low = q & 15
    parts = [_fp16_bytes(d[:, None])[:, 0], _fp16_bytes(dmin[:, None])[:, 0], _pack_six_bit(sc, mn)]
    if bits == 5:  # bit 4 of value 32k + j is bit k of byte j
        high = ((q >> 4) & 1).reshape(nb, 8, 32) << np.arange(8, dtype=np.uint8)[:, None]
        parts.append(high.sum(1, dtype=np.uint8))
    parts.append((low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128))  # 64 values per 32 bytes
    return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)


def _round_symmetric(g: np.ndarray, s: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """q = round(g / s) in [lo, hi] per row (0 where s = 0), and each row's squared error."""
    q = np.where(s[:, None] != 0, np.clip(np.rint(g / np.where(s != 0, s, 1)[:, None]), lo, hi), 0)
    return q, ((s[:, None] * q - g) ** 2).sum(1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K: 16 sub-blocks of 16 values, x = d*sc*(q - 32), sc int8, q 6-bit."""
    xb = x.reshape(-1, 256)
    nb = len(xb)
    g = xb.reshape(-1, 16)
    peak = np.take_along_axis(g, np.abs(g).argmax(1)[:, None], 1)[:, 0]  # signed: it takes level -32
    best_s, best_e = -peak / 32, np.full(len(g), np.inf, dtype=np.float32)
    for div in (32, 31.5, 31, 30.5, 30, 29, 28):  # a few scales at and above the peak's, each refit
        s = -peak / div
        q, err = _round_symmetric(g, s, -32, 31)
        qq = (q * q).sum(1)
        s_ls = np.where(qq > 0, (q * g).sum(1) / np.where(qq > 0, qq, 1), s)  # least squares for these q
        for cand, e in ((s, err), (s_ls, _round_symmetric(g, s_ls, -32, 31)[1])):
            better = e < best_e
            best_s, best_e = np.where(better, cand, best_s), np.where(better, e, best_e)
    s = best_s.reshape(nb, 16)
    d = (np.abs(s).max(1) / 127).astype(np.float16)
    df = d.astype(np.float32)
    sc = np.clip(np.rint(s / np.where(df > 0, df, 1)[:, None]), -128, 127).astype(np.int8)
    eff = df[:, None] * sc
    q = np.rint(xb.reshape(nb, 16, 16) / np.where(eff != 0, eff, 1)[..., None])
    q = (np.where(eff[..., None] != 0, np.clip(q, -32, 31), 0) + 32).astype(np.uint8).reshape(nb, 256)
    low, high = q & 15, q >> 4
    low = low.reshape(nb, 2, 2, 64)  # value 128h + 64n + j: nibble n of ql[64h + j]
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    high = high.reshape(nb, 2, 4, 32)  # value 128h + 32s + j: bits 2s, 2s+1 of qh[32h + j]
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), _fp16_bytes(d[:, None])[:, 0]], axis=1)
    return out.reshape(x.shape[0], -1)


K_QUANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q4_K": lambda x: _quantize_qk_affine(x, 4), "Q5_K": lambda x: _quantize_qk_affine(x, 5), "Q6_K": _quantize_q6_k,
}


def encode_matrix(x: np.ndarray | torch.Tensor, type_name: str) -> np.ndarray:
    """A plain rows x n float matrix in block type `type_name` -> uint8 rows x bytes (the tensor's
    data as a GGUF file stores it)."""
    x = np.ascontiguousarray(x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x, np.float32)
    t = check_type(type_name, x.shape[1], "matrix")
    if t.name == "F32":
        data = x
    elif t.name == "F16":
        data = x.astype("<f2")
    elif t.name in K_QUANTS:
        data = K_QUANTS[t.name](x)
    else:  # BF16 and the 32-value types: the reference rounding of the gguf package
        gguf = _gguf()
        data = gguf.quants.quantize(x, gguf.GGMLQuantizationType(t.ggml))
    return np.ascontiguousarray(data).view(np.uint8).reshape(x.shape[0], t.row_bytes(x.shape[1]))


def decode_matrix(data: np.ndarray, type_name: str, n: int) -> np.ndarray:
    """uint8 rows x bytes of block type `type_name` -> float32 rows x n (the gguf package's decoder)."""
    gguf = _gguf()
    data = np.ascontiguousarray(data).view(np.uint8).reshape(data.shape[0], BLOCK_TYPES[type_name].row_bytes(n))
    return np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType(BLOCK_TYPES[type_name].ggml)),
                      dtype=np.float32).reshape(data.shape[0], n)


