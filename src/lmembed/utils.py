"""Small shared helpers: atomic file writes, seeding, device choice, JSON."""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import LmembedError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path) -> None:
    """Give the temp file normal permissions (mkstemp makes it 0600) and move it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same directory + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temp file + rename (a crash mid-save keeps the previous checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmembedError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise LmembedError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return torch.device(name)


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


def count_params(module: torch.nn.Module) -> int:
    """Distinct trainable parameters: a tied matrix counts once (module.parameters() de-duplicates),
    frozen ones (the LSTM's constant-zero second bias) do not count."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
