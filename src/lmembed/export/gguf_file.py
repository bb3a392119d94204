"""The GGUF container, read in place and written anew: header, metadata entries, tensor infos,
aligned tensor data (all little-endian). Entries and tensors this code does not change are
copied as raw bytes, so a rewritten file differs only where lmembed changed it."""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LmembedError
from .blocks import TYPE_BY_NUMBER, gguf_package

EMBD, OUTPUT = "token_embd.weight", "output.weight"
GGUF_MAGIC = b"GGUF"


# ---------------------------------------------------------------------------------------------
# GGUF files: header, metadata entries, tensor infos, aligned tensor data (all little-endian)

SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                  12: "<d"}
STRING, ARRAY = 8, 9
INTEGER_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)


@dataclass
class Entry:
    """One metadata entry: its value type (and element type for arrays) and where its bytes are."""

    key: str
    vtype: int
    sub_type: int | None
    start: int  # the entry's first byte (its key)
    value_start: int  # the value's first byte (for arrays: the first element)
    end: int
    count: int = 1  # elements of an array


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ne0 (the contiguous dimension) first, as GGUF stores it
    ggml: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        t = TYPE_BY_NUMBER.get(self.ggml)
        if t is not None:
            return t.name
        gguf = gguf_package()
        return gguf.GGMLQuantizationType(self.ggml).name


