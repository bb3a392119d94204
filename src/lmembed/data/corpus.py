"""Corpora as train/valid/test token-id streams, cached as memory-mapped int32 files.

Sources: a bundled name (see ``bundled.py``), or a directory in one of the usual layouts
(PTB ``ptb.{split}.txt``, WikiText ``wiki.{split}.tokens`` / ``.raw``, or ``{split}.txt``).
Token ids are written once to ``.lmembed-cache/<key>/`` next to the data (or to the user cache
when that folder is read-only) and memory-mapped afterwards, so a 100M-token corpus never sits
in Python lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from ..common.files import current_umask, read_json, write_json
from ..errors import LmembedError
from . import bundled
from .bundled import PLAIN, TextOptions
from .vocab import BPETokenizer, Tokenizer, WordTokenizer, load_tokenizer, save_tokenizer

SPLIT_NAMES = ("train", "valid", "test")
LAYOUTS = {  # name -> filename pattern per split
    "ptb": "ptb.{}.txt",
    "wikitext": "wiki.{}.tokens",
    "wikitext-raw": "wiki.{}.raw",
    "plain": "{}.txt",
}
CACHE_VERSION = 1
ID_DTYPE = np.int32
PROGRESS_MIN_BYTES = 20_000_000  # tokenising less text than this takes seconds: no progress bar


@dataclass
class Corpus:
    """Token streams of the three splits plus the tokenizer that made them."""

    name: str
    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]
    files: dict[str, list[Path]] = field(default_factory=dict)
    cache_dir: Path | None = None

    @property
    def train(self) -> np.ndarray:
        return self.splits["train"]

    @property
    def valid(self) -> np.ndarray:
        return self.splits["valid"]

    @property
    def test(self) -> np.ndarray:
        return self.splits["test"]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> np.ndarray:
        if name not in self.splits:
            raise LmembedError(f"--split {name}: expected one of {', '.join(self.splits)}")
        return self.splits[name]

    def stats(self) -> dict:
        out: dict = {"name": self.name, "vocab_size": self.vocab_size, "tokenizer": self.tokenizer.kind}
        unk = self.tokenizer.unk_id
        for s, ids in self.splits.items():
            out[f"{s}_tokens"] = int(len(ids))
            if unk is not None:
                out[f"{s}_unk_rate"] = float(np.count_nonzero(np.asarray(ids) == unk) / max(len(ids), 1))
        return out


def find_layout(root: Path) -> dict[str, list[Path]]:
    """Split files of a corpus directory; the layout is chosen by which train file exists."""
    if not root.exists():
        raise LmembedError(f"{root}: corpus directory not found (and not a bundled corpus name: "
                           f"{', '.join(sorted(bundled.REGISTRY))})")
    if not root.is_dir():
        raise LmembedError(f"{root}: expected a corpus directory or a bundled corpus name")
    for name, pattern in LAYOUTS.items():
        if (root / pattern.format("train")).exists():
            files = {s: root / pattern.format(s) for s in SPLIT_NAMES}
            missing = [p.name for p in files.values() if not p.is_file()]
            if missing:
                expected = ", ".join(pattern.format(s) for s in SPLIT_NAMES)
                raise LmembedError(f"{root}: missing {', '.join(missing)} ({name} layout expects {expected})")
            return {s: [p] for s, p in files.items()}
    expected = "; ".join(", ".join(p.format(s) for s in SPLIT_NAMES) for p in LAYOUTS.values())
    raise LmembedError(f"{root}: no corpus files found; expected one of these layouts: {expected}")


MAX_LINE_BYTES = 1 << 24  # 16 MiB: a longer "line" is not text (a binary or sparse file), and is refused


def open_text(path: Path) -> BinaryIO:
    """A regular file, opened for reading. FIFOs, devices and sockets are refused: reading one
    would wait forever or never end (a FIFO nobody writes, /dev/zero)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    except FileNotFoundError:
        raise LmembedError(f"{path}: file not found") from None
    except OSError as e:
        raise LmembedError(f"{path}: cannot be read ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise LmembedError(f"{path}: is {kind}, not a regular file; lmembed reads text from regular files only")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def iter_lines(paths: list[Path], encoding: str = "utf-8") -> Iterator[str]:
    """Lines of the files in order, decoded strictly: bad bytes are reported by file and line. Read
    a line at a time, each at most MAX_LINE_BYTES: memory stays bounded whatever the file holds."""
    for path in paths:
        with open_text(path) as f:
            lineno = 0
            while raw := f.readline(MAX_LINE_BYTES + 1):
                lineno += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise LmembedError(f"{path}: line {lineno} is longer than {MAX_LINE_BYTES >> 20} MiB, so this is "
                                       "not a text file lmembed reads (a binary file? split long lines)")
                try:
                    line = raw.decode(encoding)
                except UnicodeDecodeError as e:
                    raise LmembedError(
                        f"{path}: line {lineno} is not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column "
                        f"{e.start + 1}); re-encode the file as UTF-8"
                    ) from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                yield line


def _file_key(paths: list[Path]) -> list:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _cache_root(files: dict[str, list[Path]], is_bundled: bool) -> Path:
    env = os.environ.get("LMEMBED_CACHE")
    user = Path(env) if env else Path.home() / ".cache" / "lmembed"
    if is_bundled:
        return user / "corpora"
    data_dir = files["train"][0].parent
    local = data_dir / ".lmembed-cache"
    if os.access(data_dir, os.W_OK) or os.access(local, os.W_OK):
        return local
    return user / "corpora"


def _encode_to_file(tok: Tokenizer, paths: list[Path], out: Path, desc: str, encoding: str = "utf-8") -> int:
    """Stream-encode files into a raw int32 file; returns the token count."""
    total_bytes = sum(p.stat().st_size for p in paths)
    n = 0
    buf: array = array("i")
    chunk: list[str] = []
    with open(out, "wb") as f, tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc,
                                    disable=None if total_bytes > PROGRESS_MIN_BYTES else True, leave=False) as bar:
        def flush_lines() -> None:
            nonlocal n
            for ids in tok.encode_lines(chunk):
                buf.extend(ids)
            chunk.clear()
            if len(buf) >= 1 << 20:
                flush_buf()

        def flush_buf() -> None:
            nonlocal n, buf
            n += len(buf)
            buf.tofile(f)
            buf = array("i")

        for line in iter_lines(paths, encoding):
            chunk.append(line)
            bar.update(len(line))
            if len(chunk) >= 10000:
                flush_lines()
        flush_lines()
        flush_buf()
    return n


