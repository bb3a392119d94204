"""Tokenizers that turn one line of text into token ids.

Two kinds, one interface (``encode_line``, ``tokens``, ``save``/``load``):
- ``WordTokenizer``: word-level vocabulary (PTB / WikiText style): ``<eos>`` ends every line,
  ``<unk>`` stands for out-of-vocabulary words. Ids are sorted by train-set frequency.
- ``BPETokenizer``: a byte-level BPE vocabulary trained with Hugging Face ``tokenizers``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import LmembedError

EOS = "<eos>"
UNK = "<unk>"

# Raw-text word splitter: words (with inner apostrophes), numbers, single punctuation marks.
_WORD_RE = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*|\d+(?:[.,]\d+)*|[^\w\s]", re.UNICODE)

SPLITS = ("whitespace", "words")

# A byte-level BPE starts from 256 byte symbols plus a few specials: smaller cannot hold them.
BPE_MIN_VOCAB = 260


def split_line(line: str, how: str = "whitespace", lowercase: bool = False) -> list[str]:
    """`whitespace` keeps pre-tokenised corpora (PTB, WikiText) as they are; `words` splits raw text."""
    if lowercase:
        line = line.lower()
    if how == "whitespace":
        return line.split()
    if how == "words":
        return _WORD_RE.findall(line)
    raise LmembedError(f"unknown tokenisation {how!r}: expected one of {', '.join(SPLITS)}")


class WordTokenizer:
    kind = "word"

    def __init__(self, itos: list[str], *, split: str = "whitespace", lowercase: bool = False):
        if len(set(itos)) != len(itos):
            raise LmembedError("word vocabulary has duplicate entries")
        if EOS not in itos:
            raise LmembedError(f"word vocabulary lacks the {EOS} token")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.split = split
        self.lowercase = lowercase
        self.eos_id = self.stoi[EOS]
        self.unk_id = self.stoi.get(UNK)

    @classmethod
    def build(
        cls,
        lines: Iterable[str],
        *,
        split: str = "whitespace",
        lowercase: bool = False,
        max_size: int | None = None,
        min_freq: int = 1,
    ) -> WordTokenizer:
        """Vocabulary from training text, most frequent first (ties alphabetical: deterministic).

        `<unk>` is always in the vocabulary (last, unless the text itself uses it, as PTB does).
        """
        counts: Counter[str] = Counter()
        n_lines = 0
        for line in lines:
            words = split_line(line, split, lowercase)
            if words:
                counts.update(words)
                n_lines += 1
        counts[EOS] += n_lines
        words = sorted(counts, key=lambda w: (-counts[w], w))
        kept = [w for w in words if counts[w] >= min_freq or w in (EOS, UNK)]
        if max_size is not None:
            if max_size < 2:
                raise LmembedError(f"--max-vocab {max_size}: must be at least 2 (<eos> and <unk>)")
            if len(kept) > max_size:
                body = [w for w in kept if w not in (EOS, UNK)][: max_size - 2]
                keep = set(body) | {EOS, UNK}
                kept = [w for w in words if w in keep] + ([UNK] if UNK not in counts else [])
        if UNK not in kept:  # valid/test words unseen in training need somewhere to go
            kept.append(UNK)
        return cls(kept, split=split, lowercase=lowercase)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def tokens(self) -> list[str]:
        return list(self.itos)

    def encode_line(self, line: str) -> list[int]:
        """Ids of a line plus `<eos>`; blank lines give nothing (WikiText has many)."""
        words = split_line(line, self.split, self.lowercase)
        if not words:
            return []
        stoi, unk = self.stoi, self.unk_id
        if unk is None:
            try:
                ids = [stoi[w] for w in words]
            except KeyError as e:
                raise LmembedError(
                    f"word {e.args[0]!r} is not in the vocabulary, which has no {UNK} token"
                ) from None
        else:
            ids = [stoi.get(w, unk) for w in words]
        ids.append(self.eos_id)
        return ids

    def encode_lines(self, lines: list[str]) -> Iterator[list[int]]:
        for line in lines:
            yield self.encode_line(line)

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.itos[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "split": self.split, "lowercase": self.lowercase, "itos": self.itos}

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class BPETokenizer:
    """Byte-level BPE (no unknown tokens) with `<eos>` appended to every line."""

    kind = "bpe"

    def __init__(self, tok):  # tok: tokenizers.Tokenizer
        self.tok = tok
        eos = tok.token_to_id(EOS)
        if eos is None:
            raise LmembedError(f"BPE tokenizer lacks the {EOS} special token")
        self.eos_id = eos
        self.unk_id = None

    @classmethod
    def build(cls, lines: Iterable[str], *, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < BPE_MIN_VOCAB:
            raise LmembedError(f"--bpe {vocab_size}: byte-level BPE needs a vocabulary of at least {BPE_MIN_VOCAB}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((ln for ln in lines if ln.strip()), trainer=trainer)
        return cls(tok)

    def __len__(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def tokens(self) -> list[str]:
        vocab = self.tok.get_vocab()
        itos = [""] * len(vocab)
        for t, i in vocab.items():
            itos[i] = t
        return itos

    def encode_line(self, line: str) -> list[int]:
        if not line.strip():
            return []
        return self.tok.encode(line.strip()).ids + [self.eos_id]

    def encode_lines(self, lines: list[str]) -> Iterator[list[int]]:
        stripped = [ln.strip() for ln in lines]
        keep = [s for s in stripped if s]
        encoded = iter(self.tok.encode_batch(keep))
        for s in stripped:
            yield (next(encoded).ids + [self.eos_id]) if s else []

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([i for i in ids if i != self.eos_id])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer": json.loads(self.tok.to_str())}

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha1(self.tok.to_str().encode()).hexdigest()[:16]


Tokenizer = WordTokenizer | BPETokenizer


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    from ..common.files import write_json

    write_json(path, tok.to_dict())


MAX_VOCAB = 1 << 24  # the largest vocabulary a tokenizer file may declare (16.7M words)


def tokenizer_from_dict(d: Any, where: str = "tokenizer") -> Tokenizer:
    """A tokenizer from its JSON form, every field checked (a file may have been edited)."""
    if not isinstance(d, dict):
        raise LmembedError(f"{where}: expected a JSON object, got {type(d).__name__}")
    kind = d.get("kind")
    if kind == "word":
        itos = d.get("itos")
        if not isinstance(itos, list) or not 0 < len(itos) <= MAX_VOCAB or not all(isinstance(w, str) for w in itos):
            raise LmembedError(f"{where}: 'itos' must be a list of 1..{MAX_VOCAB} words (strings)")
        split, lowercase = d.get("split", "whitespace"), d.get("lowercase", False)
        if split not in ("whitespace", "words") or not isinstance(lowercase, bool):
            raise LmembedError(f"{where}: 'split' must be whitespace or words and 'lowercase' true or false")
        return WordTokenizer(itos, split=split, lowercase=lowercase)
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        if not isinstance(d.get("tokenizer"), dict):
            raise LmembedError(f"{where}: 'tokenizer' must be the JSON object of a byte-level BPE")
        try:
            tok = HFTokenizer.from_str(json.dumps(d["tokenizer"]))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception type
            raise LmembedError(f"{where}: not a valid BPE tokenizer ({' '.join(str(e).split())[:160]})") from None
        if not 0 < tok.get_vocab_size() <= MAX_VOCAB:
            raise LmembedError(f"{where}: BPE vocabulary of {tok.get_vocab_size()} tokens; expected 1..{MAX_VOCAB}")
        return BPETokenizer(tok)
    raise LmembedError(f"{where}: unknown tokenizer kind {kind!r} (expected 'word' or 'bpe')")


def load_tokenizer(path: str | Path) -> Tokenizer:
    from ..common.files import read_json

    return tokenizer_from_dict(read_json(path, "tokenizer file"), str(path))
