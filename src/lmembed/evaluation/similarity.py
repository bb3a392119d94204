"""Word-level quality of an embedding matrix: similarity benchmarks, analogies, neighbours.

- Benchmarks are files of ``word1 word2 score`` lines (tab or space separated; extra columns are
  ignored, so RW's per-rater columns are fine; ``#`` starts a comment). SimLex-999, WordSim-353
  and the analogy questions ship in gensim's test data and are found by name (``simlex999``,
  ``ws353``, ``questions-words``) without importing gensim.
- ``WordIndex`` maps words to matrix rows for any vocabulary: lmembed word lists, BPE or
  WordPiece tokenizers. A word counts as covered when it is a *single* token: tried in the forms
  ``Ġword`` and ``▁word`` (a word after a space in byte-level BPE / SentencePiece), then ``word``
  itself (word vocabularies, WordPiece word starts), each as given, lower-cased and capitalised.
  WordPiece continuations (``##word``) are never words.
- Scores are cosine similarities; Spearman's rho (ties get average ranks) is computed on the
  covered pairs only, and the pairs/words left out are reported.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.corpus import iter_lines
from ..errors import LmembedError

GENSIM_HINT = "pip install 'lmembed[analysis]' (or gensim), or pass your own benchmark file"
BUILTIN_FILES = {"simlex999": "simlex999.txt", "ws353": "wordsim353.tsv", "questions-words": "questions-words.txt"}
DEFAULT_BENCHMARKS = ("simlex999", "ws353")
DEFAULT_ANALOGIES = "questions-words"
WORD_PREFIXES = ("Ġ", "▁")  # byte-level BPE and SentencePiece mark a preceding space this way


# --- benchmark files ---------------------------------------------------------------------------

def gensim_data_dir() -> Path:
    """gensim's bundled test data folder, located without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LmembedError(f"the built-in benchmarks come from gensim's test data, which is not installed: "
                           f"{GENSIM_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def resolve_benchmark(spec: str | Path) -> tuple[str, Path]:
    """(name, path) for a built-in name (simlex999, ws353, questions-words) or a file path."""
    if str(spec) in BUILTIN_FILES:
        path = gensim_data_dir() / BUILTIN_FILES[str(spec)]
        if not path.exists():
            raise LmembedError(f"{path}: gensim's copy of {spec} is missing ({GENSIM_HINT})")
        return str(spec), path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LmembedError(f"{spec}: benchmark file not found (built-in names: {', '.join(BUILTIN_FILES)})")
    return path.stem, path


@dataclass(frozen=True)
class Benchmark:
    name: str
    pairs: tuple[tuple[str, str, float], ...]
    source: str = ""


def parse_benchmark(lines: Iterable[str], name: str, source: str = "") -> Benchmark:
    """`word1 word2 score` per line; '#' comments and blank lines are skipped."""
    where = source or name
    pairs = []
    for no, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        score = None
        if len(fields) >= 3 and fields[0] and fields[1]:
            try:
                score = float(fields[2])
            except ValueError:
                score = None
        if score is None or not math.isfinite(score):
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise LmembedError(f"{where}: line {no}: expected 'word1 word2 score' (tab or space separated, "
                               f"score a number; comments start with '#'), got {shown!r}")
        pairs.append((fields[0], fields[1], score))
    if not pairs:
        raise LmembedError(f"{where}: no 'word1 word2 score' lines found")
    return Benchmark(name, tuple(pairs), source)


def load_benchmark(spec: str | Path | Benchmark) -> Benchmark:
    if isinstance(spec, Benchmark):
        return spec
    name, path = resolve_benchmark(spec)
    return parse_benchmark(list(iter_lines([path])), name, str(path))  # regular files only, bounded lines


@dataclass(frozen=True)
class Analogies:
    name: str
    questions: tuple[tuple[str, str, str, str, str], ...]  # (section, a, b, c, d): a is to b as c is to d
    source: str = ""