def _build_tokenizer(files: list[Path], opts: TextOptions, encoding: str = "utf-8") -> Tokenizer:
    if opts.bpe:
        return BPETokenizer.build(iter_lines(files, encoding), vocab_size=int(opts.bpe))
    return WordTokenizer.build(
        iter_lines(files, encoding), split=opts.split or "whitespace", lowercase=bool(opts.lowercase),
        max_size=opts.max_vocab, min_freq=opts.min_freq or 1,
    )


def load_corpus(
    spec: str | Path,
    *,
    options: TextOptions | None = None,
    tokenizer: Tokenizer | None = None,
    cache: bool = True,
) -> Corpus:
    """Load a corpus by bundled name or directory; reuse `tokenizer` (e.g. a trained run's) if given.

    The vocabulary is built from the train split only, so valid/test words unseen in training
    become `<unk>` (as in PTB).
    """
    spec_s = str(spec)
    is_bundled = spec_s in bundled.REGISTRY
    if is_bundled:
        entry = bundled.get(spec_s)
        files, base, encoding = entry.files(), entry.options, entry.encoding
        name = spec_s
    else:
        root = Path(spec_s).expanduser()
        files, base, encoding = find_layout(root), PLAIN, "utf-8"
        name = str(root)
    opts = (options or TextOptions()).merged_over(base)
    for s, paths in files.items():
        for p in paths:
            if not p.is_file():
                raise LmembedError(f"{p}: {s} split file not found")

    key_src = {"v": CACHE_VERSION, "files": {s: _file_key(p) for s, p in files.items()}, "opts": asdict(opts),
               "tokenizer": tokenizer.fingerprint() if tokenizer is not None else None}
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = _cache_root(files, is_bundled) / key
    if cache and (cache_dir / "meta.json").exists():
        try:
            return _load_cached(name, cache_dir, files)
        except LmembedError:
            shutil.rmtree(cache_dir, ignore_errors=True)  # stale or damaged cache: rebuild below

    tok = tokenizer if tokenizer is not None else _build_tokenizer(files["train"], opts, encoding)
    return _build_cache(name, files, tok, encoding, key_src, cache_dir, keep=cache)


