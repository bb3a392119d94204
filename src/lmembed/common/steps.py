"""Long commands made visible: one summary line per step with its time, progress bars on a terminal.

A command runs a few steps that each take seconds to minutes (convert, calibrate, fit, evaluate,
save). Each prints one line when it ends, ``calibrate: 4,096 tokens sampled from the model (46 s)``,
to stderr, so stdout keeps only results. Progress bars (tqdm) show on a terminal by default and
never in a pipe or a log; ``--quiet`` silences both, ``--progress`` / ``--no-progress`` force them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


def bars_wanted(progress: bool | None, quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Whether to draw progress bars: as asked, else only on a terminal (never when quiet)."""
    if quiet:
        return False
    if progress is not None:
        return bool(progress)
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


@contextmanager
def library_bars(show: bool | None = None) -> Iterator[None]:
    """transformers' GGUF conversion draws a bare tqdm bar that none of its switches reach: within
    this block it follows lmembed's rule (on a terminal only, unless `show` says otherwise)."""
    show = bars_wanted(None) if show is None else show
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    if show or gguf_utils is None or not hasattr(gguf_utils, "tqdm"):
        yield
        return
    import functools

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def seconds(s: float) -> str:
    """A duration as people read it: 0.4 s, 12 s, 2 min 05 s."""
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{int(s // 60)} min {int(s % 60):02d} s"


def human_bytes(n: float) -> str:
    """Bytes as people read them: 812 B, 15.9 MB, 1.23 GB (powers of 1000, as file managers show)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 10 * size else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


class Step:
    """What a running step reports when it ends (set `note`; `skip` for a step served from a cache)."""

    def __init__(self, name: str):
        self.name, self.note, self.cached = name, "", False


class Steps:
    """The steps of one command: summary lines and whether bars are drawn."""

    def __init__(self, *, quiet: bool = False, progress: bool | None = None, stream: TextIO | None = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bars = bars_wanted(progress, quiet, self.stream)

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        """Time the block and print `name: note (time)` when it ends (`name: note (cached)` when the
        block marked itself cached)."""
        s, t0 = Step(name), time.perf_counter()
        yield s
        when = "cached" if s.cached else seconds(time.perf_counter() - t0)
        self.say(f"{name}: {s.note} ({when})" if s.note else f"{name} ({when})")
