"""Super-block quantisation (`kqB[:gG]`): exact bytes, save/load, the two roles, the fit itself."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

import lmembed
from lmembed.compression import CompressedHead, FactorizedEmbedding
from lmembed.compression.formats import superblock as sb
from lmembed.compression.formats.base import build_module
from lmembed.compression.formats.bits import unpack_bits
from lmembed.compression.formats.superblock import SuperBlockEmbedding, bits_per_value, row_bytes
from lmembed.compression.methods.quantize import quantize_rows
from lmembed.compression.methods.superblock import KQ3, KQ4, quantize_superblock
from lmembed.compression.registry import parse_method, parse_pipeline
from lmembed.errors import LmembedError
from tiny_models import D, V, build, inputs


def heavy_tailed(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Student-t (3 degrees of freedom) values with a few large outliers, like embedding rows."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, dim, generator=g)
    chi = torch.randn(rows, dim, 3, generator=g).pow(2).sum(-1)
    return 0.05 * z / (chi / 3).sqrt()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).sum() / b.pow(2).sum()).item()


def _logits(model, arch, seed=0):
    with torch.no_grad():
        return model(**inputs(arch, seed)).logits


# --- bytes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("dim, group", [(64, 16), (64, 32), (96, 48), (128, 8)])
def test_bits_per_value_is_exactly_the_formula(bits, dim, group):
    """G divides d and the packed rows fill whole bytes: B + 12/G + 32/d, to the bit."""
    m = quantize_superblock(heavy_tailed(5, dim), bits, group)
    assert m.stored_bytes() * 8 == 5 * (bits * dim + 12 * dim // group + 32)
    assert bits_per_value(dim, bits, group) == bits + 12 / group + 32 / dim
    assert {k: t.dtype for k, t in m.tensors().items()} == {"codes": torch.uint8, "subs": torch.uint8,
                                                             "supers": torch.float16}


@pytest.mark.parametrize("bits, dim, group", [(3, 40, 16), (5, 30, 7), (4, 96, 32), (2, 33, 33), (7, 9, 1)])
def test_padded_rows_count_their_padding(bits, dim, group):
    """A short last group and rows that do not fill a byte: each packed row rounds up to whole bytes."""
    w = heavy_tailed(6, dim)
    m = quantize_superblock(w, bits, group)
    groups = math.ceil(dim / group)
    expected = math.ceil(dim * bits / 8) + math.ceil(12 * groups / 8) + 4
    assert row_bytes(dim, bits, group) == expected
    assert m.stored_bytes() == 6 * expected
    assert m.codes.shape == (6, math.ceil(dim * bits / 8)) and m.subs.shape == (6, math.ceil(12 * groups / 8))
    assert m.dense().shape == (6, dim) and rel_err(m.dense(), w) < 0.5 ** bits


@pytest.mark.parametrize("method, expected", [
    ("kq4:g16", V * (D * 4 // 8 + 3 + 4)),      # 16 bytes of codes, 2 x 2 x 6 bits of sub-parameters, 2 fp16
    ("kq4", V * (D * 4 // 8 + 2 + 4)),          # one group of 32: 12 bits of sub-parameters -> 2 bytes
    ("kq3:g8", V * (D * 3 // 8 + 6 + 4)),
    ("svd:8 > kq8:g8", V * (8 + 2 + 4) + 8 * D * 4),  # codes quantised, fp32 decoder
])
def test_stored_bytes_through_compress(method, expected):
    model = build("gpt2")
    rep = lmembed.compress(model, method, progress=False)
    assert rep["stored_bytes"] == expected
    assert rep["ratio"] == pytest.approx(V * D * 4 / expected)


# --- save / load and the two roles -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama-tied", "gpt2", "llama-untied"])
@pytest.mark.parametrize("method", ["kq4:g16", "kq3:g8:search=5:iters=1:refit=1", "svd:12 > kq5:g4"])
def test_save_load_identical_logits(arch, method, tmp_path):
    model = build(arch)
    lmembed.compress(model, method, progress=False)
    before = _logits(model, arch)
    lmembed.save(model, tmp_path / "m")
    loaded = lmembed.load(tmp_path / "m")
    assert torch.equal(_logits(loaded, arch), before)
    assert torch.equal(_logits(loaded, arch, seed=1), _logits(model, arch, seed=1))
    for m in (model, loaded):
        inp, out = m.get_input_embeddings(), m.get_output_embeddings()
        assert isinstance(out, CompressedHead)
        assert (out.embedding is inp) == (arch != "llama-untied")
        core = inp.codes if isinstance(inp, FactorizedEmbedding) else inp
        assert isinstance(core, SuperBlockEmbedding)
    if arch == "llama-tied":  # one stored copy of a tied matrix
        with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
            assert sum(k.endswith(".supers") for k in f.keys()) == 1


def test_spec_rebuilds_an_equal_module():
    m = quantize_superblock(heavy_tailed(20, 48), 5, 16)
    empty = build_module(m.spec())
    assert isinstance(empty, SuperBlockEmbedding)
    assert {k: t.shape for k, t in empty.tensors().items()} == {k: t.shape for k, t in m.tensors().items()}
    empty.load_state_dict(m.state_dict())
    assert torch.equal(empty.dense(), m.dense())
    with pytest.raises(LmembedError) as e:
        build_module({**m.spec(), "bits": 9})
    assert "\n" not in str(e.value)


def test_lookup_and_logits_agree_with_dense(monkeypatch):
    w = heavy_tailed(50, 40, seed=3)
    m = quantize_superblock(w, 4, 16)
    full = m.dense()
    ids = torch.tensor([7, 0, 49, 7, 23])
    assert torch.equal(m.lookup(ids), full[ids])
    assert torch.equal(m(ids.view(1, 5)), full[ids].view(1, 5, 40))
    monkeypatch.setattr(sb, "LOGIT_CHUNK", 7)  # several chunks, the last one short
    h = torch.randn(2, 3, 40)
    torch.testing.assert_close(m.logits(h), h @ full.t(), rtol=1e-5, atol=1e-5)
    assert m.logits(h.bfloat16()).dtype == torch.bfloat16


def test_reconstruction_is_the_documented_formula():
    """x = (D * a_g) * q - (M * b_g), from the stored tensors unpacked independently."""
    dim, group, bits = 24, 8, 3
    m = quantize_superblock(heavy_tailed(9, dim, seed=4), bits, group)
    q = unpack_bits(m.codes, bits, dim).float().view(9, 3, group)
    sub = unpack_bits(m.subs, 6, 6).float()
    assert int(q.max()) <= 2 ** bits - 1 and int(sub.max()) <= 63
    d_row, m_row = m.supers.float().unbind(1)
    x = (d_row[:, None] * sub[:, :3])[..., None] * q - (m_row[:, None] * sub[:, 3:])[..., None]
    torch.testing.assert_close(m.dense(), x.view(9, dim), rtol=0, atol=1e-7)
    assert (m.supers >= 0).all()


# --- the fit ---------------------------------------------------------------------------------------
def test_deterministic_and_seed_independent():
    w = heavy_tailed(64, 32, seed=1)
    a, b = quantize_superblock(w, 4, 16), quantize_superblock(w.clone(), 4, 16)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    m1, m2 = build("gpt2"), build("gpt2")
    lmembed.compress(m1, "kq4:g16", seed=0)
    lmembed.compress(m2, "kq4:g16", seed=123)
    assert torch.equal(_logits(m1, "gpt2"), _logits(m2, "gpt2"))


def test_chunked_fit_equals_one_chunk():
    w = heavy_tailed(70, 32, seed=2)
    a, b = quantize_superblock(w, 3, 8), quantize_superblock(w, 3, 8, chunk=16)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())


def test_beats_rtn_int4_at_no_more_bits():
    """kq4:g32 at d=256 stores 4 + 12/32 + 32/256 = 4.5 bits per value, exactly int4:g32's 4 + 16/32."""
    w = heavy_tailed(400, 256, seed=5)
    kq = quantize_superblock(w, 4, 32)
    rtn = quantize_rows(w, 4, 32)
    assert kq.stored_bytes() <= rtn.stored_bytes()
    assert rel_err(kq.dense(), w) < 0.6 * rel_err(rtn.dense(), w)
    # and kq3:g16 (3.875 bits) is not far behind the 4.5-bit RTN either
    assert rel_err(quantize_superblock(w, 3, 16).dense(), w) < 1.5 * rel_err(rtn.dense(), w)


