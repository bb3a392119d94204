"""`wiki`: encyclopedic English text for out-of-domain evaluation, from the Wikipedia dump sample
that ships in gensim's wheel (``test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
206 pages).

The dump's wikitext is cleaned by a small regex cleaner (``clean_wikitext``): comments, references,
templates and tables (nested) are removed; links become their text; file, category and
interlanguage links go; headings, lists, table rows and lines under 8 words are dropped, and an
article ends at its first back-matter heading (See also, References, ...). Redirects, pages outside
the article namespace, lists, disambiguation pages and articles under 150 words are skipped.

Splits are by whole article and fixed by title, so a cleaner change never moves an article:

- test:  the first ``OPENING`` paragraphs of each article in ``TEST_TITLES`` (many topics within
  the first few thousand tokens; the rest of those articles is in no split);
- valid: the first ``OPENING`` paragraphs of each article in ``VALID_TITLES`` (likewise);
- train: every other kept article, whole.

Each article is written as its title line, its paragraphs (one per line) and a blank line. The
three files are built once (a few seconds) under ``$LMEMBED_CACHE`` (default ~/.cache/lmembed)/texts/.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..errors import LmembedError

DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CLEANER_VERSION = 1
OPENING = 3  # paragraphs of a held-out article that go into its split
MIN_WORDS_LINE = 8
MIN_WORDS_ARTICLE = 150
# every third kept article in dump order from the 2nd (test), every ninth from the 3rd (valid): 31 and 11
# of the 94 articles; train holds the other 52 (about 235k words). Test is about 10.7k SmolLM2 tokens.
TEST_TITLES = (
    "Autism", "Alabama", "Aristotle", "Actrius", "Altruism", "Allan Dwan", "Agricultural science", "ASCII",
    "Andre Agassi", "Andorra", "Animal Farm", "Agriculture", "Analysis of variance", "Answer",
    "America the Beautiful", "Acid", "Apollo 11", "A Modest Proposal", "Atomic number", "Andrei Tarkovsky",
    "Aardwolf", "Asia", "Atlantic Ocean", "Demographics of Angola", "Transport in Angola", "Albert Sidney Johnston",
    "Actinopterygii", "Albania", "Amateur astronomy", "Agnostida", "American Revolutionary War",
)
VALID_TITLES = (
    "Albedo", "Animalia (book)", "Alchemy", "Arithmetic mean", "Alkane", "Asphalt", "Anatomy", "Aruba",
    "Angolan Armed Forces", "Allah", "Ampere",
)
BACK_MATTER = {"see also", "references", "external links", "further reading", "notes", "bibliography",
               "sources", "notes and references", "footnotes", "citations", "works cited"}
BLOCK_TAGS = ("ref", "gallery", "math", "timeline", "table", "score", "syntaxhighlight", "source", "chem")
SKIP_PREFIXES = ("*", "#", ":", ";", "|", "!", "{", "}")

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG_NAMES = "|".join(BLOCK_TAGS)
_BLOCKS = re.compile(r"<(" + _TAG_NAMES + r")\b[^>]*?/>|<(" + _TAG_NAMES + r")\b[^>]*>.*?</\2\s*>", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)  # innermost {{...}}
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)  # innermost {| ... |}
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost [[...]]
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_QUOTES = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")


@dataclass(frozen=True)
class Article:
    title: str
    paragraphs: tuple[str, ...]


def _strip_nested(text: str, pattern: re.Pattern) -> str:
    """Remove innermost matches until none is left, so nesting of any depth goes."""
    while True:
        text, n = pattern.subn("", text)
        if n == 0:
            return text


def _link_text(m: re.Match) -> str:
    """[[target|text]] -> text; files, categories and interlanguage links -> nothing."""
    target, _, label = m.group(1).partition("|")
    if ":" in target.lstrip(":"):  # File:, Image:, Category:, de:, Wikipedia:, ...
        return ""
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def _strip_markup(text: str) -> str:
    """Whole-text passes: what may span lines (comments, refs, templates, tables, links)."""
    text = _BLOCKS.sub("", _COMMENT.sub("", text))
    while True:  # templates inside tables and tables inside templates
        before = text
        text = _strip_nested(_strip_nested(text, _TEMPLATE), _TABLE)
        if text == before:
            break
    while True:
        text, n = _LINK.subn(_link_text, text)
        if n == 0:
            break
    return _EXT_LINK.sub(lambda m: m.group(1) or "", text)


def _clean_line(line: str) -> str:
    line = html.unescape(_TAG.sub("", _QUOTES.sub("", _MAGIC.sub("", line))))
    line = re.sub(r"\s+", " ", line.replace("\u00a0", " ")).strip()
    line = _EMPTY_PARENS.sub("", line).replace("( ", "(").replace(" )", ")")
    return re.sub(r" ([,.;:])", r"\1", re.sub(r"\s+", " ", line)).strip()


def clean_wikitext(text: str) -> list[str]:
    """Plain paragraphs of an article's wikitext, in order, stopping at the back matter."""
    out = []
    for raw in _strip_markup(text).splitlines():
        head = _HEADING.match(raw)
        if head:
            if _QUOTES.sub("", head.group(2)).strip().lower() in BACK_MATTER:
                break
            continue
        if raw.lstrip().startswith(SKIP_PREFIXES):
            continue
        line = _clean_line(raw)
        if len(line.split()) >= MIN_WORDS_LINE:
            out.append(line)
    return out


