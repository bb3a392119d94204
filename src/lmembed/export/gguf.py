"""Compressed token embeddings in GGUF files, the format llama.cpp and its runtimes load.

Two ways in, both writing a new GGUF file in which only the embedding matrices (and, after a
``trim`` stage, the tokenizer metadata) differ: every other tensor and metadata entry is copied
byte for byte.

- ``compress_gguf(src, None, dst, bits=B)`` (``--bits B``): the block type within B bits per
  value of lowest calibrated cost, with calibrated rounding (calibrated_blocks: codes and fp16
  scales chosen for the model's sensitivity, default calibration sampled from the model itself);
  ``gguf_type=T`` without a method rounds into T the same way.
- ``compress_gguf(src, method, dst)``: an lmembed method, whose codes are carried bit for bit
  where a block type holds them:

    lmembed matrix                               block type   values read back
    int8 codes, int grid, groups of 32k / row    Q8_0         exact (the group's scale repeated per block)
    int4 codes, int grid, groups of 32k          Q4_0         exact (levels -7..7 within Q4_0's -8..7)
    int4 codes, half grid, groups of 32k         Q4_1         d*q + m, m = -7.5 d rounded to fp16 (|err| <= 2^-11 |m|)
                                                 Q5_0, Q5_1   exact (the levels doubled, d halved)
    kq4:g32 / kq5:g32, rows of 256k values       Q4_K / Q5_K  exact (the row's super-scale in every 256-block)
    a plain matrix (a trim alone)                any type     F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1, and
                                                              Q2_K..Q6_K for rows of 256k values

Factorisations (svd, ae, wsvd, wae), tc, kmixed, per-row ranks, groupreduce, half-grid int8 and
groups that are not multiples of 32 have no block type (the error points to ``--bits``). int3/int2
codes fit Q4_0 exactly but take its 4.5 bits per value, and a mixed-precision matrix needs one
type for all its widths (int4 + int8: Q8_0), so those are written only when `gguf_type` names
the type.

Only the token matrices are decoded: unless calibration runs the model (a calibrated method,
``calib=``, ``bits=``), the rest of the model is never loaded.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..common.files import real_path
from ..compression.api import MethodSpec, check_method, compress
from ..compression.formats.base import CompressedEmbedding, CompressedHead
from ..compression.formats.bits import unpack_bits
from ..compression.formats.quantized import QuantizedEmbedding
from ..compression.formats.superblock import SUB_BITS, SuperBlockEmbedding
from ..compression.registry import pipeline_text
from ..errors import LmembedError
from .block_fit import encode_matrix
from .blocks import BLOCK_TYPES, BlockType, Coded, check_type, gguf_package, pack, pack_blocks, types_for_row
from .calibrated_blocks import (
    SAMPLE_ROWS,
    budget_types,
    calibrated_rows,
    choose_type,
    damped,
    plain_costs,
    weighted_cost,
)
from .gguf_file import ARRAY, EMBD, INTEGER_TYPES, OUTPUT, STRING, GGUFFile, OutTensor, kv_bytes, write_gguf

# ---------------------------------------------------------------------------------------------
# lmembed's integer codes as blocks


def code_fit(bits: int, grid: str, t: BlockType) -> str | None:
    """How block type `t` holds lmembed's `bits`-bit codes: 'exact', 'rounded' or None.

    int grid levels are integers in [-2**(bits-1), 2**(bits-1)); half-grid levels are odd
    multiples of 1/2, integers once doubled (with the scale halved): `bits + 1` bits. An affine
    type also holds them undoubled with an fp16 offset m = -(2**(bits-1) - 1/2) * d ('rounded')."""
    if not t.bits or t.lut:
        return None
    if (bits if grid == "int" else bits + 1) <= t.bits:
        return "exact"
    return "rounded" if t.affine and grid == "half" and bits <= t.bits else None


def codes_to_blocks(q: QuantizedEmbedding, t: BlockType) -> np.ndarray:
    """The codes and fp16 scales of `q` as blocks of type `t` (see code_fit) -> uint8 rows x bytes."""
    fit = code_fit(q.bits, q.grid, t)
    if fit is None or q.group_size % 32 or q.embedding_dim % 32:
        raise ValueError(f"{t.name} cannot hold int{q.bits} {q.grid}-grid codes in groups of {q.group_size}")
    n = q.embedding_dim
    codes = unpack_bits(q.packed.cpu(), q.bits, n).numpy().astype(np.int32)
    group_of_block = np.arange(n // 32) * 32 // q.group_size
    s = q.scales.cpu().numpy().astype(np.float32)[:, group_of_block]  # rows x blocks
    off = 1 << (q.bits - 1)
    if fit == "rounded":  # half grid, one step per code: x = s*code - (off - 1/2)*s, the offset rounded
        d, stored, m = s, codes, -(off - 0.5) * s
    else:  # integer levels (half grid: doubled, 2*code - 2*off + 1, on the halved scale s/2)
        k = 2 if q.grid == "half" else 1
        d, levels = s / k, k * (codes - off) + (k - 1)
        if t.affine:  # x = d*(level + k*off) - k*off*d, and k*off*d = off*s exactly
            stored, m = levels + k * off, -off * s
        else:  # Q8_0 stores the level itself (int8), Q4_0 / Q5_0 the level + 8 / + 16
            stored, m = levels + (0 if t.bits == 8 else 1 << (t.bits - 1)), None
    m16 = m.astype(np.float16) if t.affine else None
    if not np.isfinite(d.astype(np.float16)).all() or (m16 is not None and not np.isfinite(m16).all()):
        raise LmembedError(f"{t.name}: a scale of the int{q.bits} codes overflows fp16 once offset; write another type")
    return pack_blocks(t, d.astype(np.float16), stored, m16)


# ---------------------------------------------------------------------------------------------
# Which block type an lmembed matrix becomes


PLAIN_NOTE = "a trim-only method keeps the matrix plain, which any of {types} can hold"


def _codes_desc(parts: list[QuantizedEmbedding]) -> str:
    widths = sorted({p.bits for p in parts})
    grids = sorted({p.grid for p in parts})
    groups = sorted({p.group_size for p in parts})
    return (f"int{'/'.join(map(str, widths))} codes ({'/'.join(grids)} grid, groups of "
            f"{'/'.join(map(str, groups))})")


def held_by(parts: list[QuantizedEmbedding], n: int) -> dict[str, str]:
    """Block types that hold every part's codes: name -> 'exact' | 'rounded' (best fit first)."""
    if n % 32 or any(p.group_size % 32 for p in parts):
        return {}
    out = {}
    for name, t in BLOCK_TYPES.items():
        fits = [code_fit(p.bits, p.grid, t) for p in parts]
        if all(fits):
            out[name] = "rounded" if "rounded" in fits else "exact"
    return dict(sorted(out.items(), key=lambda kv: (kv[1] != "exact", BLOCK_TYPES[kv[0]].nbytes)))


