"""Logits straight from packed integer codes on the CPU: a few lines of C, compiled at first use.

A tied head reads every row of the matrix at every decoding step. Dequantising 8192-row chunks
in PyTorch (QuantizedEmbedding's general path) costs 10-20x the dense matmul, while the codes
are 4-8x smaller than the fp32 matrix: the step is memory-bound, so reading the codes once and
decoding each row in registers is what makes a compressed head as fast as a dense one. The
kernel decodes one row at a time into the row's exact fp32 values (level * scale, as dense()
gives them) and takes its dot product with each hidden state; only the summation order differs
from `h @ dense().T`.

It is compiled with the system C compiler into the lmembed cache (once per machine, keyed by the
source and flags) and called through ctypes on the tensors' memory. Without a compiler, or with
LMEMBED_KERNELS=0, `packed_logits` returns None and the caller keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

# At most this many hidden states per call take the row-by-row kernel (decoding); more are a
# matrix-matrix product, where rows decoded a chunk at a time (decode_rows) feed a BLAS matmul.
KERNEL_MAX_ROWS = 2
DECODE_ROWS = 2048  # rows per decoded chunk: a 2048 x d float buffer, reused through the matrix
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-shared", "-fPIC"]

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* Scales are fp16 as stored (half = 1) or float32 (half = 0, computed ones). */
static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {  /* subnormal: normalise */
            exp = 113;
            while (!(man & 1024)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 1023) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float scale_at(const void *s, int half, int64_t i) {
    return half ? half_to_float(((const uint16_t *)s)[i]) : ((const float *)s)[i];
}

/* The fp32 values of one row: (code + shift) * scale of its group, or code * scale + offset when
   the group has an offset; codes are `bits` wide, packed little-endian (int4: two per byte, low
   nibble first). */
static void decode_row(const uint8_t *p, const void *s, int half, int64_t s0, const float *o, float *w, int d,
                       int bits, int group, float shift) {
    if (bits == 4) {
        for (int j = 0; j < d / 2; j++) {
            w[2 * j] = (float)(p[j] & 15);
            w[2 * j + 1] = (float)(p[j] >> 4);
        }
        if (d & 1) w[d - 1] = (float)(p[d / 2] & 15);
    } else if (bits == 8) {
        for (int k = 0; k < d; k++) w[k] = (float)p[k];
    } else {
        for (int k = 0; k < d; k++) {
            int64_t bit = (int64_t)k * bits;
            uint32_t x = p[bit >> 3];
            if ((bit & 7) + bits > 8) x |= (uint32_t)p[(bit >> 3) + 1] << 8;
            w[k] = (float)((x >> (bit & 7)) & ((1u << bits) - 1));
        }
    }
    for (int k0 = 0, g = 0; k0 < d; k0 += group, g++) {
        int end = k0 + group < d ? k0 + group : d;
        float sc = scale_at(s, half, s0 + g);
        if (o) {
            float off = o[g];
            for (int k = k0; k < end; k++) w[k] = w[k] * sc + off;
        } else {
            for (int k = k0; k < end; k++) w[k] = (w[k] + shift) * sc;
        }
    }
}

/* out[m, v] = sum_k w(v, k) * h[m, k] for V rows and M hidden states. */
int packed_logits(const uint8_t *codes, const void *scales, int half, const float *offsets, const float *h,
                  float *out, int64_t V, int d, int row_bytes, int bits, int group, int M, float shift, int threads) {
    int ng = (d + group - 1) / group, failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *w = malloc(sizeof(float) * d);
        if (!w) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t v = 0; v < V; v++) {
            if (!w) continue;
            decode_row(codes + v * row_bytes, scales, half, v * ng, offsets ? offsets + v * ng : 0, w, d, bits, group,
                       shift);
            for (int m = 0; m < M; m++) {
                const float *hm = h + (int64_t)m * d;
                float acc = 0.f;
                for (int k = 0; k < d; k++) acc += w[k] * hm[k];
                out[(int64_t)m * V + v] = acc;
            }
        }
        free(w);
    }
    return failed;
}

/* One hidden state against codes that need no decoding buffer (decoding: M = 1 or 2). The
   dot product of a group of codes with h is taken on the codes themselves, then scaled:
   sum_g s_g * (sum_k code_k h_k + shift * sum_k h_k); hs holds the per-group sums of h. */
#ifdef __AVX2__
static inline __m256 to_float8(__m128i bytes) {  /* the low 8 unsigned bytes as 8 floats */
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* 32 int4 codes (16 bytes, low nibble first) dotted with 32 floats. */
static inline float dot32_int4(const uint8_t *p, const float *h) {
#ifdef __AVX2__
    __m128i b = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    __m128i a0 = _mm_unpacklo_epi8(lo, hi), a1 = _mm_unpackhi_epi8(lo, hi);  /* codes in order */
    __m256 acc = _mm256_mul_ps(to_float8(a0), _mm256_loadu_ps(h));
    acc = _mm256_fmadd_ps(to_float8(_mm_srli_si128(a0, 8)), _mm256_loadu_ps(h + 8), acc);
    acc = _mm256_fmadd_ps(to_float8(a1), _mm256_loadu_ps(h + 16), acc);
    acc = _mm256_fmadd_ps(to_float8(_mm_srli_si128(a1, 8)), _mm256_loadu_ps(h + 24), acc);
    return hsum8(acc);
#else
    float acc = 0.f;
    for (int j = 0; j < 16; j++) acc += (float)(p[j] & 15) * h[2 * j] + (float)(p[j] >> 4) * h[2 * j + 1];
    return acc;
#endif
}

static inline float dot_int8(const uint8_t *p, const float *h, int n) {
    float acc = 0.f;
    for (int k = 0; k < n; k++) acc += (float)p[k] * h[k];
    return acc;
}

/* The fp32 values of V rows, into out (V x d): the dequantised matrix, a chunk at a time. */
void decode_rows(const uint8_t *codes, const void *scales, int half, const float *offsets, float *out, int64_t V,
                 int d, int row_bytes, int bits, int group, float shift, int threads) {
    int ng = (d + group - 1) / group;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t v = 0; v < V; v++)
        decode_row(codes + v * row_bytes, scales, half, v * ng, offsets ? offsets + v * ng : 0, out + v * d, d, bits,
                   group, shift);
}

/* bits 4 (groups and d multiples of 32) or 8 (any group). */
void fused_logits(const uint8_t *codes, const void *scales, int half, const float *h, const float *hs, float *out,
                  int64_t V, int d, int row_bytes, int bits, int group, int M, float shift, int threads) {
    int ng = (d + group - 1) / group;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t v = 0; v < V; v++) {
        const uint8_t *p = codes + v * row_bytes;
        for (int m = 0; m < M; m++) {
            const float *hm = h + (int64_t)m * d;
            float acc = 0.f;
            for (int g = 0, k0 = 0; g < ng; g++, k0 += group) {
                int n = k0 + group < d ? group : d - k0;
                float dot = 0.f;
                if (bits == 4)
                    for (int k = k0; k < k0 + n; k += 32) dot += dot32_int4(p + k / 2, hm + k);
                else
                    dot = dot_int8(p + k0, hm + k0, n);
                acc += scale_at(scales, half, v * ng + g) * (dot + shift * hs[(int64_t)m * ng + g]);
            }
            out[(int64_t)m * V + v] = acc;
        }
    }
}
"""

