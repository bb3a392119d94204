"""The contract every stored embedding format keeps, and what the formats share.

A format is a module that holds a V x d matrix in compressed form and serves both roles an
embedding matrix has in a language model:

- ``forward(ids)`` is the lookup (what ``nn.Embedding`` does), and
- ``logits(h)`` is ``h @ E.T`` (what a tied output layer does), computed from the stored form a
  chunk of rows at a time (or in place by the C kernels), never by materialising the dense matrix.

So a tied model stays tied: the same module object is installed on the input side and, wrapped in
a ``CompressedHead`` that adds the output bias, on the output side.

A module is rebuilt from ``spec()`` (a small JSON-able dict, bounds-checked by ``check_spec``) plus
its tensors, which is how a saved model loads; ``stored_bytes()`` counts exactly the tensors saved.
Kinds register themselves with ``register_module``; ``build_module`` only builds registered kinds.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..._version import __version__
from ...errors import LmembedError
from . import kernels
from .kernels import Layout
from .kernels.source import BLOCK

# Rows dequantised at a time when computing logits: bounds the temporary to chunk x d floats.
LOGIT_CHUNK = 8192


class CompressedEmbedding(nn.Module):
    """Base class: a (num_embeddings x embedding_dim) matrix in some stored form."""

    kind: str = "base"
    # The version of this kind's stored form (its spec's fields and its tensors), written in every
    # spec as "version": a kind whose stored form changes so that an older lmembed would misread it
    # bumps it, and an lmembed that meets a newer version refuses the save (check_version). Every
    # registered kind declares its own (register_module checks), so a subclass never inherits one.
    FORMAT_VERSION: int = 1

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

    # -- what the kind answers for itself -----------------------------------------------------
    # Export, training and the methods ask these instead of testing a module's class, so a new kind
    # declares them in its own file. They return data only: export/gguf.py does the GGUF packing.

    # How a GGUF block type holds this kind as stored: "plain" (a float matrix: the source tensor's
    # rows copied, or rounded into any type), "codes" (integer codes with an fp16 scale per group,
    # carried bit for bit where a type holds them: gguf_parts), "superblock" (K-quant super-blocks);
    # None: no block type holds it.
    gguf_form: str | None = None
    # Whether the kind keeps fp16 per-group `scales` that may be tuned while its codes stay codes
    # (fine-tuning's train_scales, kl's scale steps).
    tunable_scales: bool = False

    def gguf_parts(self) -> list[tuple[CompressedEmbedding, torch.Tensor | None]]:
        """The modules whose stored codes GGUF blocks carry, each with the rows of this matrix it holds
        (a boolean mask; None: every row, in order): the module itself unless its rows are in classes."""
        return [(self, None)]

    def split_vocabulary(self) -> tuple[CompressedEmbedding, torch.Tensor | None]:
        """(the matrix over the kept rows, the kept original token ids) for a trimmed vocabulary;
        (self, None) for every other kind."""
        return self, None

    def plain_parameter(self) -> nn.Parameter | None:
        """The Parameter of a matrix stored plain (nothing compressed), else None."""
        return None

    def plain_codes(self) -> torch.Tensor | None:
        """The V x k codes of a factorisation when they are stored plain (what a row quantiser that
        follows it quantises, keeping the decoder), else None."""
        return None

    def with_codes(self, codes: CompressedEmbedding) -> CompressedEmbedding:
        """The same matrix around new codes (kinds whose plain_codes() is not None)."""
        raise NotImplementedError(f"a {self.kind} module has no codes to replace")

    def decoder_parameters(self) -> list[nn.Parameter]:
        """This module's own decoder, not its parts': what fine-tuning's 'decoder' protocol trains in
        it while the codes stay frozen (a factorisation's decoder and bias); none by default."""
        return []

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
        return {"kind": self.kind, "version": type(self).FORMAT_VERSION, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "scale": self.scale, "method": self.method,
                "out_dtype": str(self.out_dtype).removeprefix("torch.")}

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
    version = vars(cls).get("FORMAT_VERSION")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TypeError(f"compressed module kind {cls.kind!r} ({cls.__name__}) must declare its own FORMAT_VERSION, "
                        "an integer >= 1")
    MODULE_KINDS[cls.kind] = cls
    return cls




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


def check_version(spec: dict[str, Any]) -> None:
    """The spec's format version is one this lmembed reads: a spec without one (saves from before
    versions were written) is version 1; a newer one than the kind's FORMAT_VERSION is refused."""
    kind, version = spec.get("kind"), spec.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise LmembedError(f"compressed module spec of kind {kind!r}: version = {version!r}; expected an integer >= 1")
    supported = MODULE_KINDS[kind].FORMAT_VERSION
    if version > supported:
        raise LmembedError(f"compressed module kind {kind!r} is stored in format version {version}, but lmembed "
                           f"{__version__} reads {kind!r} up to version {supported}: upgrade lmembed to load this save")


def build_module(spec: dict[str, Any]) -> CompressedEmbedding:
    """An empty module of the right kind and shapes, to load saved tensors into."""
    check_spec(spec)
    kind = spec.get("kind")
    if kind not in MODULE_KINDS:
        raise LmembedError(f"unknown compressed module kind {kind!r}: expected one of {', '.join(MODULE_KINDS)}")
    check_version(spec)
    try:
        module = MODULE_KINDS[kind].empty(spec)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise LmembedError(f"compressed module spec of kind {kind!r} is malformed ({type(e).__name__}: {e})") from None
    module.method = str(spec.get("method", ""))
    module.out_dtype = getattr(torch, spec.get("out_dtype", "float32"))
    return module


class Container(CompressedEmbedding):
    """A compressed matrix stored as other compressed modules plus small index maps."""

    def parts(self) -> list[CompressedEmbedding]:
        raise NotImplementedError

    def with_parts(self, parts: list[CompressedEmbedding]) -> Container:
        """The same container around new parts (same shapes in the first dimension)."""
        raise NotImplementedError


def index_dtype(n: int) -> torch.dtype:
    """Smallest dtype that holds ids 0..n-1 (index maps count in stored bytes)."""
    if n <= 1 << 8:
        return torch.uint8
    if n <= 1 << 16:
        return torch.uint16
    return torch.int32