def default_type(parts: list[QuantizedEmbedding], n: int) -> str | None:
    """A block type of the codes' own width (Q4_* for int4, Q8_0 for int8), exact if one is, the
    smallest otherwise; None for several widths or a width GGUF has no type for."""
    held = held_by(parts, n)
    widths = {p.bits for p in parts}
    own = [name for name in held if BLOCK_TYPES[name].bits in widths and len(widths) == 1]
    exact = [name for name in own if held[name] == "exact"]
    return (exact or own or [None])[0]


def _unwrap(module: CompressedEmbedding) -> tuple[CompressedEmbedding, np.ndarray | None]:
    """(the matrix inside, kept original ids or None)."""
    inner, kept = module.split_vocabulary()
    return inner, kept.long().cpu().numpy() if kept is not None else None


def _code_parts(module: CompressedEmbedding) -> list[QuantizedEmbedding] | None:
    """The integer-code modules a "codes" kind is stored as (see CompressedEmbedding.gguf_form)."""
    return [part for part, _ in module.gguf_parts()] if module.gguf_form == "codes" else None


def plain_types(n: int) -> str:
    return ", ".join(types_for_row(n))


def resolve_codes(parts: list, n: int, method: str, gguf_type: str | None, what: str = "token_embd") -> tuple[str, str]:
    """(block type, 'exact' | 'rounded') for integer codes (objects with bits, grid, group_size),
    or a one-line LmembedError saying why GGUF cannot hold them and what can."""
    held = held_by(parts, n)
    if gguf_type is not None:
        t = check_type(gguf_type, n, what)
        if t.name not in held:
            fits = ", ".join(f"{k} ({v})" for k, v in held.items()) or "no block type"
            raise LmembedError(f"gguf_type {t.name} cannot hold the {_codes_desc(parts)} of method {method!r}: they "
                               f"fit {fits}; " + PLAIN_NOTE.format(types=plain_types(n)))
        return t.name, held[t.name]
    name = default_type(parts, n)
    if name is not None:
        return name, held[name]
    bits, grid = parts[0].bits, parts[0].grid
    if n % 32 or any(p.group_size % 32 for p in parts):
        why = f"GGUF blocks hold 32 values under one scale and these groups (d = {n}) are not multiples of 32"
    elif len({p.bits for p in parts}) > 1:
        why = "a GGUF tensor has one block type, not one per width"
    elif held:
        why = f"GGUF has no {bits}-bit block type"
    else:
        why = f"no GGUF block type holds {bits}-bit {grid}-grid levels (use grid=int)"
    alt = (f"they fit {', '.join(f'{k} ({v})' for k, v in held.items())}: pass gguf_type to use one" if held
           else PLAIN_NOTE.format(types=plain_types(n)))
    raise LmembedError(f"method {method!r} gives {_codes_desc(parts)}: {why}; {alt}")


