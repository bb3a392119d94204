"""Drop-in embedding modules that keep a V x d matrix in compressed form.

Every module serves both roles an embedding matrix has in a language model:

- ``forward(ids)`` is the lookup (what ``nn.Embedding`` does), and
- ``logits(h)`` is ``h @ E.T`` (what a tied output layer does), computed from the stored form:
  factors multiply through the rank-k bottleneck, integer codes are dequantised a chunk of rows
  at a time. Neither materialises the dense V x d matrix.

So a tied model stays tied: the same module object is installed on the input side and, wrapped
in a ``CompressedHead`` that adds the output bias, on the output side.

Modules are rebuilt from ``spec()`` (a small JSON-able dict) plus their tensors, which is how
``lmembed.load`` restores a saved model. ``stored_bytes()`` counts exactly the tensors saved.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LmembedError
from . import kernels
from .kernels import BLOCK, Layout

# Rows dequantised at a time when computing logits: bounds the temporary to chunk x d floats.
LOGIT_CHUNK = 8192


class CompressedEmbedding(nn.Module):
    """Base class: a (num_embeddings x embedding_dim) matrix in some stored form."""

    kind: str = "base"

    def __init__(self, num_embeddings: int, embedding_dim: int, *, scale: float = 1.0):
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        # Some models scale the looked-up rows (Gemma: sqrt(d)); the head never applies it.
        self.scale = float(scale)
        # dtype of the looked-up rows: the original matrix's, so a bf16 model gets bf16 inputs
        self.out_dtype = torch.float32
        self.method = ""  # the method string that produced it (informational, saved in the spec)

    # -- the two roles ------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__} looks up integer token ids; for logits call .logits(h)")
        out = self.lookup(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)
        out = out * self.scale if self.scale != 1.0 else out
        return out.to(self.out_dtype)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:  # ids: 1-D
        raise NotImplementedError

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) -> (..., V) = h @ E.T."""
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The reconstructed V x d matrix (float32). For analysis and error metrics only."""
        return self.lookup(torch.arange(self.num_embeddings, device=self.device)).float()

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for t in self.tensors().values():
            return t.device
        return torch.device("cpu")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this module stores, by local name (what save writes)."""
        return dict(self.state_dict(keep_vars=True))

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def derived_bytes(self) -> int:
        """Bytes of the tensors the module keeps beside its stored ones (index tables, not saved):
        what it costs in memory over stored_bytes()."""
        def size(x: Any) -> int:
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, (list, tuple)):
                return sum(size(y) for y in x)
            return 0

        return sum(size(x) for m in self.modules() for k, x in vars(m).items()
                   if k not in ("_parameters", "_buffers", "_modules"))

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "scale": self.scale, "method": self.method, "out_dtype": str(self.out_dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.stored_bytes():,} bytes"


