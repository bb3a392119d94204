"""Monotone line alignment of two versions of one text (e.g. a First Folio play and a modern edition).

The two versions say the same thing in the same order, but spelling, punctuation and line breaks
differ, and either side may have passages, stage directions or front matter the other lacks.
The procedure (used to build the ``shakespeare-folio`` parallel corpus, see data/parallel.py):

1. Spelling-tolerant similarity. Each line is folded (``fold``): lower case, letters only, the
   early-modern variants u/v, i/j, y/i merged, doubled letters collapsed, a word-final ``e``
   dropped ("Vpon the Heath" and "Upon the heath." both become ``upon th heath``). The
   similarity of a group of lines on each side is the Dice coefficient of their character-trigram
   sets (trigrams of `` word ``, so word boundaries count).
2. Anchors. Folded words that occur exactly once in each version are paired; the longest chain
   of pairs that increases on both sides (patience-diff style, an O(k log k) LIS) is kept.
3. Band. The anchors, plus both ends, give by linear interpolation the expected target line of
   every source line; the dynamic programme only visits target lines within ``band`` of it
   (widened where the expected position jumps, so long one-sided passages stay reachable).
4. Dynamic programme over beads 1-0 and 0-1 (skip a line, score 0), 1-1, 2-1 and 1-2, scoring
   ``similarity - threshold`` (minus ``multi_penalty`` for the two-line beads), maximised over
   the whole play; the traceback gives the beads.
5. Filter. Dice forgives a few extra words on one side, which is what different line breaks
   produce ("I haue seene them in the Church together, God" vs "... together: God send 'em").
   A bead is kept only if (a) its *cover*, the smaller of the two trigram containments
   |A&B|/|A| and |A&B|/|B|, is at least ``keep`` (default 0.75), so neither side has much the
   other lacks, and (b) its *edge* score is at least ``edge_keep`` (default 0.3): the first and
   the last word (of 3+ folded letters) of each side must be found in the other side, exactly
   after folding or by trigram containment (the spelling-tolerant score of the worst of those
   four words). Extra words from a line break sit at the edges, which is what (b) catches.
   Both thresholds were set on one hand-judged random sample of 100 pairs and measured on
   another (see data/folio.py).

Quality is measured where the corpus is built (alignment.json) and in the report of issue 8:
the share of lines kept, and a hand-checked random sample of kept pairs.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass

_FOLD = str.maketrans({"v": "u", "j": "i", "y": "i", "æ": "ae", "œ": "oe"})
_NON_LETTER = re.compile(r"[^a-z]+")
_DOUBLE = re.compile(r"(.)\1+")

# (source lines, target lines) consumed by each bead kind; skips score 0.
MOVES = ((1, 0), (0, 1), (1, 1), (2, 1), (1, 2))


@dataclass(frozen=True)
class Bead:
    """Consecutive source lines `src` aligned to consecutive target lines `tgt` (indices)."""

    src: tuple[int, ...]
    tgt: tuple[int, ...]
    sim: float  # Dice of the trigram sets (what the DP maximises)
    cover: float  # min(|A&B|/|A|, |A&B|/|B|) (filtered on)
    edge: float = 1.0  # worst match of the first/last words of each side in the other (filtered on)

    @property
    def kind(self) -> str:
        return f"{len(self.src)}-{len(self.tgt)}"


def fold_words(line: str) -> list[str]:
    """Spelling-folded words of a line (see the module docstring, step 1)."""
    s = _NON_LETTER.sub(" ", line.lower().translate(_FOLD))
    out = []
    for w in s.split():
        w = _DOUBLE.sub(r"\1", w)
        if len(w) > 2 and w.endswith("e"):
            w = w[:-1]
        elif len(w) > 3 and w.endswith("es"):  # "seemes"/"seems", "knowes"/"knows"
            w = w[:-2] + "s"
        out.append(w)
    return out


def fold(line: str) -> str:
    return " ".join(fold_words(line))


def trigrams(line: str) -> frozenset[str]:
    s = f" {fold(line)} "
    return frozenset(s[i : i + 3] for i in range(len(s) - 2)) if len(s) > 2 else frozenset()


def dice(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    return 2 * len(a & b) / (len(a) + len(b))


def cover(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    common = len(a & b)
    return min(common / len(a), common / len(b))


def _edge_words(words: list[str]) -> list[str]:
    long = [w for w in words if len(w) >= 3]
    return [long[0], long[-1]] if long else []


def edge_score(src: list[str], tgt: list[str]) -> float:
    """How well the first and last words of each side are matched in the other (step 5b)."""
    a = [w for line in src for w in fold_words(line)]
    b = [w for line in tgt for w in fold_words(line)]
    score = 1.0
    for mine, other in ((a, b), (b, a)):
        other_words = set(other)
        other_grams = frozenset().union(*(trigrams(w) for w in other)) if other else frozenset()
        for w in _edge_words(mine):
            if w not in other_words:
                grams = trigrams(w)
                score = min(score, len(grams & other_grams) / len(grams))
    return score


def similarity(src: list[str], tgt: list[str]) -> tuple[float, float]:
    """(Dice, cover) of two groups of lines: what the aligner scores and filters on."""
    a = frozenset().union(*map(trigrams, src))
    b = frozenset().union(*map(trigrams, tgt))
    return dice(a, b), cover(a, b)


def anchors(src: list[str], tgt: list[str]) -> list[tuple[int, int]]:
    """(source line, target line) pairs of words unique on both sides, longest monotone chain."""
    def positions(lines: list[str]) -> tuple[Counter, dict[str, int]]:
        counts: Counter = Counter()
        where: dict[str, int] = {}
        for i, line in enumerate(lines):
            for w in fold_words(line):
                if len(w) >= 4:  # short words are too often accidental matches
                    counts[w] += 1
                    where[w] = i
        return counts, where

    cs, ws = positions(src)
    ct, wt = positions(tgt)
    pairs = sorted((ws[w], wt[w]) for w in cs if cs[w] == 1 and ct.get(w) == 1)
    return _longest_chain(pairs)


def _longest_chain(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Longest subsequence strictly increasing in both coordinates (pairs sorted by the first)."""
    tails: list[int] = []  # tails[k]: smallest second coordinate ending a chain of length k+1
    tail_idx: list[int] = []
    prev = [-1] * len(pairs)
    # equal first coordinates must not chain: process each group in decreasing second coordinate
    order = sorted(range(len(pairs)), key=lambda k: (pairs[k][0], -pairs[k][1]))
    for k in order:
        y = pairs[k][1]
        pos = bisect.bisect_left(tails, y)
        if pos == len(tails):
            tails.append(y)
            tail_idx.append(k)
        else:
            tails[pos] = y
            tail_idx[pos] = k
        prev[k] = tail_idx[pos - 1] if pos else -1
    chain = []
    k = tail_idx[-1] if tail_idx else -1
    while k >= 0:
        chain.append(pairs[k])
        k = prev[k]
    return chain[::-1]


