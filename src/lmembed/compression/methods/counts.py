"""Token counts of a target corpus under a model's tokenizer (trimming and GroupReduce need them).

A corpus is a file, a folder (a corpus layout's split, or its *.txt files) or a bundled corpus
name. Here a bundled name means its *train* split: the corpus one trims or weights for is
fitting data, and the held-out split stays free for evaluation. Counts are cached per process
(tokenizer content + files), so a bench that trims several times tokenises the corpus once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...data import bundled
from ...data.corpus import SPLIT_NAMES, find_layout, iter_lines
from ...errors import LmembedError
from ..registry import Arg
from .remap import counting_backend

_CACHE: dict[tuple, CorpusCounts] = {}
CHUNK_CHARS = 1 << 16
BATCH_CHUNKS = 16


@dataclass
class CorpusCounts:
    counts: torch.Tensor  # (V,) int64
    chars: set[str]  # normalised characters of the text (WordPiece alphabet)
    lines: int  # newline characters in the corpus
    files: int

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def split_arg(s: str) -> str:
    if s not in SPLIT_NAMES:
        raise ValueError(f"expected one of {', '.join(SPLIT_NAMES)}")
    return s


# Arguments of the methods that read a target corpus (trim, groupreduce).
SPLIT = Arg("split", split_arg, None, "split of a bundled corpus or corpus folder (default train)")


def corpus_files(spec: str, split: str | None = None) -> tuple[list[Path], str]:
    """(files, encoding) of a target corpus; a bundled name or corpus folder gives `split`
    (default train)."""
    if spec in bundled.REGISTRY:
        entry = bundled.get(spec)
        return entry.files()[split or "train"], entry.encoding
    p = Path(spec).expanduser()
    if p.is_file():
        return [p], "utf-8"
    if p.is_dir():
        try:
            return find_layout(p)[split or "train"], "utf-8"
        except LmembedError:
            txt = sorted(p.glob("*.txt"))
            if txt:
                return txt, "utf-8"
            raise LmembedError(f"corpus {spec!r}: folder has no *.txt files and no corpus layout") from None
    raise LmembedError(f"corpus {spec!r}: no such file or folder, and not a bundled corpus "
                       f"({', '.join(sorted(bundled.REGISTRY))})")


def text_chunks(lines, size: int = CHUNK_CHARS):
    """The text in pieces of about `size` characters, newlines kept (runs of newlines are tokens
    too), cut only before a line that starts with a non-space character, where no tokenizer
    merges across the cut."""
    buf: list[str] = []
    n = 0
    for line in lines:
        if n >= size and line[:1].strip():
            yield "".join(buf)
            buf, n = [], 0
        buf.append(line)
        n += len(line)
    if buf:
        yield "".join(buf)


def _key(backend: Any, files: list[Path], vocab_size: int) -> tuple:
    h = hashlib.sha1(backend.to_str().encode()).hexdigest()
    return h, vocab_size, tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def token_counts(tokenizer: Any, spec: str, vocab_size: int, split: str | None = None) -> CorpusCounts:
    """How often each token id occurs when the tokenizer encodes the corpus as running text
    (newlines kept; no special tokens, no padding)."""
    files, encoding = corpus_files(spec, split)
    backend = counting_backend(tokenizer)  # a clear error for tokenizers that are not HF fast ones
    key = _key(backend, files, vocab_size)
    if key in _CACHE:
        return _CACHE[key]
    counts = torch.zeros(vocab_size, dtype=torch.long)
    raw_chars: set[str] = set()
    n = 0

    def add(chunks: list[str]) -> None:
        for enc in backend.encode_batch(chunks, add_special_tokens=False):
            if enc.ids:
                ids = torch.tensor(enc.ids, dtype=torch.long)
                if int(ids.max()) >= vocab_size:
                    raise LmembedError(f"corpus {spec!r}: the tokenizer produced id {int(ids.max())}, beyond the "
                                       f"model's {vocab_size} embedding rows")
                counts.add_(torch.bincount(ids, minlength=vocab_size))

    batch: list[str] = []
    for f in files:  # files are never joined: a token cannot span two of them
        for chunk in text_chunks(iter_lines([f], encoding)):
            raw_chars.update(chunk)
            n += chunk.count("\n")
            batch.append(chunk)
            if len(batch) >= BATCH_CHUNKS:
                add(batch)
                batch = []
    if batch:
        add(batch)
    norm = backend.normalizer
    chars = set("".join(norm.normalize_str(c) for c in raw_chars)) if norm is not None else raw_chars
    out = CorpusCounts(counts, chars, n, len(files))
    _CACHE[key] = out
    return out
