"""llama.cpp block types written by lmembed: every integer type packed as the gguf package (a port of
ggml's decoders) reads it back, calibrated rounding lowering the calibrated cost of each type, the
budget choosing within the budget, GGUF inputs that are malformed refused in one line."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmembed.errors import LmembedError
from lmembed.export import compress_gguf, read_token_embd
from lmembed.export.block_fit import encode_matrix, fit_rows
from lmembed.export.blocks import BLOCK_TYPES, Coded, decode_matrix, pack
from lmembed.export.calibrated_blocks import (
    Metric,
    budget_types,
    calibrated_rows,
    choose_type,
    damped,
    plain_costs,
    row_costs,
)
from lmembed.export.gguf_file import GGUFFile
from tiny_gguf import write_gguf as write_tiny

gguf = pytest.importorskip("gguf")
quiet = {"log": lambda s: None}
INTEGER = [name for name, t in BLOCK_TYPES.items() if t.integer]


def rows_and_metric(v: int = 48, n: int = 256, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Rows with an outlier column and an anisotropic metric (eigenvalues over 3 decades), as the
    hidden states of a trained model give."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(v, n, generator=g) * 0.05 * torch.linspace(0.3, 2, v)[:, None]
    x[:, 3] *= 6
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return x.numpy(), damped((q * torch.logspace(0, -3, n, dtype=torch.float64)) @ q.t())


@pytest.mark.parametrize("name", INTEGER)
def test_packed_blocks_decode_as_lmembed_computes_them(name):
    t = BLOCK_TYPES[name]
    x, _ = rows_and_metric(n=512 if t.kbits else 96)
    c = fit_rows(torch.from_numpy(x), t)
    data = pack(c)
    assert data.dtype == np.uint8 and data.shape == (len(x), t.row_bytes(x.shape[1]))
    assert np.array_equal(decode_matrix(data, name, x.shape[1]), c.values().numpy())  # bit for bit
    err = ((c.values().numpy() - x) ** 2).mean() / (x**2).mean()
    assert err < {2: 0.15, 3: 0.05, 4: 0.015, 5: 0.005, 6: 0.0015, 8: 2e-4}[t.bits or t.kbits]


def test_every_code_and_parameter_lands_where_ggml_reads_it():
    """Random codes and integer parameters over each type's whole range (not only those a fit
    produces), so every bit position of every layout is exercised."""
    g = torch.Generator().manual_seed(1)
    for name in INTEGER:
        t = BLOCK_TYPES[name]
        rows, n = 8, 512
        lo, hi = t.code_range
        q = torch.randint(lo, hi + 1, (rows, n), generator=g, dtype=torch.int16)
        blocks = n // t.block
        d = (torch.rand(rows, blocks, generator=g) - 0.3).half().float()
        m = (torch.rand(rows, blocks, generator=g) - 0.5).half().float() if t.affine else None
        sc = mn = None
        if t.kbits:
            slo, shi = t.sub_range
            sc = torch.randint(slo, shi + 1, (rows, n // t.sub), generator=g)
            mn = torch.randint(slo, shi + 1, (rows, n // t.sub), generator=g) if t.affine else None
        c = Coded(t, q, d, m, sc, mn)
        assert np.array_equal(decode_matrix(pack(c), name, n), c.values().numpy()), name


def test_plain_encoders_of_every_type_rank_by_bits():
    x, _ = rows_and_metric(v=64, n=512)
    err = {name: float(((decode_matrix(encode_matrix(x, name), name, 512) - x) ** 2).mean() / (x**2).mean())
           for name in BLOCK_TYPES}
    assert err["F32"] == 0 and err["Q8_0"] < err["Q6_K"] < err["Q5_K"] < err["Q4_K"] < err["Q3_K"] < err["Q2_K"] < 0.15
    assert err["Q4_K"] < err["Q4_0"] and err["Q5_K"] < err["Q5_0"]
    assert err["IQ4_NL"] < 0.8 * err["Q4_0"]  # the same bytes, levels placed for a block's values


def test_iq4_nl_codes_and_polish_steps_follow_its_levels():
    """IQ4_NL's codes index ggml's non-uniform levels: the nearest level is the nearest code, and
    a code step moves a value by the gap to the next level, not by the scale."""
    t = BLOCK_TYPES["IQ4_NL"]
    levels = np.array(t.lut, dtype=np.float32)
    u = torch.linspace(-140, 130, 1001)
    codes = t.nearest(u).long()
    assert torch.equal(codes, torch.from_numpy(np.abs(u.numpy()[:, None] - levels).argmin(1)))
    from lmembed.export.calibrated_blocks import _steps

    a = torch.full((16,), 0.5)
    plus, minus = _steps(t, a, torch.arange(16, dtype=torch.int16))
    assert torch.allclose(plus[:15], 0.5 * torch.from_numpy(np.diff(levels)))
    assert torch.allclose(minus[1:], -0.5 * torch.from_numpy(np.diff(levels)))


@pytest.mark.parametrize("name", INTEGER)
def test_calibrated_rounding_lowers_the_calibrated_cost_at_each_type(name):
    t = BLOCK_TYPES[name]
    x, metric = rows_and_metric(n=256 if t.kbits else 64)
    data, costs = calibrated_rows(x, name, metric)
    reference = plain_costs(x, name, metric)  # llama.cpp's reference rounding (ours for K-quants)
    assert costs.sum() < 0.75 * reference.sum(), (name, costs.sum() / reference.sum())
    assert (costs <= reference * 1.05 + 1e-12).mean() > 0.9  # row by row, not only on average
    delta = torch.from_numpy(decode_matrix(data, name, x.shape[1]) - x).double()
    assert np.allclose(((delta @ metric.double()) * delta).sum(1).numpy(), costs, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", ["Q4_0", "IQ4_NL"])
def test_polish_with_lazy_gradient_updates_takes_the_steps_of_a_fresh_gradient(name):
    """polish keeps Δ M current within a block of columns and updates the rest once per block;
    the steps must be those of the plain coordinate descent that recomputes Δ M at every column
    (n = 320: three blocks, the last one short)."""
    from lmembed.export.calibrated_blocks import _steps, gptq, polish

    x, metric = rows_and_metric(v=32, n=320)
    met, xt, t = Metric.of(metric), torch.from_numpy(x), BLOCK_TYPES[name]
    start = gptq(xt, fit_rows(xt, t, met.m), met)
    lo, hi = t.code_range
    a = start.scale_offset()[0].repeat_interleave(t.sub, 1)
    ref = Coded(t, start.q.clone(), start.d, start.m, start.sc, start.mn)
    for _ in range(2):
        for j in range(x.shape[1]):
            grad = ((ref.values() - xt) @ met.m)[:, j]
            plus, minus = _steps(t, a[:, j], ref.q[:, j])
            up, down = 2 * plus * grad + plus * plus * met.m[j, j], 2 * minus * grad + minus * minus * met.m[j, j]
            step = torch.where(up < down, 1, -1).to(torch.int16)
            ok = (torch.minimum(up, down) < 0) & (ref.q[:, j] + step >= lo) & (ref.q[:, j] + step <= hi)
            ref.q[:, j] += torch.where(ok, step, 0)
    got = polish(xt, start, met)
    assert (got.q != start.q).sum() > 50  # the descent moved codes
    assert (got.q != ref.q).float().mean() < 1e-3  # float sums in another order may flip a near tie
    assert torch.allclose(row_costs(xt, got, met), row_costs(xt, ref, met), rtol=1e-5)


def test_each_stage_of_the_calibrated_rounding_keeps_or_lowers_a_rows_cost():
    from lmembed.export.calibrated_blocks import calibrated_chunk

    x, metric = rows_and_metric(n=64)
    met = Metric.of(metric)
    xt = torch.from_numpy(x)
    first = row_costs(xt, fit_rows(xt, BLOCK_TYPES["Q4_0"], met.m), met)
    no_polish = calibrated_chunk(xt, BLOCK_TYPES["Q4_0"], met, passes=0)[1]
    full = calibrated_chunk(xt, BLOCK_TYPES["Q4_0"], met)[1]
    assert (no_polish <= first + 1e-12).all() and (full <= no_polish + 1e-12).all()
    assert full.sum() < 0.8 * first.sum()


def test_the_budget_picks_the_cheapest_type_within_it():
    x, metric = rows_and_metric(v=24, n=256)
    w = np.linspace(0.5, 2, 24)
    for bits in (3.5, 5.0, 9.0):
        kind, costs = choose_type(x, w, metric, bits)
        assert set(costs) == set(budget_types(256, bits))
        assert BLOCK_TYPES[kind].bits_per_value <= bits and costs[kind] == min(costs.values())
    assert choose_type(x, w, metric, 4.5)[0] in ("Q4_0", "IQ4_NL", "Q4_K")
    kind, costs = choose_type(x[:, :64], w, metric[:64, :64], 4.5)
    assert kind == "IQ4_NL" and costs["IQ4_NL"] < 0.8 * costs["Q4_0"]  # same bits, lower calibrated cost
    assert choose_type(x, w, metric, 9.0, source_type="Q8_0") == ("Q8_0", {"Q8_0": 0.0})  # copied: cost 0
    assert budget_types(576, 5.0) == ["Q4_1", "Q4_0", "IQ4_NL"]  # no K-quant for rows of 576
    for bad, message in ((2.0, "the smallest is Q2_K (2.625 bits"), (float("nan"), "positive number of bits")):
        with pytest.raises(LmembedError, match=r"^bits") as e:
            budget_types(256, bad)
        assert message in str(e.value) and "\n" not in str(e.value)


# --- whole files: compress_gguf --bits / --gguf-type -------------------------------------------


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf256")
    return {"tied": write_tiny(root / "tied.gguf", dim=256, embd_type="F32"), "root": root}


CALIB = {"calib_tokens": 256, "seed": 0}


def test_bits_writes_a_calibrated_k_quant_and_copies_the_rest(tiny256, tmp_path):
    dst = tmp_path / "b.gguf"
    rep = compress_gguf(tiny256["tied"], None, dst, bits=5.0, **CALIB, **quiet)
    row = rep["tensors"][0]
    assert row["how"] == "calibrated" and BLOCK_TYPES[row["type_after"]].bits_per_value <= 5.0
    assert set(row["candidates"]) == {"Q4_1", "Q4_0", "IQ4_NL", "Q4_K", "Q3_K", "Q2_K"}
    assert row["type_after"] == min(row["candidates"], key=row["candidates"].get)
    assert row["cost"] < row["cost_reference"]
    a, b = GGUFFile(tiny256["tied"]), GGUFFile(dst)
    assert [a.raw(k) for k in a.entries] == [b.raw(k) for k in b.entries]
    for ta in a.tensors:
        tb = b.tensor(ta.name)
        if ta.name != "token_embd.weight":
            assert (ta.ggml, ta.shape) == (tb.ggml, tb.shape) and np.array_equal(a.stored(ta), b.stored(tb))
    rep = compress_gguf(tiny256["tied"], None, tmp_path / "k.gguf", gguf_type="Q3_K", **CALIB, **quiet)
    assert rep["block_types"] == ["Q3_K"] and read_token_embd(tmp_path / "k.gguf")[1] == "Q3_K"
    rep = compress_gguf(tiny256["tied"], None, tmp_path / "f.gguf", bits=32, **CALIB, **quiet)
    assert rep["tensors"][0]["how"] == "copied" and rep["block_types"] == ["F32"]  # the source's own type


def test_kq_super_blocks_are_carried_into_q4_k_exactly(tiny256, tmp_path):
    from lmembed.compression.methods.superblock import quantize_superblock

    dst = tmp_path / "kq.gguf"
    rep = compress_gguf(tiny256["tied"], "kq4:g32", dst, **quiet)
    assert rep["block_types"] == ["Q4_K"] and rep["exact"]
    kq = quantize_superblock(torch.from_numpy(read_token_embd(tiny256["tied"])[0]), 4, 32)  # kq4:g32's defaults
    assert np.array_equal(read_token_embd(dst)[0], kq.dense().numpy())


REFUSED = [
    ("tc:6", {}, "no GGUF block type holds; for a .gguf output use --bits B"),
    ("kq4:g64", {}, "only kq4:g32 and kq5:g32"),
    ("kq3:g32", {}, "only kq4:g32 and kq5:g32"),
    ("kmixed:4", {}, "no GGUF block type holds; for a .gguf output use --bits B"),
    ("wsvd:8:alloc=rows", {}, "no GGUF block type holds; for a .gguf output use --bits B"),
    ("svd:8", {}, "no GGUF block type holds; for a .gguf output use --bits B"),
    ("kq4:g32", {"gguf_type": "Q4_0"}, "fit Q4_K (exact)"),
    ("int4:g32", {"bits": 4.5}, "give a method or bits, not both"),
    (None, {}, "give a method, bits=B"),
    (None, {"bits": 2.0}, "the smallest is Q2_K"),
    (None, {"bits": 4.5, "gguf_type": "Q5_0"}, "stores 5.5 bits per value, more than bits 4.5"),
]


@pytest.mark.parametrize("method, kw, message", REFUSED, ids=[f"{m}-{sorted(k)}" for m, k, _ in REFUSED])
def test_what_cannot_be_written_is_refused_in_one_line(tiny256, tmp_path, method, kw, message):
    with pytest.raises(LmembedError) as e:
        compress_gguf(tiny256["tied"], method, tmp_path / "out.gguf", **kw, **quiet)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_kq_on_rows_that_are_not_multiples_of_256(tmp_path):
    src = write_tiny(tmp_path / "d32.gguf")
    with pytest.raises(LmembedError, match="Q4_K blocks hold 256 values and token_embd rows have 32"):
        compress_gguf(src, "kq4:g32", tmp_path / "out.gguf", **quiet)


# --- malformed GGUF inputs: one line naming the file and the field -----------------------------


def _patched(src, dst, edit) -> str:
    raw = bytearray(src.read_bytes())
    edit(raw, GGUFFile(src))
    dst.write_bytes(bytes(raw))
    return str(dst)


def _tensor_info_at(raw: bytearray, f: GGUFFile, name: str) -> int:
    """Byte position of a tensor's info record (its name's length field)."""
    needle = struct.pack("<Q", len(name)) + name.encode()
    return bytes(raw).index(needle, f.entries[list(f.entries)[-1]].end)


def _overlap(raw, f):
    a, b = f.tensors[1], f.tensors[2]  # b's data offset set to a's
    pos = _tensor_info_at(raw, f, b.name) + 8 + len(b.name) + 4 + 8 * len(b.shape) + 4
    raw[pos: pos + 8] = struct.pack("<Q", a.offset)


def _zero_dim(raw, f):
    t = f.tensors[1]
    pos = _tensor_info_at(raw, f, t.name) + 8 + len(t.name) + 4
    raw[pos: pos + 8] = struct.pack("<Q", 0)


def _huge_count(raw, f):
    e = f.entries["tokenizer.ggml.tokens"]
    raw[e.value_start - 8: e.value_start] = struct.pack("<Q", 1 << 62)


BAD_INPUTS = [("overlap", _overlap, "share or overlap their data"), ("zero dim", _zero_dim, "a zero dimension"),
              ("2^62 tokens", _huge_count, "entry tokenizer.ggml.tokens: an array of 4,611,686,018,427,387,904")]


@pytest.mark.parametrize("name, edit, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_malformed_gguf_is_refused_in_one_line_naming_the_field(tiny256, tmp_path, name, edit, message):
    bad = _patched(tiny256["tied"], tmp_path / "bad.gguf", edit)
    with pytest.raises(LmembedError) as e:
        GGUFFile(bad)
    assert message in str(e.value) and bad in str(e.value) and "\n" not in str(e.value), str(e.value)
    out = subprocess.run([sys.executable, "-m", "lmembed", "compress", bad, "--bits", "4.5", "--out",
                          str(tmp_path / "o.gguf")], capture_output=True, text=True)
    assert out.returncode != 0 and out.stderr.strip().splitlines() == [f"lmembed: error: {e.value}"]



@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzzed_gguf_metadata_loads_or_is_one_line(tiny256, tmp_path, edits):
    """Any bytes of the header, metadata and tensor infos changed: the reader gives a file whose
    tensors all lie within it, or one LmembedError line naming the file; never another exception."""
    raw = bytearray(tiny256["tied"].read_bytes())
    f = GGUFFile(tiny256["tied"])
    end = f.data_start if hasattr(f, "data_start") else min(t.offset for t in f.tensors)
    for where, value in edits:
        raw[int(where * end)] = value
    bad = tmp_path / "fuzz.gguf"
    bad.write_bytes(bytes(raw))
    try:
        g = GGUFFile(bad)
    except LmembedError as e:
        assert "\n" not in str(e) and str(bad) in str(e), str(e)
        return
    for t in g.tensors:
        assert 0 < t.nbytes and len(np.asarray(g.stored(t)).reshape(-1).view(np.uint8)) == t.nbytes

def test_export_of_a_gguf_file_says_what_to_do(tiny256, tmp_path):
    out = subprocess.run([sys.executable, "-m", "lmembed", "export", str(tiny256["tied"]), "--format", "hf", "--out",
                          str(tmp_path / "plain")], capture_output=True, text=True)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and "a GGUF file, not an lmembed save" in lines[0]
    assert "--bits B --out NEW.gguf" in lines[0] and not (tmp_path / "plain").exists()