_library: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    env = os.environ.get("LMEMBED_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "lmembed") / "kernels"


def _build(compiler: str) -> Path:
    """The shared library for this source, flags and machine; compiled once, then reused."""
    key = hashlib.sha1("\0".join([SOURCE, *FLAGS, platform.machine(), platform.node()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"packed_logits-{key}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, lib = Path(tmp) / "packed_logits.c", Path(tmp) / "packed_logits.so"
        src.write_text(SOURCE)
        subprocess.run([compiler, *FLAGS, str(src), "-o", str(lib)], check=True, capture_output=True, timeout=120)
        os.replace(lib, path)  # atomic: a concurrent process finds a whole library or none
    return path


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (disabled, no compiler, or it failed to build: warned once)."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if os.environ.get("LMEMBED_KERNELS", "1") == "0" or compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"lmembed: packed-code kernel unavailable, using the slower PyTorch path ({e})", stacklevel=2)
        return None
    lib.packed_logits.restype = ctypes.c_int
    ptr, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.packed_logits.argtypes = [ptr, ptr, i32, ptr, ptr, ptr, i64, i32, i32, i32, i32, i32, f32, i32]
    lib.decode_rows.restype = None
    lib.decode_rows.argtypes = [ptr, ptr, i32, ptr, ptr, i64, i32, i32, i32, i32, f32, i32]
    lib.fused_logits.restype = None
    lib.fused_logits.argtypes = [ptr, ptr, i32, ptr, ptr, ptr, i64, i32, i32, i32, i32, i32, f32, i32]
    _library = lib
    return lib


def _fused(bits: int, group: int, d: int, offsets: torch.Tensor | None) -> bool:
    """Whether the in-place dot products serve: int8 codes, or int4 in whole 32s."""
    return offsets is None and (bits == 8 or (bits == 4 and group % 32 == 0 and d % 32 == 0))


def _usable(packed: torch.Tensor, bits: int, *tensors: torch.Tensor | None) -> bool:
    """On the CPU, at most 8 bits, and no gradient wanted through any tensor."""
    return packed.device.type == "cpu" and bits <= 8 and not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors))


def decode(packed: torch.Tensor, scales: torch.Tensor, dim: int, *, bits: int, group: int, shift: float = 0.0,
           offsets: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The float32 rows (V x dim) of packed codes, exactly as lmembed's PyTorch path gives them,
    into `out` when given (a buffer reused across chunks: no fresh pages to fault in); None when
    the kernel cannot serve (then the caller decodes with PyTorch)."""
    lib = library() if _usable(packed, bits, scales, offsets) else None
    if lib is None:
        return None
    codes, (sc, half) = packed.contiguous(), _scales(scales)
    o32 = offsets.detach().float().contiguous() if offsets is not None else None
    out = torch.empty(codes.shape[0], dim, dtype=torch.float32) if out is None else out[: codes.shape[0]]
    lib.decode_rows(codes.data_ptr(), sc.data_ptr(), half, o32.data_ptr() if o32 is not None else None,
                    out.data_ptr(), codes.shape[0], dim, codes.shape[1], bits, group, shift, torch.get_num_threads())
    return out


def _scales(scales: torch.Tensor) -> tuple[torch.Tensor, int]:
    """fp16 scales as they are (read and converted in C: no fp32 copy per call), others as fp32."""
    s = scales.detach()
    return (s.contiguous(), 1) if s.dtype == torch.float16 else (s.float().contiguous(), 0)


def packed_logits(packed: torch.Tensor, scales: torch.Tensor, h: torch.Tensor, *, bits: int, group: int,
                  shift: float = 0.0, offsets: torch.Tensor | None = None) -> torch.Tensor | None:
    """h (M, d) @ E.T from packed codes and per-group scales (V x groups), as float32 (M, V); a
    value is (code + shift) * scale, or code * scale + offset with per-group `offsets`. None when
    the kernel cannot serve this call (not on the CPU, too many rows, gradients needed, no kernel)."""
    if h.shape[0] > KERNEL_MAX_ROWS or not _usable(packed, bits, h, scales, offsets):
        return None
    lib = library()
    if lib is None:
        return None
    codes, (sc, half) = packed.contiguous(), _scales(scales)
    o32 = offsets.detach().float().contiguous() if offsets is not None else None
    x = h.detach().float().contiguous()
    v, d = codes.shape[0], x.shape[1]
    out = torch.empty(x.shape[0], v, dtype=torch.float32)
    if _fused(bits, group, d, offsets):
        ng = -(-d // group)
        hs = torch.nn.functional.pad(x, (0, ng * group - d)).view(x.shape[0], ng, group).sum(-1).contiguous()
        lib.fused_logits(codes.data_ptr(), sc.data_ptr(), half, x.data_ptr(), hs.data_ptr(), out.data_ptr(), v, d,
                         codes.shape[1], bits, group, x.shape[0], shift, torch.get_num_threads())
        return out
    failed = lib.packed_logits(codes.data_ptr(), sc.data_ptr(), half, o32.data_ptr() if o32 is not None else None,
                               x.data_ptr(), out.data_ptr(), v, d, codes.shape[1], bits, group, x.shape[0], shift,
                               torch.get_num_threads())
    return None if failed else out
