"""The compiled kernel library: built once per machine into the lmembed cache, trusted only as built.

The library is keyed by its source, flags, compiler and machine (`-march=native`). Beside it a
sidecar records the sha256 and size of the bytes lmembed's own build produced (both files written
atomically). Loading reads the file's bytes once, checks them against the sidecar, and hands the
*checked bytes* to the dynamic loader through an anonymous in-memory file: a library that was
replaced, truncated or edited after it was built is never executed (it is rebuilt, with one note
line on stderr, as common/cache.py does for calibration entries), and a cache file truncated while
the process runs cannot fault it (nothing maps the file).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from ....common.cache import note
from ....common.files import atomic_write_bytes
from .source import FLAGS, SOURCE, SYMBOLS

SOURCE_NAME = "lmembed_kernels.c"  # a fixed relative name: the build is byte-for-byte repeatable


class KernelUnavailable(Exception):
    """The library cannot be used (its message is the one line the user sees)."""


def cache_dir() -> Path:
    env = os.environ.get("LMEMBED_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "lmembed") / "kernels"


def library_path(compiler: str) -> Path:
    """Where the library for this source, flags, compiler and machine lives."""
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, compiler, platform.machine(), platform.node()]).encode())
    return cache_dir() / f"lmembed-kernels-{key.hexdigest()[:16]}.so"


def digest_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _record(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"


def _compile(compiler: str) -> bytes:
    """The library's bytes, compiled in a private temp folder."""
    with tempfile.TemporaryDirectory(prefix="lmembed-kernels-") as tmp:
        Path(tmp, SOURCE_NAME).write_text(SOURCE)
        try:
            subprocess.run([compiler, *FLAGS, SOURCE_NAME, "-o", "lib.so"], cwd=tmp, check=True, capture_output=True,
                           timeout=300)
        except subprocess.CalledProcessError as e:
            err = (e.stderr or b"").decode(errors="replace").strip().splitlines()
            raise KernelUnavailable(f"{compiler} failed: {err[-1] if err else e}") from None
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelUnavailable(f"{compiler} failed: {e}") from None
        return Path(tmp, "lib.so").read_bytes()


def _cached(lib: Path) -> bytes | None:
    """The cached library's bytes when they are the ones lmembed built (else None, warned once)."""
    if not lib.exists():
        return None
    try:
        data, record = lib.read_bytes(), digest_path(lib).read_text()
    except FileNotFoundError:
        record = None
    except OSError as e:
        note(f"cannot read the cached kernel library {lib} ({e}); rebuilding it")
        return None
    if record is None:
        note(f"the cached kernel library {lib} has no recorded digest; rebuilding it")
        return None
    if record != _record(data):
        note(f"the cached kernel library {lib} is not the one lmembed built (its sha256 or size differs from "
             f"{digest_path(lib).name}); rebuilding it")
        return None
    return data


def _store(lib: Path, data: bytes) -> None:
    """Library then digest, each by an atomic rename (a reader that sees the new library with the old
    digest rebuilds rather than trusts it)."""
    try:
        atomic_write_bytes(lib, data)
        atomic_write_bytes(digest_path(lib), _record(data).encode())
    except OSError as e:  # a read-only cache: the library is still used from memory
        note(f"cannot cache the kernel library in {lib.parent} ({e}); using it from memory")


def _open_bytes(data: bytes) -> ctypes.CDLL:
    """dlopen exactly these bytes: from an anonymous memory file, or a private temp file."""
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create("lmembed-kernels", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            return ctypes.CDLL(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="lmembed-kernels-") as tmp:  # mode 0700: only this user
        path = Path(tmp, "lib.so")
        path.write_bytes(data)
        return ctypes.CDLL(str(path))


def _bind(lib: ctypes.CDLL, where: Path) -> ctypes.CDLL:
    missing = [name for name in SYMBOLS if not hasattr(lib, name)]
    if missing:
        raise KernelUnavailable(f"the kernel library {where} lacks {', '.join(missing)}")
    for name, argtypes in SYMBOLS.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return lib


def load(compiler: str) -> ctypes.CDLL:
    """The verified (or freshly built) library, bound; KernelUnavailable when it cannot be had."""
    lib = library_path(compiler)
    data = _cached(lib)
    if data is None:
        data = _compile(compiler)
        _store(lib, data)
    try:
        handle = _open_bytes(data)
    except OSError as e:
        raise KernelUnavailable(f"cannot load the kernel library {lib}: {e}") from None
    return _bind(handle, lib)