def load_analogies(spec: str | Path | Analogies) -> Analogies:
    """Mikolov's questions-words format: ': section' headers, then `a b c d` per line."""
    if isinstance(spec, Analogies):
        return spec
    name, path = resolve_benchmark(spec)
    questions, section = [], ""
    for no, raw in enumerate(iter_lines([path]), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        words = line.split()
        if len(words) != 4:
            raise LmembedError(f"{path}: line {no}: expected 4 words 'a b c d' or a ': section' header, "
                               f"got {line[:60]!r}")
        questions.append((section, *words))
    if not questions:
        raise LmembedError(f"{path}: no analogy questions found")
    return Analogies(name, tuple(questions), str(path))


# --- vocabularies -------------------------------------------------------------------------------

def vocab_tokens(vocab) -> list[str | None]:
    """Token string per row id for an lmembed tokenizer, an HF tokenizer, a dict or a list."""
    if hasattr(vocab, "itos"):
        return list(vocab.itos)
    if hasattr(vocab, "tokens") and callable(vocab.tokens) and not hasattr(vocab, "get_vocab"):
        return list(vocab.tokens())
    mapping = vocab.get_vocab() if hasattr(vocab, "get_vocab") else vocab
    if isinstance(mapping, dict):
        if not mapping:
            return []
        out: list[str | None] = [None] * (max(mapping.values()) + 1)
        for tok, i in mapping.items():
            out[i] = tok
        return out
    if isinstance(vocab, Sequence) and not isinstance(vocab, str):
        return [str(t) for t in vocab]
    raise LmembedError(f"cannot read a vocabulary from {type(vocab).__name__}: expected a tokenizer, "
                       "a token list or a {token: id} dict")


def token_word(token: str | None) -> str | None:
    """The lower-cased word a token stands for when it is a whole alphabetic word, else None."""
    if not token:
        return None
    for p in WORD_PREFIXES:
        if token.startswith(p):
            token = token[len(p):]
            break
    return token.lower() if token.isalpha() else None


@dataclass
class WordIndex:
    """Word -> row lookup over a vocabulary (see the module doc for the rules)."""

    tokens: list[str | None]
    stoi: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.stoi = {}
        for i, t in enumerate(self.tokens):
            if t is not None and t not in self.stoi:
                self.stoi[t] = i

    @classmethod
    def from_vocab(cls, vocab) -> WordIndex:
        return vocab if isinstance(vocab, WordIndex) else cls(vocab_tokens(vocab))

    def __len__(self) -> int:
        return len(self.tokens)

    def lookup(self, word: str) -> int | None:
        variants = list(dict.fromkeys([word, word.lower(), word.capitalize()]))
        for form in [p + v for p in WORD_PREFIXES for v in variants] + variants:
            i = self.stoi.get(form)
            if i is not None:
                return i
        return None

    def word_rows(self, limit: int | None = None) -> np.ndarray:
        """Rows whose token is a whole alphabetic word (optionally only those below `limit`)."""
        n = len(self.tokens) if limit is None else min(limit, len(self.tokens))
        return np.array([i for i in range(n) if token_word(self.tokens[i]) is not None], dtype=np.int64)


# --- metrics -------------------------------------------------------------------------------------

def rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(len(x))
    ranks[order] = avg[np.cumsum(new) - 1]
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Spearman's rank correlation; None with fewer than 3 pairs or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"spearman: {x.shape} vs {y.shape}")
    if len(x) < 3:
        return None
    rx, ry = rank_average(x), rank_average(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return None if denom == 0 else float(rx @ ry) / denom


def unit_rows(E: torch.Tensor) -> torch.Tensor:
    E = E.detach().float()
    return E / E.norm(dim=1, keepdim=True).clamp_min(1e-12)


def pair_cosines(E: torch.Tensor, a: Sequence[int], b: Sequence[int]) -> np.ndarray:
    N = unit_rows(E)
    ia, ib = torch.as_tensor(list(a), dtype=torch.long), torch.as_tensor(list(b), dtype=torch.long)
    return (N[ia] * N[ib]).sum(1).numpy().astype(np.float64)


def covered_pairs(index: WordIndex, bench: Benchmark, rows: int) -> tuple[list[tuple[int, int, float]], list[str]]:
    """(row_a, row_b, human score) for the pairs whose words are both single tokens; OOV words."""
    cache: dict[str, int | None] = {}
    oov: dict[str, None] = {}
    kept = []
    for w1, w2, score in bench.pairs:
        ids = []
        for w in (w1, w2):
            if w not in cache:
                i = index.lookup(w)
                cache[w] = i if i is not None and i < rows else None
            if cache[w] is None:
                oov[w] = None
            ids.append(cache[w])
        if None not in ids:
            kept.append((ids[0], ids[1], score))
    return kept, list(oov)


def word_similarity(E: torch.Tensor, index: WordIndex, bench: Benchmark, *, keep_points: bool = False) -> dict:
    """Spearman between human scores and cosine similarity on the covered pairs, with OOV counts."""
    kept, oov = covered_pairs(index, bench, E.shape[0])
    res = {"benchmark": bench.name, "pairs": len(bench.pairs), "covered": len(kept),
           "oov_pairs": len(bench.pairs) - len(kept), "oov_words": len(oov), "oov_examples": oov[:10],
           "spearman": None}
    if kept:
        cos = pair_cosines(E, [k[0] for k in kept], [k[1] for k in kept])
        human = np.array([k[2] for k in kept])
        res["spearman"] = spearman(human, cos)
        if keep_points:
            res["points"] = (human, cos)
    return res


def analogy_accuracy(E: torch.Tensor, index: WordIndex, analogies: Analogies, *, chunk: int = 256) -> dict:
    """3CosAdd (b - a + c, cosine, question words excluded) over the questions whose four words are
    single tokens; candidates are the rows that are whole words. Counted per semantic/syntactic
    ('gram*' sections) part too."""
    rows = E.shape[0]
    cand = index.word_rows(rows)
    res = {"benchmark": analogies.name, "questions": len(analogies.questions), "covered": 0, "correct": 0,
           "accuracy": None, "semantic": None, "syntactic": None}
    qs, kinds, answers = [], [], []
    for section, *words in analogies.questions:
        ids = [index.lookup(w) for w in words]
        if any(i is None or i >= rows for i in ids):
            continue
        qs.append(ids)
        kinds.append(section.startswith("gram"))
        answers.append(words[3].lower())
    res["covered"] = len(qs)
    if not qs or len(cand) == 0:
        return res
    N = unit_rows(E)
    C = N[torch.as_tensor(cand)]
    cand_words = [token_word(index.tokens[i]) for i in cand]
    word_pos: dict[str, list[int]] = {}
    for j, w in enumerate(cand_words):
        word_pos.setdefault(w, []).append(j)
    q = torch.as_tensor(qs, dtype=torch.long)
    correct = np.zeros(len(qs), dtype=bool)
    for s in range(0, len(qs), chunk):
        qq = q[s:s + chunk]
        target = N[qq[:, 1]] - N[qq[:, 0]] + N[qq[:, 2]]
        scores = target @ C.T
        for r, ids in enumerate(qq.tolist()):  # exclude the question words (all their token forms)
            for i in ids[:3]:
                for j in word_pos.get(token_word(index.tokens[i]) or "", []):
                    scores[r, j] = -math.inf
        best = scores.argmax(1).tolist()
        for r, b in enumerate(best):
            correct[s + r] = cand_words[b] == answers[s + r]
    kinds_a = np.array(kinds)
    res["correct"] = int(correct.sum())
    res["accuracy"] = float(correct.mean())
    for key, mask in (("semantic", ~kinds_a), ("syntactic", kinds_a)):
        res[key] = float(correct[mask].mean()) if mask.any() else None
    return res


def nearest_neighbours(E: torch.Tensor, index: WordIndex, words: Sequence[str], k: int = 8) -> dict[str, list]:
    """k most cosine-similar rows (token, cosine) per word; words that are not single tokens map to None."""
    N = unit_rows(E)
    out: dict[str, list | None] = {}
    for w in words:
        i = index.lookup(w)
        if i is None or i >= N.shape[0]:
            out[w] = None
            continue
        sims = N @ N[i]
        sims[i] = -math.inf
        top = torch.topk(sims, min(k, N.shape[0] - 1))
        out[w] = [[index.tokens[j] if j < len(index.tokens) else f"#{j}", round(float(s), 4)]
                  for s, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
    return out


def sample_rows(rows: np.ndarray, n_words: int, seed: int) -> np.ndarray:
    """Up to n_words rows drawn from `rows` with a fixed seed (sorted)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.asarray(rows), size=min(n_words, len(rows)), replace=False))


def pairwise_cosines(E: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair i < j among `rows` (flattened upper triangle)."""
    N = unit_rows(E)[torch.as_tensor(rows, dtype=torch.long)]
    S = (N @ N.T).numpy().astype(np.float64)
    return S[np.triu_indices(len(rows), k=1)]


def similarity_agreement(A: torch.Tensor, B: torch.Tensor, rows: np.ndarray) -> float | None:
    """How alike two matrices of the same vocabulary see the words: Spearman between the cosine
    similarities they give every pair of `rows` (Press & Wolf's comparison of U, V and the tied matrix)."""
    return spearman(pairwise_cosines(A, rows), pairwise_cosines(B, rows))