def _pages(path: Path):
    """(title, wikitext, is_redirect) of every page of a MediaWiki XML dump (bz2)."""
    with bz2.open(path, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = el.tag[: el.tag.index("}") + 1] if el.tag.startswith("{") else ""
            text = el.findtext(f"{ns}revision/{ns}text") or ""
            redirect = el.find(f"{ns}redirect") is not None or text.lstrip().lower().startswith("#redirect")
            yield el.findtext(f"{ns}title") or "", text, redirect
            el.clear()


def read_articles(path: Path) -> list[Article]:
    """The dump's kept articles in dump order (see the module docstring for what is skipped)."""
    out = []
    try:
        for title, text, redirect in _pages(path):
            if redirect or ":" in title or title.startswith("List of") or "(disambiguation)" in title:
                continue
            paras = clean_wikitext(text)
            if sum(len(p.split()) for p in paras) >= MIN_WORDS_ARTICLE:
                out.append(Article(title, tuple(paras)))
    except (OSError, EOFError, ET.ParseError) as e:
        raise LmembedError(f"{path}: not a readable bz2 MediaWiki dump ({e})") from None
    return out


def split_articles(articles: list[Article]) -> dict[str, list[Article]]:
    """train / valid / test by title (held-out articles cut to their opening paragraphs)."""
    titles = {a.title for a in articles}
    missing = [t for t in (*TEST_TITLES, *VALID_TITLES) if t not in titles]
    if missing:
        raise LmembedError(f"wiki: held-out articles {missing[:3]} not found in the dump; expected gensim's "
                           f"{DUMP} as shipped (reinstall gensim)")
    held = set(TEST_TITLES) | set(VALID_TITLES)
    return {
        "train": [a for a in articles if a.title not in held],
        "valid": [Article(a.title, a.paragraphs[:OPENING]) for a in articles if a.title in VALID_TITLES],
        "test": [Article(a.title, a.paragraphs[:OPENING]) for a in articles if a.title in TEST_TITLES],
    }


def articles_text(articles: list[Article]) -> str:
    """Title line, one paragraph per line, a blank line after each article."""
    return "".join(a.title + "\n" + "".join(p + "\n" for p in a.paragraphs) + "\n" for a in articles)


def _cache_dir(dump: Path) -> Path:
    env = os.environ.get("LMEMBED_CACHE")
    root = (Path(env) if env else Path.home() / ".cache" / "lmembed") / "texts"
    st = dump.stat()
    key = json.dumps([CLEANER_VERSION, OPENING, TEST_TITLES, VALID_TITLES, st.st_size], sort_keys=True)
    return root / f"wiki-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def wiki_files(dump: Path) -> dict[str, list[Path]]:
    """The split files of `dump`, cleaned once and cached (another process's identical result wins)."""
    out = _cache_dir(dump)
    files = {s: [out / f"{s}.txt"] for s in ("train", "valid", "test")}
    complete = lambda: all(p[0].is_file() for p in files.values())  # noqa: E731
    if complete():
        return files
    splits = split_articles(read_articles(dump))
    if out.exists() and not complete():  # a damaged cache (a file deleted by hand) is rebuilt
        shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for s, arts in splits.items():
            (tmp / f"{s}.txt").write_text(articles_text(arts), encoding="utf-8")
        (tmp / "articles.json").write_text(json.dumps({s: [a.title for a in arts] for s, arts in splits.items()},
                                                      indent=1) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: its files are identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files