def resolve_type(module: CompressedEmbedding, method: str, gguf_type: str | None, source_type: str,
                 what: str = "token_embd") -> tuple[str, str]:
    """(block type, how: 'exact' | 'rounded' | 'copied' | 'requantised') for a compressed matrix.
    A plain matrix keeps the source tensor's type unless `gguf_type` names another."""
    inner, _ = _unwrap(module)
    n = inner.embedding_dim
    if inner.gguf_form == "plain":
        if gguf_type is None or gguf_type == source_type:
            return source_type, "copied"  # rows gathered as stored: works for any type the source has
        return check_type(gguf_type, n, what).name, "requantised"
    if inner.gguf_form == "superblock":
        kind = superblock_type(inner.bits, inner.group_size, n, method, what)
        if gguf_type is not None and gguf_type != kind:
            raise LmembedError(f"gguf_type {gguf_type}: the super-blocks of method {method!r} fit {kind} (exact); "
                               + BITS_NOTE)
        return kind, "exact"
    parts = _code_parts(inner)
    if parts is None:
        raise LmembedError(f"method {method!r} stores {what} as a {inner.kind} matrix, which no GGUF block type "
                           "holds; " + BITS_NOTE)
    return resolve_codes(parts, n, method, gguf_type, what)


BITS_NOTE = ("for a .gguf output use --bits B (bits=B), which picks the block type of lowest calibrated cost within "
             "B bits per value and rounds into it for the model, or --gguf-type T without --method")


def superblock_type(bits: int, group: int, n: int, method: str, what: str = "token_embd") -> str:
    """The K-quant that holds kq codes exactly (kq4:g32 -> Q4_K, kq5:g32 -> Q5_K, rows of 256k
    values), or a one-line error."""
    kind = {4: "Q4_K", 5: "Q5_K"}.get(bits)
    if kind is None or group != 32:
        raise LmembedError(f"method {method!r}: only kq4:g32 and kq5:g32 super-blocks are GGUF block types (Q4_K, "
                           "Q5_K); " + BITS_NOTE)
    if n % 256:
        raise LmembedError(f"method {method!r}: {kind} blocks hold 256 values and {what} rows have {n}; "
                           + BITS_NOTE)
    return kind


def superblock_blocks(module: SuperBlockEmbedding, kind: str) -> np.ndarray:
    """kq codes as K-quant blocks: the row's fp16 super-scale and super-min in every 256-value
    block, the 6-bit sub-scales and sub-mins and the codes as they are."""
    v, n, g = module.num_embeddings, module.embedding_dim, module.groups
    q = unpack_bits(module.codes.cpu(), module.bits, n).to(torch.int16)
    sub = unpack_bits(module.subs.cpu(), SUB_BITS, 2 * g).to(torch.int16)
    sup = module.supers.cpu().float()
    blocks = n // 256
    return pack(Coded(BLOCK_TYPES[kind], q, sup[:, :1].expand(v, blocks).contiguous(),
                      sup[:, 1:].expand(v, blocks).contiguous(), sub[:, :g], sub[:, g:]))