def _build_cache(name: str, files: dict[str, list[Path]], tok: Tokenizer, encoding: str, key_src: dict,
                 cache_dir: Path, *, keep: bool) -> Corpus:
    """Tokenise every split into a temp folder, then rename it into place (another process that
    finished first wins: its cache is identical)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=_ensure_dir(cache_dir.parent)))
    try:
        counts = {}
        for s, paths in files.items():
            counts[s] = _encode_to_file(tok, paths, tmp / f"{s}.bin", desc=f"tokenising {s}", encoding=encoding)
            if counts[s] == 0:
                shown = paths[0] if len(paths) == 1 else f"{len(paths)} files starting {paths[0]}"
                raise LmembedError(f"{shown}: {s} split is empty (no tokens)")
        save_tokenizer(tok, tmp / "tokenizer.json")
        write_json(tmp / "meta.json", {"counts": counts, "key": key_src, "name": name})
        if not keep:  # memory maps outlive the deleted files (POSIX)
            corpus = _load_cached(name, tmp, files)
            shutil.rmtree(tmp, ignore_errors=True)
            corpus.cache_dir = None
            return corpus
        os.chmod(tmp, 0o777 & ~current_umask())
        try:
            os.replace(tmp, cache_dir)
        except OSError:  # another process won the race: use its (identical) cache
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load_cached(name, cache_dir, files)


def _ensure_dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


CHECK_CHUNK = 1 << 24  # ids checked at a time when a cache is opened


def _load_cached(name: str, cache_dir: Path, files: dict[str, list[Path]]) -> Corpus:
    """A token cache, checked (a damaged or edited one is rebuilt by the caller): sizes match the
    metadata and every id is within the vocabulary (an id beyond it would index out of bounds)."""
    meta = read_json(cache_dir / "meta.json", "corpus cache metadata")
    tok = load_tokenizer(cache_dir / "tokenizer.json")
    counts = meta.get("counts") if isinstance(meta, dict) else None
    if not isinstance(counts, dict) or set(counts) != set(files):
        raise LmembedError(f"{cache_dir / 'meta.json'}: corpus cache is damaged (split counts)")
    splits = {}
    for s, n in counts.items():
        path = cache_dir / f"{s}.bin"
        if not isinstance(n, int) or not path.exists() or path.stat().st_size != n * np.dtype(ID_DTYPE).itemsize:
            raise LmembedError(f"{path}: corpus cache is damaged")
        ids = np.memmap(path, dtype=ID_DTYPE, mode="r", shape=(n,))
        for c in range(0, n, CHECK_CHUNK):
            part = ids[c : c + CHECK_CHUNK]
            if len(part) and (int(part.min()) < 0 or int(part.max()) >= tok.vocab_size):
                raise LmembedError(f"{path}: corpus cache holds ids outside the vocabulary of {tok.vocab_size}")
        splits[s] = ids
    return Corpus(name=name, tokenizer=tok, splits=splits, files=files, cache_dir=cache_dir)


def recorded_corpus(recorded: Any, given: str | None, where: str, bundled_names: Any = bundled.REGISTRY) -> str:
    """The corpus to read for a saved run: the one the user names, else the run's own when it is
    a bundled name. A folder read from a file is never followed (it could send lmembed to read,
    and cache into, any folder): the user names it."""
    if given:
        return given
    if isinstance(recorded, str) and recorded in bundled_names:
        return recorded
    raise LmembedError(f"{where}: the run was trained on {recorded!r}; pass --data {recorded} to use that corpus "
                       "(lmembed does not follow paths read from files)")
