"""Lookups and logits straight from packed codes on the CPU: a small C library, compiled at first use.

A tied head reads every row of the matrix at every decoding step. The step is memory-bound, and
the codes are 4-8x smaller than the fp32 matrix, so reading the codes once and taking each row's
dot products in registers is what makes a compressed head as fast as a dense one; dequantising the
matrix in PyTorch at each step costs many times the dense matmul. So every packed format
(symmetric int codes, super-block codes, mixed widths, transform-coded bands, per-row ranks) is
described to one C engine (source.py) as a `Layout` of column ranges whose rows are stored in a
few formats, and served three ways:

- `head(layout, h)`: few hidden states (decoding), the dot products on the codes; many (a prompt),
  DECODE_ROWS rows at a time decoded into one reused buffer that feeds a BLAS matmul;
- `gather(layout, ids)`: rows by id (the lookup), decoded to exactly the PyTorch path's values;
- `rows(layout, start, n)`: a range of rows (what `dense()` and the prompt path read).

The library is compiled with the system C compiler into the lmembed cache once per machine and
verified before every load (cache.py). Without a compiler, with LMEMBED_KERNELS=0, off the CPU, or
when gradients are wanted, these return None and the module keeps its PyTorch path, which gives
the same numbers (logits up to float summation order).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
from dataclasses import dataclass, field

import torch

from ....common.cache import note
from . import cache, source
from .source import BLOCK, F_KQ, F_SYM, F_ZERO, MAX_CLASSES, MAX_M, MAX_SEGMENTS, S_F16, S_F32, S_LUT

__all__ = ["BLOCK", "DECODE_ROWS", "KERNEL_MAX_ROWS", "Codes", "Columns", "Layout", "decode", "gather", "head",
           "into", "library", "packed_logits", "rotate", "rowrank_logits", "rowrank_rows", "rows", "usable"]

# At most this many hidden states per call take the row-by-row kernel (decoding); more are a
# matrix-matrix product, where rows decoded a chunk at a time feed a BLAS matmul.
KERNEL_MAX_ROWS = 2
DECODE_ROWS = 2048  # rows per decoded chunk: a 2048 x d float buffer, reused through the matrix

_library: ctypes.CDLL | None = None
_tried = False


def library() -> ctypes.CDLL | None:
    """The compiled, verified library, or None (disabled, no compiler, or unusable: one note line)."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if os.environ.get("LMEMBED_KERNELS", "1") == "0" or compiler is None:
        return None
    try:
        _library = cache.load(compiler)
    except cache.KernelUnavailable as e:
        note(f"packed-code kernel unavailable, using the slower PyTorch path ({e})")
    return _library


def usable(*tensors: torch.Tensor | None) -> bool:
    """The kernel can serve: every tensor on the CPU, no gradient wanted through any, a library."""
    live = [t for t in tensors if t is not None]
    if any(t.device.type != "cpu" for t in live):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in live):
        return False
    return library() is not None


# --- layouts: what the C engine reads --------------------------------------------------------------
@dataclass
class Codes:
    """The rows of one class in one format (see source.py): `zero`, `sym` or `kq`."""

    kind: str
    rows: int = 0
    bits: int = 0
    group: int = 1
    codes: torch.Tensor | None = None  # rows x ceil(n * bits / 8) uint8
    scales: torch.Tensor | None = None  # sym: rows x groups (fp16 / fp32), or rows uint8 indices into lut
    lut: torch.Tensor | None = None
    shift: float = 0.0
    subs: torch.Tensor | None = None  # kq: rows x ceil(12 * groups / 8) uint8
    supers: torch.Tensor | None = None  # kq: rows x 2 (D, M)


ZERO = Codes("zero")


@dataclass
class Columns:
    """Columns col0 .. col0+n-1: rows of class c (from a `map_bits`-wide packed map; class 0 for all
    when there is no map) are the rows of formats[c], in vocabulary order; counts = class_counts."""

    col0: int
    n: int
    formats: list[Codes]
    map: torch.Tensor | None = None
    map_bits: int = 0
    counts: torch.Tensor | None = None