def band_limits(n: int, m: int, points: list[tuple[int, int]], band: int) -> list[tuple[int, int]]:
    """[lo, hi] of target positions the DP visits in each row 0..n (see step 3)."""
    xs, ys = [0], [0]
    for i, j in points:
        if i + 0.5 > xs[-1] and j + 0.5 > ys[-1]:  # anchor at line i means position ~ i + 0.5
            xs.append(i + 0.5)
            ys.append(j + 0.5)
    xs.append(n)
    ys.append(m)
    centre = []
    k = 0
    for i in range(n + 1):
        while k + 1 < len(xs) - 1 and xs[k + 1] <= i:
            k += 1
        x0, x1, y0, y1 = xs[k], xs[k + 1], ys[k], ys[k + 1]
        centre.append(y0 + (y1 - y0) * (i - x0) / (x1 - x0) if x1 > x0 else y1)
    limits = []
    for i in range(n + 1):
        near = centre[max(i - 1, 0) : i + 2]
        limits.append((max(0, int(min(near)) - band), min(m, int(max(near)) + 1 + band)))
    return limits


def align_lines(src: list[str], tgt: list[str], *, band: int = 40, threshold: float = 0.35,
                multi_penalty: float = 0.05, keep: float = 0.75, edge_keep: float = 0.3) -> list[Bead]:
    """Aligned beads (cover >= keep, edge >= edge_keep) of two versions of a text, in order
    (module docstring)."""
    n, m = len(src), len(tgt)
    if not n or not m:
        return []
    s1 = [trigrams(x) for x in src]
    t1 = [trigrams(x) for x in tgt]
    s2 = [frozenset()] + [s1[i - 1] | s1[i] for i in range(1, n)]  # s2[i]: lines i-1 and i
    t2 = [frozenset()] + [t1[j - 1] | t1[j] for j in range(1, m)]
    limits = band_limits(n, m, anchors(src, tgt), band)
    back, sims = _fill(s1, s2, t1, t2, limits, threshold, multi_penalty)
    beads = []
    i, j = n, m
    while i > 0 or j > 0:
        lo = limits[i][0]
        k = back[i][j - lo]
        if k < 0:  # cannot happen: (n, m) is always reachable through skips
            raise RuntimeError(f"alignment traceback failed at ({i}, {j})")
        a, b = MOVES[k]
        if a and b:
            c = cover(s1[i - 1] if a == 1 else s2[i - 1], t1[j - 1] if b == 1 else t2[j - 1])
            if c >= keep:
                e = edge_score(src[i - a : i], tgt[j - b : j])
                if e >= edge_keep:
                    beads.append(Bead(tuple(range(i - a, i)), tuple(range(j - b, j)), sims[i][j - lo], c, e))
        i, j = i - a, j - b
    return beads[::-1]