def encode_module(module: CompressedEmbedding, type_name: str, source: np.ndarray | None = None) -> np.ndarray:
    """A compressed matrix (as compress() leaves it) in block type `type_name` -> uint8 rows x bytes.

    source: the stored rows of the original tensor (uint8 rows x bytes), given when `type_name`
    is its type: a plain matrix is then gathered row by row, nothing rounded again."""
    inner, kept = _unwrap(module)
    if inner.gguf_form == "plain":
        if source is not None:
            return np.ascontiguousarray(source[kept] if kept is not None else source)
        return encode_matrix(inner.dense(), type_name)
    if inner.gguf_form == "superblock":
        return superblock_blocks(inner, type_name)
    parts, t = _code_parts(inner), BLOCK_TYPES.get(type_name)
    if parts is None or t is None:
        raise LmembedError(f"a {inner.kind} matrix has no GGUF block type {type_name}")
    placed = inner.gguf_parts()
    if len(placed) == 1 and placed[0][1] is None:
        return codes_to_blocks(placed[0][0], t)
    out = np.empty((inner.num_embeddings, t.row_bytes(inner.embedding_dim)), dtype=np.uint8)
    for part, rows in placed:  # every width in the one type, rows back in place
        if part.num_embeddings:
            out[rows.cpu().numpy()] = codes_to_blocks(part, t)
    return out


def method_precheck(method: MethodSpec, vocab: int, n: int, gguf_type: str | None) -> list:
    """The parsed pipeline; fails fast, before loading or fitting anything, when no block type can
    hold what it will produce (the fitted matrix is checked again before writing)."""
    stages = check_method(method, vocab, n)  # parses, and checks the groups, ranks, corpus... fit the matrix
    text = pipeline_text(stages)
    rest = stages[1:] if stages[0].vocabulary else list(stages)
    while len(rest) > 1 and rest[-1].keeps_form:  # tunes scales in place: codes stay codes
        rest = rest[:-1]
    if gguf_type is not None:
        check_type(gguf_type, n)
    if not rest:
        return stages
    first = rest[0]
    if len(rest) == 1 and first.gguf_form == "superblock":
        kind = superblock_type(first.bits, first.group, n, text)
        if gguf_type is not None and gguf_type != kind:
            raise LmembedError(f"gguf_type {gguf_type}: the super-blocks of method {text!r} fit {kind} (exact); "
                               + BITS_NOTE)
        return stages
    if len(rest) > 1 or first.gguf_form != "codes":
        raise LmembedError(f"method {text!r} stores token_embd in a form no GGUF block type holds; " + BITS_NOTE)
    group = first.group or n
    parts = [SimpleNamespace(bits=b, grid=first.grid, group_size=group) for b in first.code_widths()]
    if gguf_type is not None or len(parts) == 1 or group % 32 or n % 32:  # mixed may end up with one width
        resolve_codes(parts, n, text, gguf_type)
    return stages


# ---------------------------------------------------------------------------------------------
# A trimmed vocabulary in the tokenizer metadata

TOKEN_ID_KEY = re.compile(r"^tokenizer\.ggml\.\w+_token_ids?$")


def trimmed_metadata(f: GGUFFile, kept: np.ndarray, log: Callable[[str], None]) -> dict[str, bytes | None]:
    """New bytes (None: drop the entry) for what a vocabulary trim changes: tokens, token types,
    scores, merges (kept when both parts and the result are kept, in order), every special token
    id, <arch>.vocab_size. New id = position of the old id in `kept` (sorted)."""
    out: dict[str, bytes | None] = {}
    key = "tokenizer.ggml.tokens"
    tokens = f.value(key)
    if not isinstance(tokens, list) or len(kept) and int(kept.max()) >= len(tokens):
        raise LmembedError(f"{f.what} {f.path}: {key} does not list the {int(kept.max()) + 1}+ tokens trimming kept")
    new_tokens = [tokens[i] for i in kept]
    out[key] = kv_bytes(key, ARRAY, new_tokens, STRING)
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        e = f.entries.get(key)
        if e is not None and e.vtype == ARRAY and e.count == len(tokens):
            out[key] = kv_bytes(key, ARRAY, f.value(key)[kept], e.sub_type)
    key = "tokenizer.ggml.merges"
    if key in f.entries:
        have = set(new_tokens)
        merges = [m for m in f.value(key)
                  if len(p := m.split(" ")) == 2 and p[0] in have and p[1] in have and p[0] + p[1] in have]
        out[key] = kv_bytes(key, ARRAY, merges, STRING)
    new_id = {int(o): i for i, o in enumerate(kept)}
    for key, e in f.entries.items():
        if not TOKEN_ID_KEY.match(key):
            continue
        if e.vtype == ARRAY and e.sub_type in INTEGER_TYPES:
            out[key] = kv_bytes(key, ARRAY, [new_id[int(i)] for i in f.value(key) if int(i) in new_id], e.sub_type)
        elif e.vtype in INTEGER_TYPES:
            old = int(f.value(key))
            if old in new_id:
                out[key] = kv_bytes(key, e.vtype, new_id[old])
            else:
                log(f"{key}: token {old} was dropped by trimming; entry removed")
                out[key] = None
    key = f"{f.value('general.architecture', '')}.vocab_size"
    if key in f.entries and f.entries[key].vtype in INTEGER_TYPES:
        out[key] = kv_bytes(key, f.entries[key].vtype, len(kept))
    return out