@dataclass
class Layout:
    num_embeddings: int
    dim: int
    columns: list[Columns]
    keep: list[torch.Tensor] = field(default_factory=list)  # converted tensors the native view points into
    _native: ctypes.Array | None = None

    def native(self) -> ctypes.Array:
        """The engine's view (built once per layout; the layout keeps its tensors alive)."""
        if self._native is None:
            self._native = _segments(self)
        return self._native


def class_counts(classes: torch.Tensor, n: int) -> torch.Tensor:
    """(blocks x n) int32: rows of each class before every BLOCK rows (a segment's count table)."""
    blocks = math.ceil(len(classes) / BLOCK)
    per = torch.zeros(blocks * n, dtype=torch.int64, device=classes.device)
    per.index_add_(0, torch.arange(len(classes), device=classes.device) // BLOCK * n + classes.long(),
                   torch.ones_like(classes, dtype=torch.int64))
    per = per.view(blocks, n)
    return (per.cumsum(0) - per).to(torch.int32)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _as(t: torch.Tensor, keep: list[torch.Tensor], types: dict[torch.dtype, int]) -> tuple[torch.Tensor, int]:
    """t as one of the dtypes the engine reads (a float32 copy otherwise: a model cast to bf16)."""
    t = t.detach()
    if t.dtype not in types:
        t = t.float()
    t = t.contiguous()
    keep.append(t)
    return t, types.get(t.dtype, S_F32)


def _shape_error(what: str) -> ValueError:
    return ValueError(f"packed rows: {what} do not fit the layout")


def _format(c: Codes, n: int, keep: list[torch.Tensor]) -> source.Format:
    """The native view of one class's rows, its tensors' shapes checked (the C code trusts them)."""
    if c.kind == "zero":
        return source.Format(kind=F_ZERO)
    groups = math.ceil(n / c.group)
    row_bytes = math.ceil(n * c.bits / 8)
    codes = c.codes.detach().contiguous()
    keep.append(codes)
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (c.rows, row_bytes) or not 1 <= c.bits <= 8:
        raise _shape_error("codes")
    f = source.Format(kind=F_SYM if c.kind == "sym" else F_KQ, rows=c.rows, bits=c.bits, group=c.group, groups=groups,
                      row_bytes=row_bytes, codes=codes.data_ptr(), shift=c.shift)
    if c.kind == "sym":
        if c.lut is not None:
            lut, _ = _as(c.lut, keep, {torch.float32: S_F32})
            scales = c.scales.contiguous()
            if scales.dtype != torch.uint8 or scales.numel() != c.rows * groups or lut.numel() != 256:
                raise _shape_error("scale bytes")
            keep.append(scales)
            f.scale_type, f.lut = S_LUT, lut.data_ptr()
        else:
            scales, f.scale_type = _as(c.scales, keep, {torch.float16: S_F16, torch.float32: S_F32})
            if scales.numel() != c.rows * groups:
                raise _shape_error("scales")
        f.scales = scales.data_ptr()
        return f
    subs = c.subs.detach().contiguous()
    supers, f.super_type = _as(c.supers, keep, {torch.float16: S_F16, torch.float32: S_F32})
    keep.append(subs)
    f.sub_bytes = math.ceil(12 * groups / 8)
    if subs.dtype != torch.uint8 or tuple(subs.shape) != (c.rows, f.sub_bytes) or supers.numel() != 2 * c.rows:
        raise _shape_error("sub-parameters")
    f.subs, f.supers = subs.data_ptr(), supers.data_ptr()
    return f


