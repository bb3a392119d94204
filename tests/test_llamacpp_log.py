"""Reading llama-perplexity's output without llama.cpp: each chunk's mean NLL recovered from the
running estimates it prints, and the paired change (with its standard error) the llama.cpp
benchmark reports against the shipped file."""

from __future__ import annotations

import numpy as np
import pytest

from lmembed.errors import LmembedError
from lmembed.export import llamacpp


def fake_log(chunk_nll: list[float]) -> str:
    """A llama-perplexity log with the running estimates [k]ppl_k (4 decimals, as it prints them)."""
    cum = np.cumsum(chunk_nll) / np.arange(1, len(chunk_nll) + 1)
    line = ",".join(f"[{k}]{np.exp(c):.4f}" for k, c in enumerate(cum, 1))
    return f"perplexity: calculating perplexity over {len(chunk_nll)} chunks, n_ctx=512\n{line}\n" \
           f"Final estimate: PPL = {np.exp(cum[-1]):.4f} +/- 0.1\n"


def test_chunk_nll_recovers_every_chunk_from_the_running_estimates():
    truth = list(np.random.default_rng(0).uniform(2.0, 3.5, size=40))
    got = llamacpp.chunk_nll(fake_log(truth), 40)
    assert got is not None and len(got) == 40
    # 4 printed decimals of ppl_k, multiplied back by k: the error grows with k but stays small
    assert np.abs(np.asarray(got) - truth).max() < 40 * 1e-4 / 10


def test_chunk_nll_is_none_when_the_log_lost_an_estimate():
    log = fake_log([2.5, 2.6, 2.7]).replace("[2]", "[9]")
    assert llamacpp.chunk_nll(log, 3) is None
    assert llamacpp.chunk_nll(fake_log([2.5, 2.6]), 3) is None


def test_paired_delta_is_the_perplexity_change_and_shrinks_with_paired_noise():
    rng = np.random.default_rng(1)
    base = list(rng.uniform(2.0, 3.5, size=50))
    shift = 0.03
    other = [b + shift + e for b, e in zip(base, rng.normal(0, 0.01, size=50), strict=True)]
    pct, se = llamacpp.paired_delta(base, other)
    exact = 100 * np.expm1(np.mean(np.asarray(other) - base))
    assert pct == pytest.approx(exact)
    assert 100 * np.expm1(shift) - 3 * se < pct < 100 * np.expm1(shift) + 3 * se
    # pairing removes the chunk-to-chunk spread of the text itself (uniform 2..3.5), not just noise
    assert se < 0.01 * 100 and se < 100 * np.std(base) / np.sqrt(50) / 10


def test_paired_delta_refuses_unpaired_runs():
    with pytest.raises(LmembedError, match="same chunks"):
        llamacpp.paired_delta([2.0, 2.1, 2.2], [2.0, 2.1])
