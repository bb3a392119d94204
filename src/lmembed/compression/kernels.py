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

# At most this many hidden states per call go through the kernel (decoding, short prompts); more
# are a matrix-matrix product, where dequantising chunks for BLAS is faster.
KERNEL_MAX_ROWS = 32
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-shared", "-fPIC"]

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>

/* The fp32 values of one row: (code + shift) * scale of its group, or code * scale + offset when
   the group has an offset; codes are `bits` wide, packed little-endian (int4: two per byte, low
   nibble first). */
static void decode_row(const uint8_t *p, const float *s, const float *o, float *w, int d, int bits, int group,
                       float shift) {
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
        float sc = s[g];
        if (o) {
            float off = o[g];
            for (int k = k0; k < end; k++) w[k] = w[k] * sc + off;
        } else {
            for (int k = k0; k < end; k++) w[k] = (w[k] + shift) * sc;
        }
    }
}

/* out[m, v] = sum_k w(v, k) * h[m, k] for V rows and M hidden states. */
int packed_logits(const uint8_t *codes, const float *scales, const float *offsets, const float *h, float *out,
                  int64_t V, int d, int row_bytes, int bits, int group, int M, float shift, int threads) {
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
            decode_row(codes + v * row_bytes, scales + v * ng, offsets ? offsets + v * ng : 0, w, d, bits, group,
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
    lib.packed_logits.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [ctypes.c_int] * 5 + [
        ctypes.c_float, ctypes.c_int]
    _library = lib
    return lib


def packed_logits(packed: torch.Tensor, scales: torch.Tensor, h: torch.Tensor, *, bits: int, group: int,
                  shift: float = 0.0, offsets: torch.Tensor | None = None) -> torch.Tensor | None:
    """h (M, d) @ E.T from packed codes and per-group scales (V x groups), as float32 (M, V); a
    value is (code + shift) * scale, or code * scale + offset with per-group `offsets`. None when
    the kernel cannot serve this call (not on the CPU, too many rows, gradients needed, no kernel)."""
    if (packed.device.type != "cpu" or h.shape[0] > KERNEL_MAX_ROWS or bits > 8
            or (torch.is_grad_enabled() and (h.requires_grad or scales.requires_grad))):
        return None
    lib = library()
    if lib is None:
        return None
    codes = packed.contiguous()
    s32 = scales.detach().float().contiguous()
    o32 = offsets.detach().float().contiguous() if offsets is not None else None
    x = h.detach().float().contiguous()
    v, d = codes.shape[0], x.shape[1]
    out = torch.empty(x.shape[0], v, dtype=torch.float32)
    failed = lib.packed_logits(codes.data_ptr(), s32.data_ptr(), o32.data_ptr() if o32 is not None else None,
                               x.data_ptr(), out.data_ptr(), v, d, codes.shape[1], bits, group, x.shape[0], shift,
                               torch.get_num_threads())
    return None if failed else out