def _segments(layout: Layout) -> ctypes.Array:
    """The native view of a layout (its tensors kept alive in layout.keep)."""
    if not 1 <= len(layout.columns) <= MAX_SEGMENTS:
        raise ValueError(f"packed rows: 1..{MAX_SEGMENTS} column ranges")
    segs = (source.Segment * len(layout.columns))()
    for s, col in zip(segs, layout.columns, strict=True):
        classes = len(col.formats)
        if not 1 <= classes <= MAX_CLASSES or (col.map is None and classes != 1):
            raise ValueError(f"packed rows: 1..{MAX_CLASSES} classes, one without a map")
        s.col0, s.n, s.classes = col.col0, col.n, classes
        if col.map is not None:
            m, counts = col.map.contiguous(), col.counts.contiguous()
            if (m.dtype != torch.uint8 or m.numel() < math.ceil(layout.num_embeddings * col.map_bits / 8)
                    or counts.dtype != torch.int32 or tuple(counts.shape) != (math.ceil(layout.num_embeddings / BLOCK),
                                                                              classes)):
                raise _shape_error("class map or counts")
            layout.keep += [m, counts]
            s.map, s.map_bits, s.counts = m.data_ptr(), col.map_bits, counts.data_ptr()
        for c, codes in enumerate(col.formats):
            s.fmt[c] = _format(codes, col.n, layout.keep)
    return segs


def _check(status: int, what: str) -> None:
    if status:
        raise MemoryError(f"lmembed kernel {what}: out of memory for its scratch rows")


