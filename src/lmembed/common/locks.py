"""One writer per output folder: an exclusive lock held for the whole command.

Two `lmembed train ... --out R` at once would mix one run's checkpoint with the other's config;
two saves to one folder would each print "saved" while one result is lost. The lock is a file in
lmembed's cache named after the folder's real path (links and '..' resolved, so `x`,
`sub/../x` and a link to x are one folder; outside the folder, so a save that swaps the folder in
keeps it, and nothing is left beside a user's files), taken with flock: the OS drops it when the
process dies, so a killed run never leaves the folder locked. Its content names the holder, for
the error the second process gets. Whoever takes the lock first removes what killed writers of
that folder left beside it (lmembed.common.files.clean_leftovers): no other writer can be alive.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..errors import LmembedError
from .files import clean_leftovers, real_path

F = TypeVar("F", bound=Callable[..., Any])


def lock_path(out: Path) -> Path:
    env = os.environ.get("LMEMBED_CACHE")
    root = (Path(env) if env else Path.home() / ".cache" / "lmembed") / "locks"
    return root / (hashlib.sha1(str(real_path(out)).encode()).hexdigest()[:24] + ".lock")


@contextmanager
def locked(out: str | Path, what: str = "output folder") -> Iterator[None]:
    """Hold the exclusive lock of `out` for the block; a clear error if another process has it.
    Re-entrant within one process (a command that saves into the folder it already locked)."""
    path = lock_path(Path(out))
    if path in _held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise LmembedError(f"{out}: {what} is in use by {holder}; wait for it to finish or choose another "
                               "folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}".encode(), 0)
        _held.add(path)
        try:
            clean_leftovers(out)
            yield
        finally:
            _held.discard(path)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_held: set[Path] = set()


def holds_lock(what: str = "output folder") -> Callable[[F], F]:
    """Decorator: the function holds the lock of its `out` argument while it runs."""
    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with locked(sig.bind_partial(*args, **kwargs).arguments["out"], what):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