# ---------------------------------------------------------------------------------------------
# compress_gguf


class GGUFEmbeddings(nn.Module):
    """Only the token matrices of a GGUF model, laid out as transformers models are (an input
    embedding, an output layer tied to it unless the file has its own): what compress() needs
    when no stage runs the model."""

    def __init__(self, embed: np.ndarray, head: np.ndarray | None, config: SimpleNamespace):
        super().__init__()
        v, d = embed.shape
        self.embed_tokens = nn.Embedding(v, d, _weight=torch.from_numpy(embed))
        self.lm_head = nn.Linear(d, v, bias=False)
        self.lm_head.weight = self.embed_tokens.weight if head is None else nn.Parameter(torch.from_numpy(head))
        self.config = config

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def _light_config(f: GGUFFile, vocab: int) -> SimpleNamespace:
    """The token ids transformers' GGUF loader puts in the model config (trimming keeps them)."""
    ids = {}
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        e = f.entries.get(f"tokenizer.ggml.{key}_token_id")
        if e is not None and e.vtype in INTEGER_TYPES:
            ids[name] = int(f.value(e.key))
    return SimpleNamespace(vocab_size=vocab, **ids)


def _load_tokenizer(src: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, trust_remote_code=False)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise LmembedError(f"src {src}: transformers cannot build its tokenizer ({str(e).splitlines()[0][:160]}); "
                           "a trim stage needs it") from None


def _load_model(src: Path):
    from ..models.pretrained import load_pretrained

    try:
        return load_pretrained(str(src), task="causal-lm")
    except (ValueError, KeyError, ImportError) as e:
        raise LmembedError(f"src {src}: transformers cannot load this GGUF model ({str(e).splitlines()[0][:160]}); "
                           "calibrated methods run the model") from None


def _check_dst(src: Path, dst: Path, force: bool) -> None:
    if dst.is_symlink() and not dst.exists():
        raise LmembedError(f"dst {dst}: is a link to {os.readlink(dst)}, which does not exist")
    if dst.exists() and dst.resolve() == src.resolve():
        raise LmembedError(f"dst {dst}: is the source file; write the compressed model to a new file")
    if dst.is_dir():
        raise LmembedError(f"dst {dst}: is a folder; give the path of the .gguf file to write")
    if dst.exists() and not force:
        raise LmembedError(f"dst {dst}: already exists; pass force=True (--force) to replace it")
    if not dst.parent.is_dir():
        raise LmembedError(f"dst {dst}: folder {dst.parent} does not exist")


def _check_trimmable(f: GGUFFile, vocab: int) -> None:
    others = [t.name for t in f.tensors if t.name not in (EMBD, OUTPUT) and vocab in t.shape]
    if others:
        raise LmembedError(f"src {f.path}: tensor {others[0]} has a vocabulary-sized dimension that lmembed does not "
                           "know how to trim")
    if not isinstance(f.value("tokenizer.ggml.tokens"), list):
        raise LmembedError(f"src {f.path}: no tokenizer.ggml.tokens in its metadata, so a trim cannot be written")