def rows(layout: Layout, start: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows start .. start+n-1 as float32 (n x dim), into `out` when given (a reused buffer)."""
    lib = library()
    out = torch.empty(n, layout.dim) if out is None else out[:n]
    _check(lib.lm_decode(layout.native(), len(layout.columns), layout.num_embeddings, layout.dim, start, n,
                         out.data_ptr(), torch.get_num_threads()), "decode")
    return out


def gather(layout: Layout, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (1-D, each in range: the caller checks) as float32 (len(ids) x dim)."""
    lib = library()
    ids = ids.contiguous().to(torch.int64)
    out = torch.empty(len(ids), layout.dim)
    _check(lib.lm_gather(layout.native(), len(layout.columns), layout.dim, ids.data_ptr(), len(ids),
                         out.data_ptr(), torch.get_num_threads()), "gather")
    return out


def head(layout: Layout, h: torch.Tensor) -> torch.Tensor:
    """h (M x dim) @ E.T as (M x V) in h's dtype: few rows on the codes, many through decoded chunks."""
    lib = library()
    v, d = layout.num_embeddings, layout.dim
    if len(h) <= KERNEL_MAX_ROWS:
        x = h.detach().float().contiguous()
        out = torch.empty(len(x), v)
        _check(lib.lm_logits(layout.native(), len(layout.columns), v, d, x.data_ptr(), len(x), out.data_ptr(),
                             torch.get_num_threads()), "logits")
        return out.to(h.dtype)
    out = torch.empty(len(h), v, dtype=h.dtype)
    buf = torch.empty(min(DECODE_ROWS, v), d)
    for s in range(0, v, DECODE_ROWS):
        w = rows(layout, s, min(DECODE_ROWS, v - s), buf)
        into(out, s, h, w)
    return out


def into(out: torch.Tensor, start: int, h: torch.Tensor, w: torch.Tensor) -> None:
    """out[:, start : start + len(w)] = h @ w.T, written in place by BLAS (the slice's row stride is
    its leading dimension): no (M x chunk) temporary per chunk, whose fresh pages cost a prompt
    ~10 % more than the matmul where the allocator maps every large block anew."""
    torch.mm(h, w.to(h.dtype).t(), out=out[:, start : start + len(w)])


# --- a transform's int8 decoder (TransformCodedEmbedding) ---------------------------------------------
ROTATE_MAX_ROWS = 8  # rows rotated in C; more take a BLAS matmul against the decoded rotation


def rotate(x: torch.Tensor, decoder: torch.Tensor, scales: torch.Tensor, *, transpose: bool) -> torch.Tensor:
    """x @ R (or x @ R.T) for R = decoder (int8, d x d) * scales[:, None], read in place: no d x d
    float copy per call for the few rows of a decoding step."""
    x = x.detach().float().contiguous()
    dec = decoder.detach().contiguous()
    s = scales.detach().float().contiguous()
    if dec.dtype != torch.int8 or dec.shape != (x.shape[1], x.shape[1]) or s.shape != (x.shape[1],):
        raise ValueError("rotate: the decoder must be int8 d x d with d row scales")
    out = torch.empty_like(x)
    _check(library().tc_rotate(x.data_ptr(), len(x), x.shape[1], dec.data_ptr(), s.data_ptr(), int(transpose),
                               out.data_ptr(), torch.get_num_threads()), "rotate")
    return out


# --- per-row ranks (RowRankEmbedding) ----------------------------------------------------------------
@dataclass
class RankRows:
    """Row v keeps ranks[v] float32 codes at codes[start[k] + (position[v] - first[k]) * k], k = ranks[v]."""

    codes: torch.Tensor
    ranks: torch.Tensor  # int16
    position: torch.Tensor  # int32: a row's place in the stored order
    first: torch.Tensor  # int64 (kmax + 1): each rank's first place
    start: torch.Tensor  # int64 (kmax + 1): each rank's first code
    kmax: int

    def pointers(self) -> list[int]:
        return [self.codes.data_ptr(), self.ranks.data_ptr(), self.position.data_ptr(), self.first.data_ptr(),
                self.start.data_ptr()]


def rowrank_logits(r: RankRows, z: torch.Tensor) -> torch.Tensor:
    """(M x V) = codes_v . z[:, :k_v] for every row, M <= MAX_M (z: M x kmax float32)."""
    z = z.detach().float().contiguous()
    out = torch.empty(len(z), len(r.ranks))
    if len(z) > MAX_M:
        raise ValueError(f"rowrank_logits: at most {MAX_M} hidden states")
    _check(library().rr_logits(*r.pointers(), z.data_ptr(), r.kmax, len(r.ranks), len(z), out.data_ptr(),
                               torch.get_num_threads()), "rowrank logits")
    return out


def rowrank_rows(r: RankRows, start: int = 0, n: int = 0, ids: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows (start .. start+n-1, or `ids`) as kmax codes each, zero past each row's rank."""
    if ids is not None:
        ids = ids.contiguous().to(torch.int64)
        n = len(ids)
    out = torch.empty(n, r.kmax) if out is None else out[:n]
    _check(library().rr_rows(*r.pointers(), r.kmax, start, _ptr(ids), n, out.data_ptr(), torch.get_num_threads()),
           "rowrank rows")
    return out


# --- plain symmetric codes (QuantizedEmbedding's arguments) -------------------------------------------
def _plain(packed: torch.Tensor, scales: torch.Tensor, dim: int, bits: int, group: int, shift: float) -> Layout:
    codes = Codes("sym", rows=packed.shape[0], bits=bits, group=group, codes=packed, scales=scales, shift=shift)
    return Layout(packed.shape[0], dim, [Columns(0, dim, [codes])])


def packed_logits(packed: torch.Tensor, scales: torch.Tensor, h: torch.Tensor, *, bits: int, group: int,
                  shift: float = 0.0) -> torch.Tensor | None:
    """h (M, d) @ E.T from packed symmetric codes ((code + shift) * scale of its group), float32 (M, V);
    None when the kernel cannot serve (off the CPU, more than KERNEL_MAX_ROWS rows, gradients, none)."""
    if h.shape[0] > KERNEL_MAX_ROWS or not usable(packed, scales, h) or bits > 8:
        return None
    return head(_plain(packed, scales, h.shape[1], bits, group, shift), h.float())


def decode(packed: torch.Tensor, scales: torch.Tensor, dim: int, *, bits: int, group: int, shift: float = 0.0,
           out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The float32 rows (V x dim) of packed symmetric codes, exactly as the PyTorch path gives them,
    into `out` when given; None when the kernel cannot serve."""
    if not usable(packed, scales) or bits > 8:
        return None
    return rows(_plain(packed, scales, dim, bits, group, shift), 0, packed.shape[0], out)
