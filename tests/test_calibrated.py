"""Calibrated compression: statistics, weighted objectives, and bad calibration input."""

from __future__ import annotations

import pytest
import torch

import lmembed
from conftest import zipf_ids
from lmembed.compression.calibration.calibrate import calibrate
from lmembed.compression.calibration.sensitivity import sensitivity
from lmembed.errors import LmembedError
from tiny_models import V, build


def weighted_error(model_orig, model_comp, stats, side="tied", mix=1.0, floor=0.1, metric=None):
    """Σ_v w_v ΔE_v M ΔE_vᵀ; M = the `mix` metric unless given (wsvd/wae whiten by the sensitivity)."""
    e = model_orig.get_input_embeddings().weight.detach().double()
    ehat = model_comp.get_input_embeddings().dense().double()
    m = stats.column_metric(side, mix=mix) if metric is None else metric
    w = stats.row_weights(side, mix=mix, floor=floor).double()
    diff = e - ehat
    return (w * ((diff @ m) * diff).sum(1)).sum().item()


def test_statistics_shapes_and_determinism(stats):
    again = calibrate(build("llama-tied"), zipf_ids(1024), tokens=1024, window=64, cache=False)
    assert torch.equal(stats.hidden_moment, again.hidden_moment) and torch.equal(stats.out_prob, again.out_prob)
    assert stats.hidden_moment.shape == (32, 32) and torch.allclose(stats.hidden_moment, stats.hidden_moment.t())
    assert stats.out_prob.sum().item() == pytest.approx(1.0, abs=1e-6)  # mean of distributions
    assert stats.in_freq.sum().item() == 1024
    other = calibrate(build("llama-tied"), zipf_ids(1024, seed=1), tokens=1024, window=64, cache=False)
    assert not torch.equal(stats.in_freq, other.in_freq)


def test_statistics_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEMBED_CACHE", str(tmp_path))
    a = calibrate(build("llama-tied"), zipf_ids(512), tokens=512, window=64)
    files = list((tmp_path / "calib").glob("*.pt"))
    assert len(files) == 1
    b = calibrate(build("llama-tied"), zipf_ids(512), tokens=512, window=64)
    assert torch.equal(a.hidden_moment, b.hidden_moment)


@pytest.mark.parametrize("calibrated, plain", [("wsvd:8", "svd:8"), ("wsvd:16", "svd:16"),
                                                ("wae:8:epochs=3", "ae:8:epochs=3"),
                                                ("gptq-int4:g8", "int4:g8"), ("gptq-int3:g16", "int3:g16")])
def test_calibrated_beats_uncalibrated_on_the_weighted_objective(stats, calibrated, plain):
    """Each on the objective it minimises: wsvd/wae the sensitivity H + G with rows floored at
    the mean, gptq the `mix` metric."""
    orig = build("llama-tied")
    a, b = build("llama-tied"), build("llama-tied")
    ra = lmembed.compress(a, calibrated, calib=stats)
    rb = lmembed.compress(b, plain)
    assert ra["stored_bytes"] == rb["stored_bytes"]  # the same budget
    kw = dict(metric=sensitivity(stats, "tied"), floor=1.0) if calibrated.startswith("w") else {}
    assert weighted_error(orig, a, stats, **kw) < 0.97 * weighted_error(orig, b, stats, **kw)


def test_wsvd_is_the_best_rank_k_matrix_for_its_objective(stats):
    """The closed form: undamped, no other rank-k matrix (here: wsvd with another metric, row
    weights or damping, and the plain SVD) has a lower sensitivity-weighted error."""
    orig = build("llama-tied")
    m = sensitivity(stats, "tied")
    errors = {}
    for spec in ("wsvd:8:damp=0", "wsvd:8:damp=0:input=0", "wsvd:8:damp=0:floor=0.1", "wsvd:8:damp=0:input=4",
                 "wsvd:8:damp=0.1", "svd:8"):
        model = build("llama-tied")
        lmembed.compress(model, spec, calib=stats)
        errors[spec] = weighted_error(orig, model, stats, metric=m, floor=1.0)
    best = errors.pop("wsvd:8:damp=0")
    assert all(best < e for e in errors.values()), (best, errors)


def test_mixed_precision_spends_bits_where_they_pay(stats):
    """At int4:g8's budget for codes and scales (6 bits/value) plus its one-byte row map,
    the allocation is at least as good as uniform GPTQ int4 (its own feasible point) and beats
    round-to-nearest; rows that get 8 bits weigh more than rows that get 2 or 3."""
    orig = build("llama-tied")
    mixed, gptq, rtn = build("llama-tied"), build("llama-tied"), build("llama-tied")
    rm = lmembed.compress(mixed, "mixed:6.25:g8:floor=0.01", calib=stats)
    lmembed.compress(gptq, "gptq-int4:g8", calib=stats)
    rr = lmembed.compress(rtn, "int4:g8")
    assert rm["stored_bytes"] <= rr["stored_bytes"] + V  # + the row map, one byte per row
    e_mixed, e_gptq = weighted_error(orig, mixed, stats, floor=0.01), weighted_error(orig, gptq, stats, floor=0.01)
    assert e_mixed <= e_gptq * 1.0001 and e_mixed < weighted_error(orig, rtn, stats, floor=0.01)
    emb = mixed.get_input_embeddings()
    bits = torch.tensor([p.bits for p in emb.parts])[emb.row_class.long()]
    w = stats.row_weights("tied", mix=1.0, floor=0.01)
    if (bits == 8).any() and (bits <= 3).any():
        assert w[bits == 8].mean() > w[bits <= 3].mean()


