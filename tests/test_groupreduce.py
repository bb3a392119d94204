"""GroupReduce: frequency blocks, rank allocation, weighted error, exact bytes, pipelines, bad input."""

from __future__ import annotations

import pytest
import torch

import lmembed
from lmembed.compression import CompressedHead, FactorizedEmbedding, QuantizedEmbedding
from lmembed.compression.formats import quantized as compress_modules
from lmembed.compression.formats.grouped import GroupedEmbedding
from lmembed.compression.methods.groupreduce import allocate_ranks
from lmembed.errors import LmembedError
from tiny_models import D, V, build, inputs, word_tokenizer

ZIPF = 1000.0 / torch.arange(1, V + 1).float()[torch.randperm(V, generator=torch.Generator().manual_seed(1))]


def _logits(model, arch="llama-tied"):
    with torch.no_grad():
        return model(**inputs(arch)).logits


def _weighted_error(w: torch.Tensor, approx: torch.Tensor, f: torch.Tensor) -> float:
    return ((w - approx).pow(2).sum(1) * (f + 1)).sum().item()


def test_frequent_blocks_get_higher_ranks_within_the_svd_budget():
    model = build("llama-tied")
    lmembed.compress(model, "groupreduce:8:4", freqs=ZIPF)
    emb = model.get_input_embeddings()
    assert isinstance(emb, GroupedEmbedding) and emb.sizes == [75] * 4
    ranks = emb.ranks
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > 8 > ranks[-1]
    assert sum(r * (n + D) for r, n in zip(ranks, emb.sizes, strict=True)) <= 8 * (V + D)
    # block 0 holds the most frequent tokens
    order = emb.order.long()
    assert set(order[:75].tolist()) == set(torch.argsort(-ZIPF)[:75].tolist())