def shown(text: str, limit: int = 300) -> str:
    """Text from a file as one readable line: control characters escaped, long runs cut (a corrupt
    length field can turn kilobytes of binary into a 'key')."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


class GGUFFile:
    """A GGUF file read in place (memory-mapped): metadata parsed, tensor data left on disk."""

    def __init__(self, path: str | os.PathLike, what: str = "src"):
        self.path, self.what = Path(path).expanduser(), what
        p = self.path
        if not p.is_file():
            raise LmembedError(f"{what} {p}: file not found" if not p.exists() else f"{what} {p}: not a file")
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(4)
        if head != GGUF_MAGIC:
            raise LmembedError(f"{what} {p}: not a GGUF file (it starts with {head!r}, expected b'GGUF')")
        self.buf = np.memmap(p, dtype=np.uint8, mode="r")
        try:
            self._parse(size)
        except (struct.error, ValueError, IndexError, UnicodeDecodeError) as e:
            raise LmembedError(f"{what} {p}: truncated or corrupt GGUF file ({e})") from None

    def _parse(self, size: int) -> None:
        buf, pos = self.buf, 4
        (self.version,) = struct.unpack_from("<I", buf, pos)
        if self.version & 0xFFFF == 0:
            raise LmembedError(f"{self.what} {self.path}: a big-endian GGUF file; lmembed reads little-endian ones")
        if self.version not in (2, 3):
            raise LmembedError(f"{self.what} {self.path}: GGUF version {self.version}; lmembed reads versions 2 and 3")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos + 4)
        pos += 20
        if n_tensors > size or n_kv > size:
            raise ValueError(f"{n_tensors} tensors and {n_kv} metadata entries cannot fit in {size} bytes")
        self.entries: dict[str, Entry] = {}
        for i in range(n_kv):
            pos = self._entry(pos, i, size)
        self.tensors: list[TensorInfo] = []
        for _ in range(n_tensors):
            pos = self._tensor_info(pos)
        align = self.value("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise self._bad(f"metadata entry general.alignment: {align!r} is not a power of two")
        self.alignment = align
        self.data_start = -(-pos // align) * align
        self._check_data(size)

    def _bad(self, what: str) -> LmembedError:
        return LmembedError(f"{self.what} {self.path}: {shown(what)}; not a valid GGUF file (nothing was read past it)")

    def _entry(self, pos: int, i: int, size: int) -> int:
        """Parse metadata entry number i at `pos`; returns where the next one starts. Counts are
        checked against the bytes left before any element is read."""
        start = pos
        key, pos = self._string(pos)
        if key in self.entries:
            raise self._bad(f"metadata entry {key} appears twice")
        (vtype,) = struct.unpack_from("<I", self.buf, pos)
        pos += 4
        sub, count = None, 1
        if vtype == ARRAY:
            sub, count = struct.unpack_from("<IQ", self.buf, pos)
            pos += 12
            least = 8 if sub == STRING else struct.calcsize(SCALAR_FORMATS.get(sub, "<B"))
            if count * least > size - pos:
                raise self._bad(f"metadata entry {key}: an array of {count:,} elements cannot fit in the "
                                f"{size - pos:,} bytes left in the file")
        value_start = pos
        try:
            pos = self._skip(pos, sub if vtype == ARRAY else vtype, count)
        except (ValueError, struct.error) as e:
            raise self._bad(f"metadata entry {key}: {e}") from None
        self.entries[key] = Entry(key, vtype, sub, start, value_start, pos, count)
        return pos

    def _tensor_info(self, pos: int) -> int:
        name, pos = self._string(pos)
        (ndim,) = struct.unpack_from("<I", self.buf, pos)
        if not 1 <= ndim <= 4:
            raise self._bad(f"tensor {name}: {ndim} dimensions (GGUF tensors have 1 to 4)")
        shape = tuple(int(x) for x in struct.unpack_from(f"<{ndim}Q", self.buf, pos + 4))
        if 0 in shape:
            raise self._bad(f"tensor {name}: a zero dimension (shape {list(shape)})")
        if any(t.name == name for t in self.tensors):
            raise self._bad(f"tensor {name} appears twice")
        ggml, offset = struct.unpack_from("<IQ", self.buf, pos + 4 + 8 * ndim)
        try:
            nbytes = tensor_nbytes(shape, int(ggml), name)
        except ValueError as e:
            raise self._bad(str(e)) from None
        self.tensors.append(TensorInfo(name, shape, int(ggml), int(offset), nbytes))
        return pos + 4 + 8 * ndim + 12

    def _check_data(self, size: int) -> None:
        """Every tensor's data aligned, inside the file, and apart from every other tensor's."""
        last = None
        for t in sorted(self.tensors, key=lambda t: t.offset):
            if t.offset % self.alignment:
                raise self._bad(f"tensor {t.name}: data offset {t.offset:,} is not a multiple of the alignment "
                                f"{self.alignment}")
            if last is not None and t.offset < last.offset + last.nbytes:
                raise self._bad(f"tensors {last.name} and {t.name} share or overlap their data (offsets "
                                f"{last.offset:,} and {t.offset:,}; {last.name} holds {last.nbytes:,} bytes)")
            end = self.data_start + t.offset + t.nbytes
            if end > size:
                raise LmembedError(f"{self.what} {self.path}: truncated GGUF file (tensor {t.name} ends at byte "
                                   f"{end:,}, the file has {size:,})")
            last = t

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self.buf, pos)
        end = pos + 8 + n
        if end > len(self.buf):
            raise ValueError(f"a string runs past the end of the file at byte {pos}")
        return bytes(self.buf[pos + 8: end]).decode("utf-8", "surrogateescape"), end

    def _skip(self, pos: int, vtype: int, count: int) -> int:
        if vtype == STRING:
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", self.buf, pos)
                pos += 8 + n
                if pos > len(self.buf):  # before the next read: a huge length must not become an offset
                    raise ValueError(f"a string of {n:,} bytes runs past the end of the file")
        elif vtype in SCALAR_FORMATS:
            pos += count * struct.calcsize(SCALAR_FORMATS[vtype])
        else:
            raise ValueError(f"unknown metadata value type {vtype} (nested arrays are not read)")
        if pos > len(self.buf):
            raise ValueError("metadata runs past the end of the file")
        return pos

    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value: int / float / bool / str, a list of str, or a numpy array of numbers."""
        e = self.entries.get(key)
        if e is None:
            return default
        if e.vtype == STRING:
            return self._string(e.value_start)[0]
        if e.vtype != ARRAY:
            return struct.unpack_from(SCALAR_FORMATS[e.vtype], self.buf, e.value_start)[0]
        if e.sub_type == STRING:
            out, pos = [], e.value_start
            for _ in range(e.count):
                s, pos = self._string(pos)
                out.append(s)
            return out
        dtype = np.dtype(SCALAR_FORMATS[e.sub_type])
        return np.frombuffer(self.buf, dtype=dtype, count=e.count, offset=e.value_start)

    def raw(self, key: str) -> bytes:
        """The entry exactly as stored (key, type, value)."""
        e = self.entries[key]
        return bytes(self.buf[e.start: e.end])

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)

    def stored(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as stored; for a matrix, uint8 rows x bytes per row (a row = ne0 values)."""
        start = self.data_start + t.offset
        data = self.buf[start: start + t.nbytes]
        return data.reshape(math.prod(t.shape[1:]), -1) if len(t.shape) > 1 else data

    def decode(self, t: TensorInfo) -> np.ndarray:
        """A matrix tensor as float32 rows x ne0 (the gguf package's decoders), checked finite."""
        out = self._dequantize(t, self.stored(t))
        self._finite(t, out)
        return out if out.flags.writeable else out.copy()  # F32 data is a view of the read-only file

    def check_finite(self, t: TensorInfo, rows: int = 16384) -> None:
        """Decode a matrix a chunk of rows at a time and stop at the first NaN or infinity: checked
        before a model run or a rounding would turn one into garbage without a word."""
        stored = self.stored(t)
        for s in range(0, len(stored), rows):
            self._finite(t, self._dequantize(t, stored[s: s + rows]), s)

    def _dequantize(self, t: TensorInfo, data: np.ndarray) -> np.ndarray:
        gguf = gguf_package()
        try:
            out = gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType(t.ggml))
        except NotImplementedError:
            raise LmembedError(f"{self.what} {self.path}: {t.name} is {t.type_name}, which the installed gguf "
                               "package cannot decode (pip install -U gguf)") from None
        return np.asarray(out, dtype=np.float32).reshape(-1, t.shape[0])

    def _finite(self, t: TensorInfo, out: np.ndarray, first: int = 0) -> None:
        bad = ~np.isfinite(out).all(1)
        if bad.any():
            raise LmembedError(f"{self.what} {self.path}: {t.name} row {first + int(bad.argmax())} holds a non-finite "
                               "value; expected finite weights")

    def matrix(self, name: str, required: bool = True) -> TensorInfo | None:
        t = self.tensor(name)
        if t is None and required:
            names = ", ".join(x.name for x in self.tensors[:5]) or "none"
            raise LmembedError(f"{self.what} {self.path}: the GGUF file has no {name} tensor (its token embeddings); "
                               f"its tensors start {names}")
        if t is not None and len(t.shape) != 2:
            raise LmembedError(f"{self.what} {self.path}: {name} has shape {list(t.shape)}, expected [dim, vocab]")
        return t


def tensor_nbytes(shape: tuple[int, ...], ggml: int, name: str) -> int:
    t = TYPE_BY_NUMBER.get(ggml)
    if t is not None:
        block, nbytes = t.block, t.nbytes
    else:
        gguf = gguf_package()
        try:
            block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name} has unknown type {ggml}") from None
    if shape[0] % block:
        raise ValueError(f"tensor {name}: rows of {shape[0]} values do not split into blocks of {block}")
    return math.prod(shape[1:]) * (shape[0] // block) * nbytes


def read_token_embd(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """(the token embedding matrix of a GGUF file, decoded: float32 vocab x dim; its block type)."""
    f = GGUFFile(path, "file")
    t = f.matrix(EMBD)
    return f.decode(t), t.type_name


def _string(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def kv_bytes(key: str, vtype: int, value: Any, sub_type: int | None = None) -> bytes:
    """One metadata entry as GGUF stores it: key, value type, value (arrays: element type, count)."""
    out = [_string(key), struct.pack("<I", vtype)]
    if vtype == ARRAY:
        out.append(struct.pack("<IQ", sub_type, len(value)))
        if sub_type == STRING:
            out.extend(_string(v) for v in value)
        else:
            out.append(np.asarray(value).astype(np.dtype(SCALAR_FORMATS[sub_type])).tobytes())
    elif vtype == STRING:
        out.append(_string(value))
    else:
        out.append(struct.pack(SCALAR_FORMATS[vtype], value))
    return b"".join(out)


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]  # ne0 first
    ggml: int
    data: np.ndarray  # uint8: the bytes to store


def write_gguf(path: Path, version: int, alignment: int, kv: list[bytes], tensors: list[OutTensor]) -> None:
    """Header, metadata entries (given as bytes), tensor infos, then the tensors' data, each aligned."""
    offsets, off = [], 0
    for t in tensors:
        offsets.append(off)
        off += -(-t.data.nbytes // alignment) * alignment
    with open(path, "wb") as f:
        f.write(GGUF_MAGIC + struct.pack("<IQQ", version, len(tensors), len(kv)))
        for b in kv:
            f.write(b)
        for t, o in zip(tensors, offsets, strict=True):
            f.write(_string(t.name) + struct.pack(f"<I{len(t.shape)}QIQ", len(t.shape), *t.shape, t.ggml, o))
        f.write(b"\0" * (-f.tell() % alignment))
        for t in tensors:
            f.write(memoryview(np.ascontiguousarray(t.data).reshape(-1)))
            f.write(b"\0" * (-t.data.nbytes % alignment))