def test_calibration_from_text_with_tokenizer(tmp_path):
    from conftest import _sentences
    from test_compress import WORDS
    from tiny_models import word_tokenizer

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(_sentences(400, 5)))
    model = build("llama-tied")
    rep = lmembed.compress(model, "gptq-int4:g16", calib=str(text), tokenizer=word_tokenizer(WORDS),
                           calib_tokens=512)
    assert rep["calib"] == {"source": str(text), "tokens": 512}


def test_calibrated_method_without_calibration_or_a_way_to_get_one_is_refused():
    """A causal LM calibrates on its own samples (test_kmixed); an encoder without a tokenizer
    has neither its own text nor a way to read the bundled mix."""
    with pytest.raises(LmembedError, match="cannot sample its own text"):
        lmembed.compress(build("bert-encoder"), "wsvd:8")


@pytest.mark.parametrize("calib, tokens, message", [
    (zipf_ids(100), 512, "100 tokens, fewer than the budget of 512"),
    (torch.tensor([], dtype=torch.long), 16, "empty"),
    (torch.tensor([5, 7, V + 50, 3]), 4, f"id {V + 50} is outside the model's vocabulary 0..{V - 1}"),
])
def test_bad_calibration_input(calib, tokens, message):
    with pytest.raises(LmembedError, match=message):
        calibrate(build("llama-tied"), calib, tokens=tokens, cache=False)


def test_text_calibration_needs_a_tokenizer_and_a_real_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(LmembedError, match="tokenizer is needed"):
        calibrate(build("llama-tied"), str(empty), tokens=16, cache=False)
    from test_compress import WORDS
    from tiny_models import word_tokenizer

    with pytest.raises(LmembedError, match="empty"):
        calibrate(build("llama-tied"), str(empty), tokenizer=word_tokenizer(WORDS), tokens=16, cache=False)


def test_calibration_runs_the_head_in_chunks_with_the_same_statistics():
    """The lean path (the model's head deferred, run by calibration a chunk of positions at a time)
    gives the statistics of the plain forward pass, which is kept for models that transform their
    logits after the head (here forced by a config field the tiny Llama ignores)."""
    from lmembed.compression.calibration import calibrate as C

    ids = torch.randint(0, 300, (3 * 64,), generator=torch.Generator().manual_seed(0))
    model = build("llama-tied")
    lean = C.calibrate(model, ids, tokens=len(ids), window=64, cache=False)
    model.config.logit_scale = 2.0
    assert not C._logits_are_the_heads(model)
    plain = C.calibrate(model, ids, tokens=len(ids), window=64, cache=False)
    torch.testing.assert_close(lean.hidden_moment, plain.hidden_moment)
    torch.testing.assert_close(lean.out_prob, plain.out_prob)
    assert "forward" not in vars(model.get_output_embeddings())  # the head's own forward is back


def _calib_kl(orig, model, stats) -> float:
    h = stats.hidden_sample.float()
    e = orig.get_input_embeddings().weight.detach().float()
    with torch.no_grad():
        target = torch.log_softmax(h @ e.t(), -1)
        got = torch.log_softmax(model.get_input_embeddings().logits(h).float(), -1)
    return torch.nn.functional.kl_div(got, target, log_target=True, reduction="batchmean").item()


@pytest.mark.parametrize("spec, ratio", [("wsvd:8", 0.9), ("wsvd:8:alloc=rows", 0.97), ("int4:g8", 0.9),
                                         ("gptq-int3:g16", 1.0)])
def test_kl_stage_lowers_the_calibration_kl_deterministically(stats, spec, ratio):
    """Factors and log-scales both take relative steps, so the defaults serve every kind (GPTQ's
    codes leave its scales little to gain)."""
    orig = build("llama-tied")
    before, after, again = build("llama-tied"), build("llama-tied"), build("llama-tied")
    lmembed.compress(before, spec, calib=stats)
    lmembed.compress(after, f"{spec} > kl:30", calib=stats, seed=3)
    lmembed.compress(again, f"{spec} > kl:30", calib=stats, seed=3)
    assert _calib_kl(orig, after, stats) < ratio * _calib_kl(orig, before, stats)
    assert torch.equal(after.get_input_embeddings().dense(), again.get_input_embeddings().dense())


def test_a_kl_stage_that_ends_worse_hands_back_its_input(stats):
    """Steps far too large make the fit worse on its own objective; the stage then returns what it
    was given, bit for bit."""
    plain, tuned = build("llama-tied"), build("llama-tied")
    lmembed.compress(plain, "wsvd:8", calib=stats)
    lmembed.compress(tuned, "wsvd:8 > kl:5:flr=3", calib=stats)
    assert torch.equal(tuned.get_input_embeddings().dense(), plain.get_input_embeddings().dense())
