"""Verified cache entries: what lmembed computes once and reuses (calibration statistics, the fp32
conversion of a bundled GGUF model) is never trusted as it lies on disk.

Each entry records a digest of its inputs (what it was computed from) and of its content (what
was written). A reader recomputes the entry, with one line on stderr saying why, when either does
not match: an edited statistic, flipped bytes, a truncated or missing file, an entry copied under
another key. A cache that cannot be written (a read-only folder, a full disk) is one line too,
and the result is used without caching.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import sha256_file


def content_hash(t: torch.Tensor) -> str:
    """sha1 of a tensor's values, read in place (no copy of a float32 CPU tensor)."""
    a = t.detach().float().cpu().contiguous().numpy()
    return hashlib.sha1(np.ascontiguousarray(a).view(np.uint8).data).hexdigest()


def note(message: str) -> None:
    """One line on stderr about a cache (never an error: the result is recomputed or not cached)."""
    print(f"lmembed: note: {message}", file=sys.stderr)


def content_digest(obj: Any) -> str:
    """sha256 of a nest of dicts, lists, tensors and scalars, independent of how it was serialised."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{list(t.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"dict:{len(obj)}:".encode())
        for k in sorted(obj, key=str):
            h.update(f"{k!s}=".encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"list:{len(obj)}:".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def files_record(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> sha256 and size of files in `folder` (what a folder entry's content is)."""
    return {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size} for n in names}


def files_problem(folder: Path, record: Any) -> str | None:
    """Why the files of a folder entry are not the ones its record lists, or None."""
    if not isinstance(record, dict) or not record:
        return "it records no files"
    for name, rec in record.items():
        path = folder / str(name)
        if not isinstance(rec, dict) or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != rec.get("bytes"):
            return f"{name} is {path.stat().st_size} bytes, not the {rec.get('bytes')} it was written with"
        if sha256_file(path) != rec.get("sha256"):
            return f"{name} changed after it was written"
    return None