def test_search_and_refits_lower_the_error():
    w = heavy_tailed(200, 64, seed=6)
    plain = rel_err(quantize_superblock(w, 4, 32, search=0, iters=0, refit=0).dense(), w)
    grid = rel_err(quantize_superblock(w, 4, 32, refit=0).dense(), w)
    full = rel_err(quantize_superblock(w, 4, 32).dense(), w)
    assert full <= grid < plain
    errs = [rel_err(quantize_superblock(w, b, 32).dense(), w) for b in range(2, 9)]
    assert all(x > y for x, y in zip(errs, errs[1:], strict=False))  # every extra bit helps
    assert errs[-1] < 1e-4


def test_special_rows():
    w = heavy_tailed(6, 32, seed=7)
    w[0] = 0.0  # all zero
    w[1] = 0.25  # constant positive
    w[2] = -0.125  # constant negative
    w[3] = w[3].abs() + 0.1  # all positive
    w[4, :16] = 0.0  # one empty group
    w[5] *= 1e4  # large values
    m = quantize_superblock(w, 4, 16)
    out = m.dense()
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(32))
    torch.testing.assert_close(out[1:3], w[1:3], rtol=2e-3, atol=0)
    assert torch.equal(out[4, :16], torch.zeros(16))
    for r in (3, 5):
        assert rel_err(out[r], w[r]) < 0.02


# --- the method grammar and its errors -------------------------------------------------------------
def test_text_forms():
    assert str(KQ4()) == "kq4" and str(KQ4(32)) == "kq4" and str(KQ3(16, refit=1)) == "kq3:g16:refit=1"
    m = parse_method("kq5:g16:search=11:iters=2")
    assert (m.bits, m.group, m.search, m.iters, m.refit) == (5, 16, 11, 2, 4)
    assert [type(p).__name__ for p in parse_pipeline("svd:8 > kq2:g8")] == ["SVD", "KQ2"]
    assert {f"kq{b}" for b in range(2, 9)} <= set(lmembed.compression.method_names())


@pytest.mark.parametrize("bad", [
    lambda: parse_method("kq9"),
    lambda: parse_method("kq1:g8"),
    lambda: parse_method("kq4:g0"),
    lambda: parse_method("kq4:search=-1"),
    lambda: KQ4(group=0),
    lambda: KQ4(iters=1.5),
    lambda: lmembed.compress(build("gpt2"), "kq4:g64"),  # group > d = 32
    lambda: lmembed.compress(build("gpt2"), "svd:8 > kq4:g16"),  # group > the codes' rank
    lambda: quantize_superblock(torch.randn(4, 8), 9, 4),
    lambda: quantize_superblock(torch.randn(4, 8), 1, 4),
    lambda: quantize_superblock(torch.tensor([[1.0, float("nan")]]), 4, 2),
])
def test_bad_arguments_are_one_line_errors(bad):
    with pytest.raises(LmembedError) as e:
        bad()
    assert "\n" not in str(e.value)
