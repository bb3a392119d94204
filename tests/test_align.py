"""Line alignment (lmembed.data.align) and the Folio/modern text cleaning of data/folio.py."""

from __future__ import annotations

import random

import pytest

from lmembed.data.align import _longest_chain, align_lines, anchors, fold, similarity
from lmembed.data.folio import folio_lines, modern_lines

# Macbeth I.1 rewritten by hand: Folio spelling on the left, modern on the right. The Folio side
# has a stage direction the modern one lacks (index 2), Folio line 5 is two modern lines, and the
# modern side ends with a line the Folio lacks.
FOLIO = [
    "When shall we three meet againe?",
    "In Thunder, Lightning, or in Raine?",
    "Enter Macbeth and Banquo.",
    "When the Hurley-burley's done,",
    "When the Battaile's lost, and wonne",
    "That will be ere the set of Sunne, Where the place?",
    "Vpon the Heath",
]
MODERN = [
    "When shall we three meet again?",
    "In thunder, lightning, or in rain?",
    "When the hurlyburly's done,",
    "When the battle's lost and won.",
    "That will be ere the set of sun.",
    "Where the place?",
    "Upon the heath.",
    "There to meet with Macbeth.",
]


def test_hand_made_example_aligns_exactly():
    beads = align_lines(FOLIO, MODERN)
    assert [(b.src, b.tgt) for b in beads] == [
        ((0,), (0,)), ((1,), (1,)), ((3,), (2,)), ((4,), (3,)), ((5,), (4, 5)), ((6,), (6,))]
    assert all(0.75 <= b.cover <= b.sim + 1e-9 for b in beads)  # cover (a min) <= Dice (a harmonic mean)
    assert beads[4].kind == "1-2"


def test_spelling_folding_makes_variants_equal():
    assert fold("Vpon the Heath") == fold("Upon the heath.")
    assert fold("I come, Gray-Malkin") == fold("I come, gray malkin!")
    assert fold("Haue you had quiet Guard?") == fold("Have you had quiet guard?")
    assert similarity(["againe"], ["again"])[0] > similarity(["againe"], ["against"])[0]


def test_unrelated_lines_are_not_aligned():
    other = ["Now is the winter of our discontent", "Made glorious summer by this son of York;"]
    assert align_lines(FOLIO, other) == []


def test_longest_chain_is_monotone_and_longest():
    pairs = sorted([(0, 0), (1, 5), (2, 1), (3, 2), (4, 3), (5, 4), (5, 9), (6, 6)])
    chain = _longest_chain(pairs)
    assert chain == [(0, 0), (2, 1), (3, 2), (4, 3), (5, 4), (6, 6)]
    assert _longest_chain([(1, 1), (1, 2), (1, 3)]) in ([(1, 1)], [(1, 2)], [(1, 3)])  # one per source line


def test_anchors_are_unique_words_in_order():
    got = anchors(FOLIO, MODERN)
    assert got == sorted(got) and all(i2 > i1 and j2 > j1 for (i1, j1), (i2, j2) in zip(got, got[1:], strict=False))
    assert (6, 6) in got  # "heath" is unique on both sides


def test_synthetic_play_with_insertions_and_deletions():
    """A long text with one-sided passages wider than the band: the anchors (unique words) keep the
    band on the true path, and every line pair is recovered."""
    rng = random.Random(0)
    words = [f"{a}{b}{c}{d}{e}" for a in "bcdfglmnprst" for b in "aeiou" for c in "bdlmnr" for d in "aou"
             for e in "dlmnrst"]
    modern = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 8))) for _ in range(400)]

    def folio(line: str) -> str:  # Folio-like respelling: final e, u -> v
        return " ".join(w + "e" if w.endswith("d") else w.replace("u", "v") for w in line.split())

    src, truth = [], []
    for j, line in enumerate(modern):
        if 100 <= j < 180:  # 80 modern-only lines
            continue
        if j % 50 == 7:  # a Folio-only line
            src.append("Exeunt omnes, flourish of trumpets")
        truth.append((len(src), j))
        src.append(folio(line))
    beads = align_lines(src, modern)
    got = [(b.src[0], b.tgt[0]) for b in beads if b.kind == "1-1"]
    assert got == truth


def test_folio_cleaning_cuts_speakers_and_directions():
    text = ("The Tragedie of Macbeth\n\nActus Primus. Scoena Prima.\n\nThunder and Lightning. Enter three Witches.\n\n"
            "  1. When shall we three meet againe?\nIn Thunder, Lightning, or in Raine?\n"
            "  Lady M. Out damned spot\n   Mist.Page. Why? did you take her in white?\nExeunt.\n")
    got = [t for _, t in folio_lines(text)]
    assert "When shall we three meet againe?" in got
    assert "In Thunder, Lightning, or in Raine?" in got
    assert "Out damned spot" in got and "Why? did you take her in white?" in got
    assert not any(t.startswith(("Actus", "Exeunt")) for t in got)
    assert [n for n, t in folio_lines(text) if t == "In Thunder, Lightning, or in Raine?"] == [8]


def test_modern_cleaning_cuts_speakers_brackets_headings():
    text = ("ACT I.\n\nSCENE I. An open Place.\n\n[Enter three Witches.]\n\nFIRST WITCH.\n"
            "When shall we three meet again?\n"
            "In thunder, lightning, or in rain? [Aside.]\n\n"
            "[Alarum within. Enter King Duncan, Malcolm,\nwith Attendants.]\nDUNCAN.\nWhat bloody man is that?\n\n"
            "[Unclosed direction\n\nHERMIA\nSo will I grow.\n")
    got = [t for _, t in modern_lines(text)]
    assert got == ["When shall we three meet again?", "In thunder, lightning, or in rain?",
                   "What bloody man is that?", "So will I grow."]


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_keep_threshold_filters_on_cover(keep):
    beads = align_lines(FOLIO, MODERN, keep=keep)
    assert all(b.cover >= keep for b in beads)
