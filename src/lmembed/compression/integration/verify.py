"""What every door that loads a save checks, before and after building anything from it.

A save is a folder (lmembed.compression.integration.io); every loader (``lmembed.load``, the transformers
door in lmembed.compression.integration.quantizer, ``lmembed export``) reads it through here:

1. the manifest, lmembed.json: valid JSON, its own digest right, every field from an allow-list,
   and a complete list of files (the config and the weights at least: a file the load reads
   must be listed);
2. the files: each listed file is there, a regular file, of the recorded size and sha256. They
   are read as one snapshot (``snapshot``): every listed file is opened once, in the folder as
   it was when the manifest was read, and the load reads those open files and nothing else, so
   a file the manifest does not list is never used, and a concurrent ``--force`` re-save gives
   the old model or the new one, never one's manifest with the other's tensors;
3. the tensors: the dtype and shape that each compressed module's kind stores (``check_tensors``),
   then finite values and index maps within range (``check_values``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...common.files import FORMAT1_FILES, json_bytes
from ...errors import LmembedError
from ..formats.base import FLOAT_DTYPES, CompressedEmbedding

MANIFEST, WEIGHTS = "lmembed.json", "model.safetensors"
FORMAT = 2
READABLE_FORMATS = (1, 2)
SHA256 = re.compile(r"[0-9a-f]{64}")
SNAPSHOT_TRIES = 5  # a folder replaced this many times while it is read is given up on
MAX_MANIFEST_BYTES = 1 << 26


# --- 1. the manifest -------------------------------------------------------------------------------
def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its own digest: an edit of any field is caught."""
    return hashlib.sha256(json_bytes({k: v for k, v in manifest.items() if k != "manifest_sha256"})).hexdigest()


def parse_manifest(data: bytes, where: Path) -> dict[str, Any]:
    """lmembed.json's bytes, checked field by field before anything is built from them."""
    import json

    try:
        manifest = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LmembedError(f"{where}: lmembed manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS or not isinstance(
            manifest.get("modules"), list):
        raise LmembedError(f"{where}: not an lmembed manifest of format {FORMAT}")
    if manifest["format"] >= 2 and manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise LmembedError(f"{where}: checksum mismatch (the manifest changed after lmembed wrote it)")
    problem = manifest_problem(manifest)
    if problem:
        raise LmembedError(f"{where}: {problem}")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """lmembed.json of `folder`, checked (see parse_manifest)."""
    where = Path(folder) / MANIFEST
    try:
        with open(where, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise LmembedError(f"{where}: lmembed manifest (is {folder} a folder written by "
                           "lmembed.save?) not found") from None
    except OSError as e:
        raise LmembedError(f"{where}: cannot read the lmembed manifest ({e.strerror or e})") from None
    return parse_manifest(data, where)


def manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's fields, or None."""
    if m.get("model_kind") not in ("transformers", "lmembed"):
        return f"model_kind {m.get('model_kind')!r} is not 'transformers' or 'lmembed'"
    if m.get("layout", "compressed") not in ("compressed", "plain") or m.get("dtype", "float32") not in FLOAT_DTYPES:
        return f"layout {m.get('layout')!r} or dtype {m.get('dtype')!r} is not one lmembed writes"
    for e in m["modules"]:
        if not isinstance(e, dict) or not isinstance(e.get("spec"), dict) or not all(
                isinstance(e.get(k), list) and all(isinstance(p, str) for p in e[k])
                for k in ("input_paths", "head_paths")):
            return "a module entry needs a spec object and lists of module paths"
    aliases, sentinels = m.get("aliases") or {}, m.get("sentinels") or []
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()) or not isinstance(
            sentinels, list) or not all(isinstance(k, str) for k in sentinels):
        return "aliases must map tensor names to tensor names, sentinels list tensor names"
    return _files_problem(m) or _vocab_problem(m.get("vocab"))