def stored_now(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a module and its parts hold now (its parameters and buffers)."""
    return [t for m in module.modules() for d in (m._parameters, m._buffers) for t in d.values() if t is not None]


def stored_key(module: nn.Module) -> tuple:
    """Changes when a stored tensor is replaced, moved or edited in place (~1 us per tensor)."""
    return tuple((id(t), t.data_ptr(), t._version) for t in stored_now(module))


class PackedRows(CompressedEmbedding):
    """A module whose rows the C kernels read in place (kernels.Layout): lookups and logits go through
    them when they can serve (CPU, no gradients, a compiler), else through the PyTorch path, which
    gives the same numbers (logits up to float summation order)."""

    def layout(self) -> Layout:
        raise NotImplementedError

    def lookup_torch(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits_torch(self, h: torch.Tensor) -> torch.Tensor:
        """h (M x d) -> (M x V)."""
        raise NotImplementedError

    def to_head_space(self, h: torch.Tensor) -> torch.Tensor:
        """The hidden states the layout's rows are dotted with (a transform's rotation applied)."""
        return h

    def from_row_space(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the matrix from the layout's rows (a transform's rotation applied)."""
        return rows

    def _kernel(self, *extra: torch.Tensor) -> bool:
        return kernels.usable(*extra, *stored_now(self))

    def _layout(self) -> Layout:
        """layout() with its native view, kept while the stored tensors are the same objects at the same
        addresses, unchanged (stored_key); when one changed, derived tables are made (and checked) again
        first: the C code trusts them."""
        key = stored_key(self)
        cached = self.__dict__.get("_layout_cache")
        if cached is None or cached[0] != key:
            if isinstance(self, IndexedEmbedding):
                self._index()
            layout = self.layout()
            layout.native()
            cached = self.__dict__["_layout_cache"] = (key, layout)
        return cached[1]

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_layout_cache", None)
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_layout_cache", None)
        return super()._apply(fn, recurse)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if not self._kernel(ids):
            return self.lookup_torch(ids)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for {self.num_embeddings} embeddings")
        return self.from_row_space(kernels.gather(self._layout(), ids))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Few hidden states (decoding): each row's codes read once, the dot products in registers;
        many (a prompt): chunks of rows decoded into one buffer for a BLAS matmul."""
        flat = h.reshape(-1, self.embedding_dim)
        out = (kernels.head(self._layout(), self.to_head_space(flat)) if self._kernel(flat)
               else self.logits_torch(flat))
        return out.to(h.dtype).reshape(*h.shape[:-1], self.num_embeddings)

    def dense(self) -> torch.Tensor:
        if not self._kernel():
            return super().dense()
        return self.from_row_space(kernels.rows(self._layout(), 0, self.num_embeddings)).float()


class IndexedEmbedding(CompressedEmbedding):
    """A module with derived lookup tables (a few bytes per row at most: class-count tables, row
    places): rebuilt by `_index` whenever its stored tensors are loaded or moved, never saved."""

    def _index(self) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._index()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._index()
        return out


def map_classes(packed: torch.Tensor, bits: int, ids: torch.Tensor) -> torch.Tensor:
    """Entries `ids` of a map of `bits`-wide classes packed as pack_bits packs them, as int64."""
    flat = packed.reshape(-1)
    if bits == 8:
        return flat[ids].long()
    bit = ids.long() * bits
    byte = bit >> 3
    x = flat[byte].long() | (flat[(byte + 1).clamp_max(len(flat) - 1)].long() << 8)
    return (x >> (bit & 7)) & ((1 << bits) - 1)


def map_slots(packed: torch.Tensor, bits: int, counts: torch.Tensor, ids: torch.Tensor,
              cls: torch.Tensor) -> torch.Tensor:
    """Each row's index among the rows of its class (stored in vocabulary order): its block's entry
    in the class-count table plus the rows of its class before it in the block."""
    ids = ids.long()
    before = (ids - ids % BLOCK)[:, None] + torch.arange(BLOCK, device=ids.device)
    inside = before < ids[:, None]
    same = map_classes(packed, bits, torch.minimum(before, ids[:, None])) == cls[:, None]
    return counts[ids // BLOCK, cls].long() + (same & inside).sum(1)


def index_map(packed: torch.Tensor, bits: int, num_rows: int, rows_per_class: list[int], what: str) -> torch.Tensor:
    """The class-count table of a row-class map (kernels.class_counts), once the map is checked: every
    entry names a class that exists, and each class has as many rows as its stored codes. `what`
    names the map in the error."""
    cls = map_classes(packed, bits, torch.arange(num_rows, device=packed.device))
    found = torch.bincount(cls, minlength=len(rows_per_class))
    if found.tolist() != list(rows_per_class):
        raise LmembedError(f"{what} disagrees with the rows stored per class ({found.tolist()} rows per class, "
                           f"the codes hold {list(rows_per_class)})")
    return kernels.class_counts(cls, len(rows_per_class))


class DenseEmbedding(CompressedEmbedding):
    """A plain matrix (the codes of a factorisation, or a trimmed vocabulary)."""

    kind = "dense"

    def __init__(self, weight: torch.Tensor, *, scale: float = 1.0):
        super().__init__(weight.shape[0], weight.shape[1], scale=scale)
        self.weight = nn.Parameter(weight.detach().clone())

    @classmethod
    def wrap(cls, weight: nn.Parameter, *, scale: float = 1.0) -> DenseEmbedding:
        """A module around an existing Parameter (shared, not copied)."""
        module = cls(weight.new_empty(0, weight.shape[1]), scale=scale)
        module.num_embeddings = int(weight.shape[0])
        module.weight = weight
        return module

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> DenseEmbedding:
        dtype = getattr(torch, spec.get("dtype", "float32"))
        return cls(torch.zeros(spec["num_embeddings"], spec["embedding_dim"], dtype=dtype), scale=spec["scale"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "dtype": str(self.weight.dtype).removeprefix("torch.")}

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.to(h.dtype).t()

    def dense(self) -> torch.Tensor:
        return self.weight.detach().float()


class FactorizedEmbedding(CompressedEmbedding):
    """E ~ codes @ decoder + bias: codes V x k (itself any CompressedEmbedding, so codes can be
    quantised), decoder k x d, optional bias d (the autoencoder's decoder has one)."""

    kind = "factorized"

    def __init__(self, codes: CompressedEmbedding | torch.Tensor, decoder: torch.Tensor,
                 bias: torch.Tensor | None = None, *, scale: float = 1.0):
        if isinstance(codes, torch.Tensor):
            codes = DenseEmbedding(codes)
        super().__init__(codes.num_embeddings, decoder.shape[1], scale=scale)
        if codes.embedding_dim != decoder.shape[0]:
            raise ValueError(f"codes have rank {codes.embedding_dim}, decoder {tuple(decoder.shape)}")
        self.rank = int(decoder.shape[0])
        self.codes = codes
        self.decoder = nn.Parameter(decoder.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> FactorizedEmbedding:
        codes = build_module(spec["codes"])
        bias = torch.zeros(spec["embedding_dim"]) if spec.get("bias") else None
        return cls(codes, torch.zeros(spec["rank"], spec["embedding_dim"]), bias, scale=spec["scale"])

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "rank": self.rank, "bias": self.bias is not None, "codes": self.codes.spec()}

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        z = self.codes.lookup(ids)
        out = z @ self.decoder.to(z.dtype)
        return out + self.bias.to(z.dtype) if self.bias is not None else out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.codes.logits(h @ self.decoder.to(h.dtype).t())
        if self.bias is not None:
            out = out + (h @ self.bias.to(h.dtype)).unsqueeze(-1)
        return out


# ---------------------------------------------------------------------------------------------
# Integer codes


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


class QuantizedEmbedding(PackedRows):
    """Symmetric integer codes with one fp16 scale per group of `group_size` columns of a row.

    x ~ scale * level(q), q in [0, 2**bits): `int` grid levels are q - 2**(bits-1), `half` grid
    levels q - 2**(bits-1) + 0.5 (all codes used; better for 3-4 bits). Codes are bit-packed:
    int8 takes a byte per value, int4 half a byte, int3 three eighths.
    """

    kind = "quantized"

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


class CompressedHead(nn.Module):
    """The output layer on top of a compressed matrix: logits = h @ E.T + bias.

    Wraps the same module the input side uses when the model is tied (so the tie survives), and
    keeps the original output bias Parameter (BERT's MLM decoder has one)."""

    def __init__(self, embedding: CompressedEmbedding, bias: nn.Parameter | None = None):
        super().__init__()
        self.embedding = embedding
        self.bias = bias
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.embedding.logits(h)
        return out + self.bias.to(out.dtype) if self.bias is not None else out


MODULE_KINDS: dict[str, type[CompressedEmbedding]] = {}


def register_module(cls: type[CompressedEmbedding]) -> type[CompressedEmbedding]:
    MODULE_KINDS[cls.kind] = cls
    return cls


for _cls in (DenseEmbedding, FactorizedEmbedding, QuantizedEmbedding):
    register_module(_cls)


FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # what a saved dtype string may name
SPEC_LIMITS = {"num_embeddings": 1 << 24, "embedding_dim": 1 << 20, "rank": 1 << 20, "bits": 8, "group_size": 1 << 20,
               "original_vocab": 1 << 24}


def check_spec(spec: Any) -> None:
    """The fields every spec shares, checked before anything is built from it (a manifest can be
    edited): sizes are integers in range, dtypes come from an allow-list, the scale is finite."""
    if not isinstance(spec, dict):
        raise LmembedError(f"compressed module spec must be a JSON object, not {type(spec).__name__}")
    for key, limit in SPEC_LIMITS.items():
        v = spec.get(key)
        if isinstance(v, list):  # a container's summary of its parts (mixed: bits per part), each checked there
            continue
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit):
            raise LmembedError(f"compressed module spec: {key} = {v!r}; expected an integer in 1..{limit}")
    for key in ("out_dtype", "dtype"):
        if key in spec and spec[key] not in FLOAT_DTYPES:
            raise LmembedError(f"compressed module spec: {key} = {spec[key]!r}; expected one of "
                               f"{', '.join(FLOAT_DTYPES)}")
    scale = spec.get("scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise LmembedError(f"compressed module spec: scale = {scale!r}; expected a finite number")


def concat_rows(parts: list[CompressedEmbedding]) -> CompressedEmbedding:
    """One module holding the rows of `parts` in order (same kind and settings; for kinds whose
    every tensor has one row per token, such as quantised codes and their scales)."""
    if len(parts) == 1:
        return parts[0]
    module = build_module({**parts[0].spec(), "num_embeddings": sum(p.num_embeddings for p in parts)})
    module.load_state_dict({k: torch.cat([p.state_dict()[k] for p in parts]) for k in parts[0].state_dict()})
    return module


def build_module(spec: dict[str, Any]) -> CompressedEmbedding:
    """An empty module of the right kind and shapes, to load saved tensors into."""
    check_spec(spec)
    kind = spec.get("kind")
    if kind not in MODULE_KINDS:
        raise LmembedError(f"unknown compressed module kind {kind!r}: expected one of {', '.join(MODULE_KINDS)}")
    try:
        module = MODULE_KINDS[kind].empty(spec)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise LmembedError(f"compressed module spec of kind {kind!r} is malformed ({type(e).__name__}: {e})") from None
    module.method = str(spec.get("method", ""))
    module.out_dtype = getattr(torch, spec.get("out_dtype", "float32"))
    return module
