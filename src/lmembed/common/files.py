"""Files lmembed writes and reads: atomic writes, stable JSON, output folders."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LmembedError


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


def write_json(path: str | Path, obj: Any) -> None:
    """Stable, diffable JSON: sorted keys, 2-space indent, trailing newline, atomic."""
    text = json.dumps(_clean(obj), indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write_bytes(path, text.encode())


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmembedError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmembedError(f"{path}: {what} is not valid JSON ({e})") from None


def prepare_out_dir(out: str | Path, *, force: bool, resume: bool = False, marker: str = "config.json") -> Path:
    """Refuse to write into a non-empty directory unless --force (wipe) or --resume (continue)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmembedError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if resume:
            return out
        if not force:
            raise LmembedError(f"{out}: directory is not empty; pass --force to overwrite or --resume to continue")
        import shutil

        shutil.rmtree(out)
    elif resume:
        raise LmembedError(f"{out}: nothing to resume ({marker} not found)")
    out.mkdir(parents=True, exist_ok=True)
    return out