def _files_problem(m: dict[str, Any]) -> str | None:
    files = m.get("files") or {}
    if not isinstance(files, dict):
        return "files must map file names to their sha256 and size"
    for name, rec in files.items():
        if Path(name).name != name or name.startswith(".") or not isinstance(rec, dict) or not SHA256.fullmatch(
                str(rec.get("sha256"))) or not isinstance(rec.get("bytes"), int) or isinstance(rec["bytes"], bool):
            return f"files entry {name!r} must be a plain file name with its sha256 and size"
    if m["format"] >= 2:
        missing = [n for n in required_files(m) if n not in files]
        if missing:
            return f"the list of files leaves out {', '.join(missing)} (every file a load reads must be listed)"
    return None


def required_files(m: dict[str, Any]) -> list[str]:
    """The files every load of this manifest reads (a plain layout may shard its weights)."""
    need = ["config.json"]
    if m.get("layout", "compressed") == "compressed":
        need.append(WEIGHTS)
    elif not any(str(n).endswith(".safetensors") for n in m.get("files") or {}):
        need.append(WEIGHTS)
    if m.get("model_kind") == "lmembed":
        need.append("tokenizer.json")
    return need


def _vocab_problem(vocab: Any) -> str | None:
    if vocab is None:
        return None
    kept, n = (vocab.get("kept"), vocab.get("original_vocab")) if isinstance(vocab, dict) else (None, None)
    if not isinstance(n, int) or not isinstance(kept, list) or not all(
            isinstance(i, int) and 0 <= i < n for i in kept):
        return "vocab must hold original_vocab and the kept ids below it"
    return None


def listed_files(manifest: dict[str, Any], present: set[str]) -> list[str]:
    """The files a load may read: those the manifest lists (format 1 had no list: the names lmembed
    wrote then, where present)."""
    if manifest["format"] >= 2:
        return sorted(manifest.get("files") or {})
    return sorted(n for n in FORMAT1_FILES if n in present and n != MANIFEST)


# --- 2. the files, as one snapshot -------------------------------------------------------------------
class _Moved(Exception):
    """The folder was replaced while it was read: read it again."""


def verify_fd(fd: int, path: Path, rec: dict[str, Any] | None) -> os.stat_result:
    """An open listed file: a regular file of the recorded size and sha256."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise LmembedError(f"{path}: not a regular file (lmembed reads saves from regular files only)")
    if rec is None:
        return st
    if st.st_size != rec["bytes"]:
        raise LmembedError(f"{path}: corrupt or truncated {path.suffix.lstrip('.') or 'file'} file "
                           f"({st.st_size} bytes; lmembed wrote {rec['bytes']})")
    h, offset = hashlib.sha256(), 0
    while block := os.pread(fd, 1 << 22, offset):
        h.update(block)
        offset += len(block)
    if h.hexdigest() != rec["sha256"]:
        raise LmembedError(f"{path}: checksum mismatch (the file changed after lmembed wrote it)")
    return st


def verify_files(folder: Path, manifest: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """Every file the manifest lists is there with the recorded size and sha256; returns each
    file's identity (device, inode, mtime) as verified, for a later `unchanged` check."""
    ids = {}
    for name, rec in (manifest.get("files") or {}).items():
        path = Path(folder) / str(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise LmembedError(f"{path}: missing (the lmembed manifest lists it)") from None
        try:
            st = verify_fd(fd, path, rec)
        finally:
            os.close(fd)
        ids[str(name)] = (st.st_dev, st.st_ino, st.st_mtime_ns)
    return ids


def unchanged(folder: Path, ids: dict[str, tuple[int, int, int]]) -> None:
    """Refuse a load whose files were replaced after they were verified (a concurrent re-save)."""
    for name, ident in ids.items():
        try:
            st = os.stat(Path(folder) / name)
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino, st.st_mtime_ns) != ident:
            raise LmembedError(f"{folder}: was replaced while it loaded ({name} changed); load it again")


