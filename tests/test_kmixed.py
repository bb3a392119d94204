"""`kmixed:AVG`: super-block widths per row under a bits budget; calibrated rounding in the kq layout."""

from __future__ import annotations

import math

import pytest
import torch

import lmembed
from lmembed.compression import CompressedHead
from lmembed.compression.calibration.calibrate import calibrate
from lmembed.compression.formats.base import build_module
from lmembed.compression.formats.mixed import MixedSuperBlockEmbedding, kmixed_bytes, map_bits
from lmembed.compression.formats.superblock import row_bytes
from lmembed.compression.methods.kmixed import KMixed
from lmembed.compression.methods.superblock import gptq_superblock, quantize_superblock
from lmembed.compression.registry import parse_method
from lmembed.errors import LmembedError
from tiny_models import D, V, build, inputs


def _logits(model, arch="llama-tied", seed=0):
    with torch.no_grad():
        return model(**inputs(arch, seed)).logits


@pytest.mark.parametrize("method", ["kmixed:5.5:g8", "kmixed:5:g16:choices=2-3-4-6:gptq=1", "kmixed:4.7:g32"])
def test_stored_bytes_are_exact_and_within_budget(stats, method):
    model = build("llama-tied")
    rep = lmembed.compress(model, method, calib=stats)
    emb = model.get_input_embeddings()
    assert isinstance(emb, MixedSuperBlockEmbedding) and isinstance(model.get_output_embeddings(), CompressedHead)
    m = parse_method(method)
    rows, bits = [p.num_embeddings for p in emb.parts], [p.bits for p in emb.parts]
    assert sum(rows) == V and set(bits) <= set(m.choices)
    expect = sum(n * row_bytes(D, b, m.group) for n, b in zip(rows, bits, strict=True))
    expect += math.ceil(V * map_bits(len(rows)) / 8)
    assert emb.stored_bytes() == rep["stored_bytes"] == expect == kmixed_bytes(rows, D, bits, m.group)
    assert emb.row_map.dtype == torch.uint8 and emb.row_map.numel() == math.ceil(V * emb.map_bits / 8)
    assert rep["stored_bytes"] * 8 <= m.avg * V * D  # everything counted, the map included
    per_row = {p.bits: (8 * p.codes.shape[1] + 8 * p.subs.shape[1] + 32) / D for p in emb.parts}
    for b, g in per_row.items():  # B + 12/G + 32/d when G divides d and the rows fill whole bytes
        assert g == row_bytes(D, b, m.group) * 8 / D
        assert g == b + 12 / m.group + 32 / D or (12 * D // m.group) % 8


def test_rows_that_weigh_more_get_more_bits(stats):
    model = build("llama-tied")
    lmembed.compress(model, "kmixed:5:g8:floor=0.01:mix=0", calib=stats)  # the input role: Zipf-skewed counts
    emb = model.get_input_embeddings()
    bits = torch.tensor([p.bits for p in emb.parts])[emb.row_class.long()]
    w = stats.row_weights("tied", mix=0.0, floor=0.01)
    assert bits.min() < bits.max()
    assert w[bits == bits.max()].mean() > w[bits == bits.min()].mean()


def test_lookup_and_logits_match_the_parts(stats):
    model = build("llama-tied")
    lmembed.compress(model, "kmixed:5:g16", calib=stats)
    emb = model.get_input_embeddings()
    full = emb.dense()
    for c, part in enumerate(emb.parts):
        rows = (emb.row_class == c).nonzero().flatten()
        assert torch.equal(full[rows], part.dense())
    h = torch.randn(3, D)
    torch.testing.assert_close(emb.logits(h), h @ full.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama-tied", "llama-untied"])
def test_save_load_round_trip_is_bit_identical(stats, arch, tmp_path):
    model = build(arch)
    lmembed.compress(model, "kmixed:5:g16:choices=2-4-6", calib=stats)
    before = _logits(model, arch)
    lmembed.save(model, tmp_path / "m")
    loaded = lmembed.load(tmp_path / "m")
    assert torch.equal(_logits(loaded, arch), before)
    a, b = model.get_input_embeddings(), loaded.get_input_embeddings()
    assert isinstance(b, MixedSuperBlockEmbedding)
    assert {k: t.shape for k, t in a.tensors().items()} == {k: t.shape for k, t in b.tensors().items()}
    assert all(torch.equal(t, b.tensors()[k]) for k, t in a.tensors().items())
    assert torch.equal(a.row_class, b.row_class)


def test_spec_rebuilds_an_equal_module(stats):
    model = build("llama-tied")
    lmembed.compress(model, "kmixed:5:g16", calib=stats)
    emb = model.get_input_embeddings()
    empty = build_module(emb.spec())
    empty.load_state_dict(emb.state_dict())
    assert torch.equal(empty.dense(), emb.dense())
    for bad in ({"map_bits": 5}, {"num_embeddings": V + 1}, {"parts": []}):
        with pytest.raises(LmembedError) as e:
            build_module({**emb.spec(), **bad})
        assert "\n" not in str(e.value)


def test_calibrated_rounding_lowers_the_metric_error():
    """Same sub-scales and super-scales, codes rounded with error feedback: a lower error in the
    metric (an anisotropic one, like the hidden states' second moment)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 64, generator=g) * 0.05
    a = torch.randn(64, 64, generator=g).double()
    metric = a @ a.t() / 64 + 0.05 * torch.eye(64, dtype=torch.float64)
    plain, calibrated = quantize_superblock(w, 3, 16), gptq_superblock(w, metric, 3, 16)
    assert torch.equal(plain.subs, calibrated.subs) and torch.equal(plain.supers, calibrated.supers)

    def err(m):
        d = (m.dense() - w).double()
        return ((d @ metric) * d).sum().item()

    assert err(calibrated) < 0.9 * err(plain)
    assert torch.equal(gptq_superblock(w, metric, 3, 16).codes, calibrated.codes)  # deterministic


def test_fit_is_deterministic(stats):
    a, b = build("llama-tied"), build("llama-tied")
    lmembed.compress(a, "kmixed:5:g8:gptq=1", calib=stats)
    lmembed.compress(b, KMixed(5.0, group=8, gptq=True), calib=stats)
    assert torch.equal(_logits(a), _logits(b))


@pytest.mark.parametrize("bad", [
    lambda s: parse_method("kmixed:2"),  # not above the narrowest width
    lambda s: parse_method("kmixed:4:choices=1-4"),  # widths outside 2..8
    lambda s: parse_method("kmixed:4:g0"),
    lambda s: lmembed.compress(build("llama-tied"), "kmixed:4:g64", calib=s),  # group > d
    lambda s: lmembed.compress(build("llama-tied"), "kmixed:4.5:g8", calib=s),  # below 2 + 12/8 + 32/32 + map
    lambda s: lmembed.compress(build("bert-encoder"), "kmixed:5"),  # cannot sample its text, no tokenizer for mix
    lambda s: KMixed(5.0, choices=(3, 9)),
])
def test_bad_arguments_are_one_line_errors(stats, bad):
    with pytest.raises(LmembedError) as e:
        bad(stats)
    assert "\n" not in str(e.value)


# --- the default calibration: text sampled from the model itself ------------------------------------
def test_default_calibration_samples_the_model_deterministically():
    """A calibrated method given no calibration samples text from the model (seeded): same seed, same
    statistics and same compressed model; another seed, other samples."""
    from lmembed.compression.calibration.calibrate import SOURCES

    model = build("llama-tied")
    a = calibrate(model, "model", tokens=512, cache=False, seed=3)
    b = calibrate(model, "model", tokens=512, cache=False, seed=3)
    c = calibrate(model, "model", tokens=512, cache=False, seed=4)
    assert a.source == "model" and a.tokens == 512 and "model" in SOURCES
    assert torch.equal(a.hidden_moment, b.hidden_moment) and torch.equal(a.in_freq, b.in_freq)
    assert torch.equal(a.out_prob, b.out_prob)
    assert not torch.equal(a.hidden_moment, c.hidden_moment)
    # the input counts are the expected ones: every sampled position spreads one unit over the vocabulary
    assert a.in_freq.sum().item() == pytest.approx(512, rel=1e-6) and bool((a.in_freq > 0).all())
    assert a.out_prob.sum().item() == pytest.approx(1.0, rel=1e-6)
    reps = []
    for _ in range(2):
        m = build("llama-tied")
        reps.append((lmembed.compress(m, "kmixed:5:g16", calib_tokens=512, seed=3), _logits(m)))
    assert reps[0][0]["calib"] == {"source": "model", "tokens": 512}
    assert torch.equal(reps[0][1], reps[1][1])


def test_mix_calibration_reads_the_bundled_corpora():
    pytest.importorskip("gensim")
    from test_compress import WORDS
    from tiny_models import word_tokenizer

    tok = word_tokenizer(WORDS)
    mixed = calibrate(build("llama-tied"), "mix", tokenizer=tok, tokens=256, window=64, cache=False)
    assert mixed.source == "mix" and mixed.tokens == 256 and mixed.in_freq.sum().item() == 256


@pytest.mark.parametrize("method", ["kmixed:5:g16", "mixed:5:g8"])
def test_fit_in_row_chunks_matches_the_whole_matrix_fit(stats, method, monkeypatch):
    """Widths are chosen a chunk of rows at a time and each row is refitted at its width (so no
    width's candidate is ever held whole): rows are independent, so the result is the same."""
    from lmembed.compression.methods import mixed

    whole = build("llama-tied")
    lmembed.compress(whole, method, calib=stats)
    monkeypatch.setattr(mixed, "FIT_ROWS", 64)
    chunked = build("llama-tied")
    lmembed.compress(chunked, method, calib=stats)
    a, b = whole.get_input_embeddings(), chunked.get_input_embeddings()
    assert a.stored_bytes() == b.stored_bytes() and len(a.parts) == len(b.parts)
    same = (a.dense() == b.dense()).all(1).float().mean().item()
    assert same >= 0.99, same  # equal up to a rare rounding tie decided differently by a BLAS kernel


def test_superblock_logits_follow_a_reloaded_state():
    """The decoded group scales are kept between calls; loading other tensors in place re-decodes."""
    a, b = quantize_superblock(torch.randn(V, D) * 0.05, 4, 16), quantize_superblock(torch.randn(V, D), 4, 16)
    h = torch.randn(2, D)
    torch.testing.assert_close(a.logits(h), h @ a.dense().t(), rtol=1e-4, atol=1e-4)
    a.load_state_dict(b.state_dict())  # copied into the same storage
    torch.testing.assert_close(a.logits(h), h @ b.dense().t(), rtol=1e-4, atol=1e-4)