def _fill(s1: list, s2: list, t1: list, t2: list, limits: list[tuple[int, int]], threshold: float,
          multi_penalty: float) -> tuple[list[list[int]], list[list[float]]]:
    """The banded dynamic programme: best move into each cell (back) and its similarity (sims)."""
    neg = float("-inf")
    score: list[list[float]] = []
    back: list[list[int]] = []
    sims: list[list[float]] = []
    for i in range(len(s1) + 1):
        lo, hi = limits[i]
        row, brow, srow = [neg] * (hi - lo + 1), [-1] * (hi - lo + 1), [0.0] * (hi - lo + 1)
        for j in range(lo, hi + 1):
            best, arg, best_sim = (0.0, -1, 0.0) if i == 0 and j == 0 else (neg, -1, 0.0)
            for k, (a, b) in enumerate(MOVES):
                pi, pj = i - a, j - b
                if pi < 0 or pj < 0:
                    continue
                if a == 0:
                    if pj < lo:
                        continue
                    prev = row[pj - lo]
                else:
                    plo, phi = limits[pi]
                    if not plo <= pj <= phi:
                        continue
                    prev = score[pi][pj - plo]
                if prev == neg:
                    continue
                if a == 0 or b == 0:
                    sim, gain = 0.0, 0.0
                else:
                    sa = s1[pi] if a == 1 else s2[i - 1]
                    tb = t1[pj] if b == 1 else t2[j - 1]
                    sim = dice(sa, tb)
                    gain = sim - threshold - (multi_penalty if a + b > 2 else 0.0)
                if prev + gain > best:
                    best, arg, best_sim = prev + gain, k, sim
            row[j - lo], brow[j - lo], srow[j - lo] = best, arg, best_sim
        score.append(row)
        back.append(brow)
        sims.append(srow)
    return back, sims