@contextmanager
def snapshot(folder: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The save at `folder` as one consistent whole: (a private folder holding exactly the files the
    manifest lists, each verified and pinned open, the manifest). Loaders read only from it."""
    folder = Path(folder)
    for _ in range(SNAPSHOT_TRIES):
        try:
            fds, manifest = _pin(folder)
            break
        except _Moved:
            continue
    else:
        raise LmembedError(f"{folder}: was replaced {SNAPSHOT_TRIES} times while it was read; load it again "
                           "once no other process writes it")
    view = Path(tempfile.mkdtemp(prefix="lmembed-snapshot-"))
    try:
        for name, fd in fds.items():
            _expose(fd, view / name)
        yield view, manifest
    finally:
        shutil.rmtree(view, ignore_errors=True)
        for fd in fds.values():
            os.close(fd)


def _pin(folder: Path) -> tuple[dict[str, int], dict[str, Any]]:
    """Open the manifest and every file it lists through one handle on the folder (so all of them
    come from the same folder even if it is swapped meanwhile), and verify them."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise LmembedError(f"{folder / MANIFEST}: lmembed manifest (is {folder} a folder written by "
                           "lmembed.save?) not found") from None
    fds: dict[str, int] = {}
    try:
        manifest = parse_manifest(_read_manifest_at(folder, dir_fd, fds), folder / MANIFEST)
        for name in listed_files(manifest, set(os.listdir(dir_fd))):
            fds[name] = _open_at(folder, dir_fd, name)
            verify_fd(fds[name], folder / name, (manifest.get("files") or {}).get(name))
        return fds, manifest
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        os.close(dir_fd)


def _read_manifest_at(folder: Path, dir_fd: int, fds: dict[str, int]) -> bytes:
    try:
        fds[MANIFEST] = fd = os.open(MANIFEST, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        _check_moved(folder, dir_fd)
        raise LmembedError(f"{folder / MANIFEST}: lmembed manifest (is {folder} a folder written by "
                           "lmembed.save?) not found") from None
    if verify_fd(fd, folder / MANIFEST, None).st_size > MAX_MANIFEST_BYTES:
        raise LmembedError(f"{folder / MANIFEST}: over {MAX_MANIFEST_BYTES} bytes, not a manifest lmembed wrote")
    return read_fd(fd)


def read_fd(fd: int) -> bytes:
    """The whole content of an open regular file."""
    chunks, offset = [], 0
    while block := os.pread(fd, 1 << 22, offset):
        chunks.append(block)
        offset += len(block)
    return b"".join(chunks)


def _open_at(folder: Path, dir_fd: int, name: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        _check_moved(folder, dir_fd)
        raise LmembedError(f"{folder / name}: missing (the lmembed manifest lists it)") from None


def _check_moved(folder: Path, dir_fd: int) -> None:
    """Raise _Moved when `folder` no longer names the directory `dir_fd` holds."""
    try:
        now = os.stat(folder)
    except OSError:
        raise _Moved() from None
    held = os.fstat(dir_fd)
    if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise _Moved()


def _expose(fd: int, path: Path) -> None:
    """`path` reads the open file `fd`: a link to it under /proc (Linux), else a copy."""
    proc = Path(f"/proc/self/fd/{fd}")
    if proc.exists():
        os.symlink(proc, path)
        return
    with open(path, "wb") as out:
        offset = 0
        while block := os.pread(fd, 1 << 22, offset):
            out.write(block)
            offset += len(block)


@contextmanager
def shown_as(view: Path, folder: Path) -> Iterator[None]:
    """Errors raised within name the user's folder, not the snapshot's private one."""
    try:
        yield
    except LmembedError as e:
        raise LmembedError(str(e).replace(str(view), str(folder))) from None


# --- 3. the tensors ---------------------------------------------------------------------------------------
def compressed_roots(model: nn.Module) -> dict[str, CompressedEmbedding]:
    """path -> compressed module, for every outermost compressed module (tied ones at each path)."""
    found: dict[str, CompressedEmbedding] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, CompressedEmbedding) and not any(name.startswith(f"{p}.") for p in found):
            found[name] = m
    return found


def check_tensors(model: nn.Module, shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]], where: str) -> None:
    """Before the tensors are assigned: each one of a compressed module has the dtype and shape its
    kind stores (a bf16 tensor where fp16 scales belong, a reshaped code matrix, are refused).
    `shapes`: name -> (dtype, shape) as the file holds them."""
    for prefix, module in compressed_roots(model).items():
        for key, want in module.state_dict(keep_vars=True).items():
            name = f"{prefix}.{key}" if prefix else key
            if name not in shapes:
                continue  # missing tensors are reported by the assignment itself
            dtype, shape = shapes[name]
            if dtype != want.dtype or tuple(shape) != tuple(want.shape):
                raise LmembedError(f"{where}: tensor {name} is {_show(dtype, shape)}; a {module.kind} module stores "
                                   f"{_show(want.dtype, want.shape)} there")


