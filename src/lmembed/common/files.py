"""Files lmembed writes and reads: atomic writes, stable JSON, output folders."""

from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LmembedError
from .faults import fault_point


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_with(path: str | Path, write: Callable[[str], None]) -> None:
    """Let `write(tmp)` fill a temp file in the same folder, then rename it over `path`: readers
    see the old file or the new one, never half of one (a crash leaves the old file intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write_with(path, write)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temp file + rename (a crash mid-save keeps the previous checkpoint)."""
    atomic_write_with(path, lambda tmp: torch.save(obj, tmp))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """JSON has no NaN/inf: write them as null so the files stay valid for every parser."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def json_bytes(obj: Any) -> bytes:
    """Stable, diffable JSON: sorted keys, 2-space indent, trailing newline; NaN/inf as null."""
    return (json.dumps(_clean(obj), indent=2, sort_keys=True, default=_json_default) + "\n").encode()


def write_json(path: str | Path, obj: Any) -> None:
    """json_bytes(obj), written atomically."""
    atomic_write_bytes(path, json_bytes(obj))


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmembedError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmembedError(f"{path}: {what} is not valid JSON ({e})") from None


def check_out_dir(out: str | Path, *, force: bool) -> Path:
    """Refuse an output that is a file, or a non-empty folder without --force; changes nothing
    (what --force replaces is replaced later, once the new result is complete)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmembedError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LmembedError(f"{out}: directory is not empty; pass --force to replace what lmembed wrote there")
    return out


def prepare_out_dir(out: str | Path, *, force: bool, owned: tuple[str, ...], resume: bool = False,
                    marker: str = "config.json") -> Path:
    """Make OUT ready for a command that writes the entries `owned` (names or glob patterns).

    Call it once every input is checked: a non-empty folder needs --force (or --resume), and
    --force removes only lmembed's own entries there, never a user's other files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmembedError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if resume:
            return out
        if not force:
            raise LmembedError(f"{out}: directory is not empty; pass --force to replace what lmembed wrote there, "
                               "or --resume to continue")
        remove_owned(out, owned)
    elif resume:
        raise LmembedError(f"{out}: nothing to resume ({marker} not found)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def bench_dir(out: str | Path, *, force: bool, owned: tuple[str, ...]) -> Path:
    """A bench's folder: reused as it is (finished rows are kept and the bench resumes) unless
    --force, which removes only the bench's own entries. Call it once the inputs are checked."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmembedError(f"{out}: exists and is not a directory")
    if force and out.is_dir():
        remove_owned(out, owned)
    out.mkdir(parents=True, exist_ok=True)
    return out


def remove_owned(out: Path, owned: tuple[str, ...]) -> list[str]:
    """Delete the entries of `out` that match `owned` (lmembed's own names and patterns, and
    its temp files); returns what was removed."""
    gone = []
    for entry in sorted(out.iterdir()):
        if any(fnmatch.fnmatchcase(entry.name, pat) for pat in (*owned, ".*.tmp", ".*.lmembed-new-*")):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            gone.append(entry.name)
    return gone


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def publish_dir(tmp: Path, out: Path, owned: set[str]) -> None:
    """Make the complete folder `tmp` the folder `out`. An existing `out` is swapped out in one
    atomic step where the OS allows (else two renames, microseconds apart), so a reader sees the
    old complete result or the new one; then the entries of the old folder that lmembed did not
    write (`owned`: the names lmembed writes there) move into the new one. A user's own files are
    never deleted: after a crash in between, they are in the `.NAME.lmembed-old-*` sibling."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.lmembed-old-", dir=out.parent))
    if _exchange(tmp, out):
        os.rmdir(old)
        os.replace(tmp, old)  # tmp now names the old folder
    else:
        os.rmdir(old)
        os.replace(out, old)
        os.replace(tmp, out)
    fault_point("save:switched")
    for entry in sorted(old.iterdir()):
        if entry.name not in owned and not (out / entry.name).exists():
            os.replace(entry, out / entry.name)
    shutil.rmtree(old, ignore_errors=True)


def staging_dir(out: Path) -> Path:
    """An empty sibling folder of `out` (same filesystem) to build a new result in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.lmembed-new-", dir=out.parent))