def test_weighted_error_beats_svd_at_the_same_budget():
    """The point of the method: frequent rows are reconstructed better than one global basis does."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(V, D, generator=g) * torch.linspace(2, 0.2, D)
    errs = {}
    for method in ("svd:8", "groupreduce:8:4", "groupreduce:8:1"):
        model = build("bert-encoder")
        model.set_input_embeddings(torch.nn.Embedding.from_pretrained(w.clone(), freeze=False))
        lmembed.compress(model, method, freqs=ZIPF)
        errs[method] = _weighted_error(w, model.get_input_embeddings().dense(), ZIPF)
    assert errs["groupreduce:8:4"] < 0.8 * errs["svd:8"]
    assert errs["groupreduce:8:1"] < errs["svd:8"]  # one block: weighted SVD, same rank


def test_allocation_is_greedy_on_eigenvalue_per_parameter():
    ev = [torch.tensor([9.0, 1.0, 0.5]), torch.tensor([4.0, 3.0, 0.1])]
    # d = 3, n = 3: every rank costs 6 parameters; both blocks start at min_rank 1 (12)
    assert allocate_ranks(ev, [3, 3], 3, 12, 1) == [1, 1]
    assert allocate_ranks(ev, [3, 3], 3, 18, 1) == [1, 2]  # next eigenvalues 1.0 vs 3.0: block 1
    assert allocate_ranks(ev, [3, 3], 3, 24, 1) == [2, 2]
    assert allocate_ranks(ev, [3, 3], 3, 100, 1) == [3, 3]  # capped at min(n, d)
    # a cheaper block wins a smaller eigenvalue: 0.5 / (1 + 3) > 0.6 / (9 + 3)
    assert allocate_ranks([torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.6])], [1, 9], 3, 4 + 12 + 4, 1) == [1, 1]
    assert allocate_ranks([torch.tensor([1.0, 0.5, 0.4]), torch.tensor([1.0, 0.6])], [2, 9], 3, 5 + 12 + 5,
                          1) == [2, 1]


@pytest.mark.parametrize("method, expected", [
    # codes n_b x r_b + decoders r_b x d in fp32, plus the order map (V = 300 ids: uint16)
    ("groupreduce:8:4", lambda rs: sum(r * (75 + D) * 4 for r in rs) + V * 2),
    # int8 codes (+ a fp16 scale per row of each block), fp32 decoders
    ("groupreduce:8:4 > int8", lambda rs: sum(75 * r + 75 * 2 + r * D * 4 for r in rs) + V * 2),
])
def test_stored_bytes_exact(method, expected):
    model = build("gpt2")
    rep = lmembed.compress(model, method, freqs=ZIPF)
    emb = model.get_input_embeddings()
    assert rep["stored_bytes"] == expected(emb.ranks)
    assert rep["ratio"] == pytest.approx(V * D * 4 / rep["stored_bytes"])
    if "int8" in method:
        assert all(isinstance(b, FactorizedEmbedding) and isinstance(b.codes, QuantizedEmbedding) for b in emb.blocks)


@pytest.mark.parametrize("method", ["groupreduce:6:3", "groupreduce:6:3 > int4"])
def test_logits_lookup_and_save_load(method, tmp_path, monkeypatch):
    monkeypatch.setattr(compress_modules, "LOGIT_CHUNK", 37)
    model = build("llama-tied")
    lmembed.compress(model, method, freqs=ZIPF)
    emb = model.get_input_embeddings()
    assert model.get_output_embeddings().embedding is emb  # tied: one module
    h = torch.randn(2, 5, D)
    assert torch.allclose(emb.logits(h), h @ emb.dense().t(), atol=1e-4)
    ids = torch.tensor([[0, 7, V - 1, 7]])
    assert torch.allclose(emb(ids)[0], emb.dense()[ids[0]])
    before = _logits(model)
    loaded = lmembed.load(lmembed.save(model, tmp_path / "m"))
    assert torch.equal(_logits(loaded), before)
    assert isinstance(loaded.get_output_embeddings(), CompressedHead)


def test_counts_from_corpus_option_or_from_a_preceding_trim(tmp_path):
    words = "the cat a dog sees likes ball .".split()
    tok = word_tokenizer(words)
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sees a dog .\nthe dog likes the ball .\nthe cat .\n")
    counts = torch.zeros(V)
    for t in corpus.read_text().split():
        counts[tok.convert_tokens_to_ids(t)] += 1
    a, b = build("gpt2"), build("gpt2")
    lmembed.compress(a, f"groupreduce:4:2:corpus={corpus}", tokenizer=tok)
    lmembed.compress(b, "groupreduce:4:2", freqs=counts)
    assert torch.equal(a.get_input_embeddings().dense(), b.get_input_embeddings().dense())
    c = build("gpt2")
    rep = lmembed.compress(c, f"trim:{corpus} > groupreduce:2:2 > int8", tokenizer=tok)
    emb = c.get_input_embeddings()
    assert emb.kind == "trimmed" and isinstance(emb.inner, GroupedEmbedding)
    assert emb.inner.order[0].item() == rep["tokenizer"].convert_tokens_to_ids("the")  # most frequent first


@pytest.mark.parametrize("method, message", [
    ("groupreduce:32:4", "rank 32 must be in 1..31"),
    ("groupreduce:40:4", "rank 40 must be in 1..31"),
    ("groupreduce:4:301", "301 blocks for 300 rows"),
    ("groupreduce:2:40", "40 blocks at rank >= 1 need more parameters than svd:2"),
    ("groupreduce:8:2:min_rank=9", "min_rank 9 exceeds the average rank 8"),
    ("groupreduce:8", "missing blocks"),
    ("groupreduce:8:2:corpus=/no/such.txt", "no such file or folder"),
])
def test_bad_groupreduce_input(method, message):
    with pytest.raises(LmembedError) as e:
        lmembed.compress(build("gpt2"), method, freqs=ZIPF)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_or_mismatched_frequencies():
    with pytest.raises(LmembedError, match="needs token frequencies: add :corpus=NAME"):
        lmembed.compress(build("gpt2"), "groupreduce:8:2")
    with pytest.raises(LmembedError, match="10 frequencies for 300 rows"):
        lmembed.compress(build("gpt2"), "groupreduce:8:2", freqs=torch.ones(10))