def check_shapes(model: nn.Module, shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]], where: str) -> None:
    """Every tensor of the file that the model has (outside its compressed modules) has its shape."""
    inside = tuple(f"{p}." for p in compressed_roots(model))
    for name, want in model.state_dict(keep_vars=True).items():
        if name in shapes and not name.startswith(inside) and tuple(shapes[name][1]) != tuple(want.shape):
            raise LmembedError(f"{where}: tensor {name} has shape {list(shapes[name][1])}; the model's is "
                               f"{list(want.shape)}")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool}


def header_shapes(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors header, without reading the tensors; a header
    safetensors refuses (offsets out of the file, overlapping) is one line."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                piece = f.get_slice(k)
                dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise ValueError(f"tensor {k} has dtype {piece.get_dtype()}, not one lmembed writes")
                out[k] = (dtype, tuple(piece.get_shape()))
            return out
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise LmembedError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:160]})") from None


def still_listed(folder: Path) -> set[str]:
    """The files a verified lmembed.json in `folder` lists that are still as it recorded them."""
    try:
        manifest = read_manifest(folder)
    except LmembedError:
        return set()
    kept = set()
    for name, rec in (manifest.get("files") or {}).items():
        try:
            verify_files(folder, {"files": {name: rec}})
        except (LmembedError, OSError):
            continue
        kept.add(str(name))
    return kept


def _show(dtype: torch.dtype, shape: Any) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


def check_values(model: nn.Module, where: str) -> None:
    """After assignment: floating tensors of compressed modules are finite, index maps in range."""
    for prefix, root in compressed_roots(model).items():
        for sub, module in root.named_modules():
            if not isinstance(module, CompressedEmbedding):
                continue
            name = ".".join(p for p in (prefix, sub) if p)
            for key, t in [*module._parameters.items(), *module._buffers.items()]:
                if t is not None and t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                    raise LmembedError(f"{where}: tensor {name}.{key} of the {module.kind} module holds NaN or inf")
            problem = INDEX_CHECKS.get(module.kind, lambda m: None)(module)
            if problem:
                raise LmembedError(f"{where}: the {module.kind} module {name}: {problem}")


def _row_classes(module: Any) -> str | None:
    """mixed / kmixed: every row names one of the parts, each part gets exactly its rows."""
    row_class = getattr(module, "row_class", None)
    if row_class is None:
        return None  # a module that keeps no unpacked map checks its map itself when it loads
    cls = row_class.long()
    parts = len(module.parts)
    if len(cls) and int(cls.max()) >= parts:
        return f"row class {int(cls.max())} names no part (there are {parts})"
    counts = torch.bincount(cls, minlength=parts).tolist()
    want = [p.num_embeddings for p in module.parts]
    return None if counts == want else f"rows per class {counts} do not match the parts' rows {want}"


def _permutation(module: Any) -> str | None:
    """grouped: `order` lists every row exactly once."""
    order = module.order.long()
    if not torch.equal(torch.sort(order).values, torch.arange(len(order), device=order.device)):
        return "its row order is not a permutation of the rows"
    return None


def _kept_ids(module: Any) -> str | None:
    """trimmed: the kept ids are distinct ids of the original vocabulary."""
    kept = module.kept.long()
    if len(kept) and (int(kept.min()) < 0 or int(kept.max()) >= module.original_vocab
                      or len(kept.unique()) != len(kept)):
        return f"its kept ids must be distinct ids below {module.original_vocab}"
    return None


INDEX_CHECKS = {"mixed": _row_classes, "kmixed": _row_classes, "grouped": _permutation, "trimmed": _kept_ids}
