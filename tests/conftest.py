"""Shared fixtures: small real-looking corpora written to temp dirs, and CPU-only settings."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Corpus caches of bundled corpora go to a per-session temp dir, not ~/.cache."""
    monkeypatch.setenv("LMEMBED_CACHE", str(tmp_path_factory.getbasetemp() / "lmembed-cache"))


def _sentences(n: int, seed: int) -> list[str]:
    """A tiny grammar: learnable structure, so a model's loss must fall if training works."""
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a child"]
    verb = ["sees", "likes", "finds", "follows", "calls", "helps"]
    obj = ["the ball", "a tree", "the house", "the river", "a book", "the garden"]
    return [f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} ." for _ in range(n)]


def write_corpus(root: Path, layout: str = "ptb", n_train: int = 1500, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pattern = {"ptb": "ptb.{}.txt", "wikitext": "wiki.{}.tokens", "plain": "{}.txt"}[layout]
    for i, (split, n) in enumerate((("train", n_train), ("valid", 200), ("test", 200))):
        (root / pattern.format(split)).write_text("\n".join(_sentences(n, seed + i)) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "tiny")


def zipf_ids(n: int, seed: int = 0) -> torch.Tensor:
    """Token ids of the tiny models drawn from a skewed (Zipf-like) distribution, as real text has."""
    from tiny_models import V

    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, V + 1).double()
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g)


@pytest.fixture(scope="module")
def stats():
    """Calibration statistics of the tiny tied Llama on 1,024 Zipf-distributed ids (shared, read-only)."""
    from lmembed.compression.calibration.calibrate import calibrate
    from tiny_models import build

    return calibrate(build("llama-tied"), zipf_ids(1024), tokens=1024, window=64, cache=False)