def compress_gguf(src: str | os.PathLike, method: MethodSpec | None, dst: str | os.PathLike, *,
                  gguf_type: str | None = None, bits: float | None = None, calib: Any = None,
                  calibrate: bool = True, calib_tokens: int | None = None, seed: int = 0, force: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compress the token embeddings of the GGUF model `src` and write `dst`.

    With `bits` (and no method): the block type within `bits` per value of lowest calibrated cost,
    with calibrated rounding (see the module docstring); `gguf_type` (with `bits` or alone, without
    a method): calibrated rounding into that type; `calibrate=False`: no model run, plain squared
    error instead. With a `method`: int8 / int4 codes become Q8_0 / Q4_0 / Q4_1 blocks, carried bit
    for bit; a plain matrix (a trim alone) keeps the source's block type or takes
    `gguf_type`, which may also pick another type that holds the codes (int3 codes in Q4_0, ...).
    A first ``trim:CORPUS`` stage also rewrites the tokenizer metadata. Every other tensor and
    metadata entry is copied byte for byte. `calib` / `calib_tokens` feed calibration (the model
    is then loaded by transformers and run). Everything is checked before anything is written;
    `dst` is written to a temporary file in its folder that replaces it at the end. Returns a report.
    """
    t0 = time.perf_counter()
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    f = GGUFFile(src)
    embd = f.matrix(EMBD)
    d, vocab = embd.shape
    head = f.matrix(OUTPUT, required=False)  # an untied head is checked too, before any work
    _check_dst(src, dst, force)
    for tensor in (embd, head) if head is not None else (embd,):
        f.check_finite(tensor)
    if method is None or bits is not None:
        return _calibrated_gguf(f, dst, method, gguf_type, bits, dict(
            calib=calib, calibrate=calibrate, calib_tokens=calib_tokens, seed=seed, log=log), t0)
    stages = method_precheck(method, vocab, d, gguf_type)
    text = pipeline_text(stages)
    trims = stages[0].vocabulary
    if trims:
        _check_trimmable(f, vocab)
    calibrated = any(s.needs_calib for s in stages)

    report, matrices = _fit(f, src, stages, calibrated or calib is not None, trims, dict(
        calib=calib, seed=seed, device="cpu", log=log, calib_tokens=calib_tokens))
    new, rows = {}, []
    for tensor, module in matrices:  # encoded and measured against lmembed's matrix before writing
        new[tensor.name], row = _encode(f, tensor, module, text, gguf_type)
        rows.append(row)
        log(f"{tensor.name}: {row['type_before']} {row['shape_before']} -> {row['type_after']} {row['shape_after']} "
            f"({row['how']}; max |error| against lmembed's matrix {row['max_abs_error']:.3g})")
    kv_new = trimmed_metadata(f, _unwrap(matrices[0][1])[1], log) if trims else {}
    _write(f, dst, new, kv_new)
    result = {"method": text, "exact": all(r["exact"] for r in rows), **_summary(f, dst, rows, t0),
              "max_abs_error": max(r["max_abs_error"] for r in rows), "compress": report}
    log(f"wrote {dst} ({result['file_bytes_after']:,} bytes; embedding matrices {result['bytes_before']:,} -> "
        f"{result['bytes_after']:,} bytes, x{result['ratio']:.2f})")
    return result


def _write(f: GGUFFile, dst: Path, new: dict[str, OutTensor], kv_new: dict[str, bytes | None]) -> None:
    """The source file with the `new` tensors and metadata entries (None: dropped), through a
    temporary file in the folder of dst's real path that replaces it (only once complete)."""
    kv = [kv_new[k] if k in kv_new else f.raw(k) for k in f.entries if kv_new.get(k, b"") is not None]
    tensors = [new.get(t.name) or OutTensor(t.name, t.shape, t.ggml, f.stored(t)) for t in f.tensors]
    real = real_path(dst)  # a link is written through: its target is replaced, the link stays a link
    tmp = real.with_name(f".{real.name}.tmp{os.getpid()}")
    try:
        write_gguf(tmp, f.version, f.alignment, kv, tensors)
        os.replace(tmp, real)
    finally:
        tmp.unlink(missing_ok=True)


def _summary(f: GGUFFile, dst: Path, rows: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    before, after = sum(r["bytes_before"] for r in rows), sum(r["bytes_after"] for r in rows)
    return {"src": str(f.path), "dst": str(dst), "block_types": [r["type_after"] for r in rows],
            "bytes_before": before, "bytes_after": after, "ratio": before / after,
            "vocab_before": rows[0]["shape_before"][0], "vocab_after": rows[0]["shape_after"][0],
            "file_bytes_before": f.path.stat().st_size, "file_bytes_after": dst.stat().st_size, "tensors": rows,
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# Calibrated block types: bits=B / gguf_type=T without a method


def _check_budget(n: int, method: MethodSpec | None, gguf_type: str | None, bits: float | None) -> None:
    """The arguments of a calibrated GGUF output, checked before the model loads."""
    if method is not None:
        raise LmembedError("bits: picks the block type and rounds the token matrices itself; give a method or bits, "
                           "not both (to trim too, trim first, then pass --bits on the trimmed .gguf)")
    if gguf_type is None and bits is None:
        raise LmembedError("compress_gguf: give a method, bits=B (--bits B) or gguf_type=T (--gguf-type T)")
    within = budget_types(n, bits) if bits is not None else None
    if gguf_type is not None:
        t = check_type(gguf_type, n)
        if within is not None and t.name not in within:
            raise LmembedError(f"gguf_type {t.name} stores {t.bits_per_value:g} bits per value, more than bits "
                               f"{bits:g}; within it: {', '.join(within)}")


def _calibration(src: Path, calib: Any, calib_tokens: int | None, seed: int, log: Callable[[str], None]):
    """Statistics of the GGUF model run by transformers: the given calibration, or the default
    (text sampled from the model itself)."""
    from ..compression.calibration.calibrate import calibrate, default_source

    log(f"{src.name}: loading the whole model with transformers (calibration runs it)")
    model, tokenizer = _load_model(src)
    t0 = time.perf_counter()
    source = calib if calib is not None else default_source(model, tokenizer)
    stats = calibrate(model, source, tokenizer=tokenizer, tokens=calib_tokens, seed=seed)
    log(f"calibrated on {stats.tokens} tokens of {stats.source} ({time.perf_counter() - t0:.0f} s)")
    return stats


def _calibrated_gguf(f: GGUFFile, dst: Path, method: MethodSpec | None, gguf_type: str | None,
                     bits: float | None, kw: dict[str, Any], t0: float) -> dict[str, Any]:
    log = kw["log"]
    embd, head = f.matrix(EMBD), f.matrix(OUTPUT, required=False)
    _check_budget(embd.shape[0], method, gguf_type, bits)
    stats = _calibration(f.path, kw["calib"], kw["calib_tokens"], kw["seed"], log) if kw["calibrate"] else None
    tensors = [embd] if head is None else [embd, head]
    new, rows = {}, []
    for tensor in tensors:
        side = "tied" if head is None else ("input" if tensor is embd else "output")
        new[tensor.name], row = _round_tensor(f, tensor, side, stats, gguf_type, bits, kw["seed"], log)
        rows.append(row)
    _write(f, dst, new, {})
    how = "calibrated" if stats is not None else "plain"
    result = {"method": f"{how} block type within {bits:g} bits" if gguf_type is None else f"{how} {gguf_type}",
              "bits": bits, **_summary(f, dst, rows, t0),
              "calibration": None if stats is None else {"source": stats.source, "tokens": stats.tokens}}
    log(f"wrote {dst} ({result['file_bytes_after']:,} bytes; embedding matrices {result['bytes_before']:,} -> "
        f"{result['bytes_after']:,} bytes, x{result['ratio']:.2f})")
    return result


def _round_tensor(f: GGUFFile, tensor: Any, side: str, stats: Any, gguf_type: str | None, bits: float | None,
                  seed: int, log: Callable[[str], None]) -> tuple[OutTensor, dict[str, Any]]:
    """One matrix in its calibrated block type (the source's own rows copied when it is that type);
    without statistics, plain squared error and equal rows."""
    x = f.decode(tensor)
    v, n = x.shape
    metric, weights = _sensitivity(stats, side, v, n, tensor.name)
    candidates: dict[str, float] = {}
    kind = gguf_type
    if kind is None:
        kind, candidates = choose_type(x, weights, metric, bits, source_type=tensor.type_name, seed=seed)
        log(f"{tensor.name}: calibrated cost per type within {bits:g} bits ({SAMPLE_ROWS} rows): "
            + ", ".join(f"{k} {c:.4g}" for k, c in candidates.items()) + f"; {kind} chosen")
    t = BLOCK_TYPES[kind]
    if kind == tensor.type_name:
        data, cost, plain, how = np.asarray(f.stored(tensor)), 0.0, 0.0, "copied"
    else:
        t1 = time.perf_counter()
        data, costs = calibrated_rows(x, kind, metric, progress=_progress(log, tensor.name, kind, v))
        cost = weighted_cost(costs, weights)
        plain = weighted_cost(plain_costs(x, kind, metric), weights) if t.integer else cost
        how = "calibrated" if stats is not None else "plain"
        log(f"{tensor.name}: {kind} calibrated cost {cost:.4g} (reference rounding {plain:.4g}, "
            f"x{cost / max(plain, 1e-300):.3f}; {time.perf_counter() - t1:.0f} s)")
    back = OutTensor(tensor.name, (n, v), tensor.ggml if how == "copied" else t.ggml, data)
    err = max_error(back, x)
    return back, {"name": tensor.name, "side": side, "type_before": tensor.type_name, "type_after": kind, "how": how,
                  "cost": cost, "cost_reference": plain, "candidates": candidates, "max_abs_error": err,
                  "shape_before": [v, n], "shape_after": [v, n], "bytes_before": tensor.nbytes,
                  "bytes_after": int(data.nbytes)}


def _sensitivity(stats: Any, side: str, v: int, n: int, name: str) -> tuple[torch.Tensor, np.ndarray]:
    """(the damped column metric, row weights) the rounding and the type choice use."""
    from ..compression.calibration.sensitivity import INPUT_WEIGHT, sensitivity
    from ..compression.methods.calibrated import FLOOR

    if stats is None:
        return torch.eye(n, dtype=torch.float64), np.ones(v)
    if stats.dim != n or len(stats.in_freq) != v:
        raise LmembedError(f"calibration statistics are for a {len(stats.in_freq)} x {stats.dim} matrix, "
                           f"{name} is {v} x {n}")
    metric = damped(sensitivity(stats, side, INPUT_WEIGHT))
    return metric, stats.row_weights(side, mix=1.0, floor=FLOOR.default).numpy()


def _progress(log: Callable[[str], None], name: str, kind: str, total: int) -> Callable[[int], None]:
    marks = iter(range(1, 11))
    nxt = [next(marks)]

    def report(done: int) -> None:
        if done * 10 >= nxt[0] * total:
            log(f"{name}: {kind} rounding {done:,} / {total:,} rows")
            nxt[0] = next(marks, 11)
    return report


def _fit(f: GGUFFile, src: Path, stages: list, whole_model: bool, trims: bool, kw: dict[str, Any]
         ) -> tuple[dict[str, Any], list]:
    """lmembed.compress on the whole model when a stage runs it (calibration), else on the token
    matrices alone; returns its report and (GGUF tensor, compressed module) pairs."""
    embd, head = f.matrix(EMBD), f.matrix(OUTPUT, required=False)
    if whole_model:
        kw["log"](f"{src.name}: loading the whole model with transformers (calibration runs it)")
        model, tokenizer = _load_model(src)
    else:
        light = _light_config(f, embd.shape[1])
        model = GGUFEmbeddings(f.decode(embd), f.decode(head) if head is not None else None, light)
        tokenizer = _load_tokenizer(src) if trims else None
    report = compress(model, stages, tokenizer=tokenizer, **kw)
    report.pop("tokenizer", None)
    matrices = [(embd, model.get_input_embeddings())]
    if head is not None:
        out_layer = model.get_output_embeddings()
        if not isinstance(out_layer, CompressedHead):
            raise LmembedError(f"src {src}: its output layer ({OUTPUT}) was left uncompressed")
        matrices.append((head, out_layer.embedding))
    return report, matrices


def _encode(f: GGUFFile, tensor: Any, module: CompressedEmbedding, text: str, gguf_type: str | None
            ) -> tuple[OutTensor, dict[str, Any]]:
    """The tensor's new blocks, and its report row (types, shapes, bytes, max error)."""
    source_type = tensor.type_name
    chosen, how = resolve_type(module, text, gguf_type, source_type, tensor.name.split(".")[0])
    data = encode_module(module, chosen, np.asarray(f.stored(tensor)) if how == "copied" else None)
    ggml = tensor.ggml if how == "copied" else BLOCK_TYPES[chosen].ggml
    n = module.embedding_dim
    back = OutTensor(tensor.name, (n, data.shape[0]), ggml, data)
    err = max_error(back, module)
    return back, {"name": tensor.name, "type_before": source_type, "type_after": chosen, "how": how,
                  "exact": err == 0.0, "max_abs_error": err, "shape_before": [tensor.shape[1], tensor.shape[0]],
                  "shape_after": [int(data.shape[0]), n], "bytes_before": tensor.nbytes,
                  "bytes_after": int(data.nbytes)}


def max_error(t: OutTensor, want: CompressedEmbedding | np.ndarray, chunk: int = 16384) -> float:
    """max |decoded rows of `t` (the gguf package's decoder) - the wanted rows| (lmembed's matrix
    or a float array), a chunk of rows at a time (bounded memory)."""
    gguf, err = gguf_package(), 0.0
    for s in range(0, t.data.shape[0], chunk):
        got = gguf.quants.dequantize(np.ascontiguousarray(t.data[s: s + chunk]), gguf.GGMLQuantizationType(t.ggml))
        rows = (want[s: s + chunk] if isinstance(want, np.ndarray) else
                want.lookup(torch.arange(s, min(s + chunk, t.data.shape[0]))).detach().float().cpu().numpy())
        err = max(err, float(np.abs(np.asarray(got, dtype=np.float32).reshape(rows.shape) - rows).max()))
    return err
