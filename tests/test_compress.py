"""Compression core: modules, methods, ties, save/load round trips on tiny real architectures."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import lmembed
from lmembed.compression import CompressedHead, FactorizedEmbedding, QuantizedEmbedding
from lmembed.compression.formats import quantized as compress_modules
from lmembed.compression.formats.bits import pack_bits, unpack_bits
from lmembed.compression.integration.verify import manifest_digest
from lmembed.compression.registry import parse_pipeline
from lmembed.errors import LmembedError
from tiny_models import ARCHS, D, V, build, inputs


def _logits(model, arch, seed=0):
    with torch.no_grad():
        return model(**inputs(arch, seed)).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["int8", "int4:g16", "svd:8", "svd:12 > int8"])
def test_compress_save_load_identical_logits(arch, method, tmp_path):
    model = build(arch)
    rep = lmembed.compress(model, method, progress=False)
    before = _logits(model, arch)
    lmembed.save(model, tmp_path / "m")
    loaded = lmembed.load(tmp_path / "m")
    assert torch.equal(_logits(loaded, arch), before)
    assert torch.equal(_logits(loaded, arch, seed=1), _logits(model, arch, seed=1))
    assert rep["tied"] == (arch != "llama-untied")
    # a tied model keeps one module on both sides, also after loading
    for m in (model, loaded):
        inp, out = m.get_input_embeddings(), m.get_output_embeddings()
        assert isinstance(out, CompressedHead)
        assert (out.embedding is inp) == (arch != "llama-untied")


def test_t5_shared_embedding_is_one_module_everywhere(tmp_path):
    model = build("t5")
    lmembed.compress(model, "svd:8")
    for m in (model, lmembed.load(lmembed.save(model, tmp_path / "m"))):
        assert m.shared is m.encoder.embed_tokens is m.decoder.embed_tokens is m.lm_head.embedding


@pytest.mark.parametrize("arch", ["llama-tied", "bert", "t5"])
def test_shared_tensors_stored_once(arch, tmp_path):
    model = build(arch)
    lmembed.compress(model, "int4")
    lmembed.save(model, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith(".packed") for k in keys) == 1
    assert sum(k.endswith(".scales") for k in keys) == 1
    manifest = json.loads((tmp_path / "m" / "lmembed.json").read_text())
    assert manifest["embedding_bytes"] == V * D // 2 + V * 2


@pytest.mark.parametrize("method, expected", [
    ("int8", V * D + V * 2),                       # a byte per value + one fp16 scale per row
    ("int4", V * D // 2 + V * 2),                  # two values per byte
    ("int4:g16", V * D // 2 + V * (D // 16) * 2),  # one scale per group of 16
    ("int3", V * D * 3 // 8 + V * 2),              # exactly 3 bits per value
    ("svd:8", (V * 8 + 8 * D) * 4),                # fp32 factors: the paper's V.d / (V.k + k.d)
    ("ae:8:epochs=1", (V * 8 + 8 * D + D) * 4),    # + the decoder bias
    ("svd:8 > int8", V * 8 + V * 2 + 8 * D * 4),   # codes quantised, decoder fp32
])
def test_stored_bytes_exact(method, expected):
    model = build("gpt2")
    rep = lmembed.compress(model, method, progress=False)
    assert rep["stored_bytes"] == expected
    assert rep["ratio"] == pytest.approx(V * D * 4 / expected)


def test_int8_logits_close_to_dense():
    model = build("llama-tied")
    dense = _logits(model, "llama-tied")
    lmembed.compress(model, "int8")
    err = (_logits(model, "llama-tied") - dense).abs().max() / dense.abs().max()
    assert err < 0.01


def test_svd_error_is_the_optimal_tail():
    w = torch.randn(200, 24, generator=torch.Generator().manual_seed(0))
    model = build("gpt2")
    with torch.no_grad():
        model.transformer.wte.weight[:200] = 0
    emb = torch.nn.Embedding.from_pretrained(w, freeze=False)
    model.transformer.wte = emb
    model.lm_head = torch.nn.Linear(24, 200, bias=False)
    model.lm_head.weight = emb.weight
    rep = lmembed.compress(model, "svd:6")
    s = torch.linalg.svdvals(w.double())
    optimal = (s[6:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()).item()
    assert rep["matrices"][0]["rel_fro_error"] == pytest.approx(optimal, rel=1e-4)


def test_ae_from_svd_improves_directions_over_svd():
    """The direction-aware loss trades magnitude error for row directions: on rows of very
    different norms (SVD serves the long ones), training from the SVD solution must raise the
    mean row cosine, while SVD keeps the lower Frobenius error (it is optimal there)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(400, 8, generator=g) @ torch.randn(8, D, generator=g)
    w = (w + 0.5 * torch.randn(400, D, generator=g)) * torch.exp(1.5 * torch.randn(400, 1, generator=g))
    svd = lmembed.compress(_with_matrix(w), "svd:6")["matrices"][0]
    ae = lmembed.compress(_with_matrix(w), "ae:6:init=svd:epochs=8", progress=False)["matrices"][0]
    assert ae["mean_row_cosine"] > svd["mean_row_cosine"] + 0.01
    assert ae["rel_fro_error"] > svd["rel_fro_error"]
    # refit=1 keeps the learned codes and solves for the decoder: magnitudes come back to
    # least squares (between svd's optimum and the plain ae)
    refit = lmembed.compress(_with_matrix(w), "ae:6:init=svd:epochs=8:refit=1", progress=False)["matrices"][0]
    assert svd["rel_fro_error"] - 1e-6 <= refit["rel_fro_error"] < ae["rel_fro_error"]


def _with_matrix(w: torch.Tensor):
    model = build("bert-encoder")
    model.set_input_embeddings(torch.nn.Embedding.from_pretrained(w.clone(), freeze=False))
    return model


def test_same_seed_same_autoencoder_other_seed_differs():
    a = lmembed.compress(build("gpt2"), "ae:4:epochs=2", seed=0)["matrices"][0]["rel_fro_error"]
    b = lmembed.compress(build("gpt2"), "ae:4:epochs=2", seed=0)["matrices"][0]["rel_fro_error"]
    c = lmembed.compress(build("gpt2"), "ae:4:epochs=2", seed=1)["matrices"][0]["rel_fro_error"]
    assert a == b != c


@pytest.mark.parametrize("method", ["int8", "int3:g8", "svd:5", "svd:9 > int4"])
def test_logits_match_lookup_without_materialising(method, monkeypatch):
    """logits(h) (chunked / through the factors) equals h @ dense().T, also across chunk borders."""
    monkeypatch.setattr(compress_modules, "LOGIT_CHUNK", 37)
    model = build("gpt2")
    lmembed.compress(model, method)
    emb = model.get_input_embeddings()
    h = torch.randn(3, 5, D)
    assert torch.allclose(emb.logits(h), h @ emb.dense().t(), atol=1e-4)
    ids = torch.tensor([[0, 5, V - 1]])
    assert torch.allclose(emb(ids)[0], emb.dense()[ids[0]])


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 8]), rows=st.integers(1, 5), n=st.integers(1, 41), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(bits, rows, n, seed):
    q = torch.randint(0, 1 << bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape[1] == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), q.to(torch.int32))


def test_pack_bits_layout_is_the_same_on_every_path(monkeypatch):
    """4-bit codes take a nibble fast path and tall matrices are packed in row chunks: the
    bytes must equal the plain per-bit layout (low bits first), or saved files would differ."""
    mod = importlib.import_module("lmembed.compression.formats.bits")

    q = torch.randint(0, 16, (7, 13), generator=torch.Generator().manual_seed(0))
    bits = ((q.unsqueeze(-1) >> torch.arange(4)) & 1).reshape(7, -1)
    ref = (torch.nn.functional.pad(bits, (0, 4)).reshape(7, -1, 8) << torch.arange(8)).sum(-1).to(torch.uint8)
    assert torch.equal(pack_bits(q, 4), ref)
    q3 = torch.randint(0, 8, (7, 13), generator=torch.Generator().manual_seed(1))
    whole = pack_bits(q3, 3)
    monkeypatch.setattr(mod, "PACK_ROWS", 2)
    assert torch.equal(pack_bits(q3, 3), whole)


def test_side_input_is_the_papers_protocol_head_stays_dense():
    model = build("llama-tied")
    w = model.get_input_embeddings().weight.detach().clone()
    rep = lmembed.compress(model, "svd:8", side="input")
    assert not rep["tied"] and rep["side"] == "input"
    assert isinstance(model.get_input_embeddings(), FactorizedEmbedding)
    head = model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear) and torch.equal(head.weight, w)


def test_untied_both_sides_get_their_own_modules():
    model = build("llama-untied")
    rep = lmembed.compress(model, "int8")
    assert [m["role"] for m in rep["matrices"]] == ["input", "output"]
    assert model.get_output_embeddings().embedding is not model.get_input_embeddings()
    assert isinstance(model.get_output_embeddings().embedding, QuantizedEmbedding)


def test_generation_runs_and_survives_save_load(tmp_path):
    model = build("llama-tied")
    lmembed.compress(model, "int4:g16")
    ids = torch.tensor([[5, 6, 7]])
    a = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    b = lmembed.load(lmembed.save(model, tmp_path / "m")).generate(ids, max_new_tokens=6, do_sample=False,
                                                                   pad_token_id=0)
    assert a.shape == (1, 9) and torch.equal(a, b)


def test_tie_weights_after_compression_is_harmless():
    model = build("llama-tied")
    lmembed.compress(model, "svd:8")
    model.tie_weights()
    assert model.get_output_embeddings().embedding is model.get_input_embeddings()


def test_lmembed_lstm_run_compresses_and_round_trips(tiny_corpus, tmp_path):
    cfg = lmembed.make_config("lstm", "tiny", data=str(tiny_corpus), tie="tied", epochs=1)
    lmembed.train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    model, tok, _ = lmembed.load_run(tmp_path / "run")
    lmembed.compress(model, "svd:8")
    assert model.head.out.embedding is model.embedding
    x = torch.randint(0, tok.vocab_size, (2, 7))
    with torch.no_grad():
        a = model(x)[0]
        b = lmembed.load(lmembed.save(model, tmp_path / "c", tokenizer=tok))(x)[0]
    assert torch.equal(a, b)


# --- bad input: one clear line each ------------------------------------------------------------
@pytest.mark.parametrize("method, message", [
    ("svd:32", "rank 32 must be in 1..31"),
    ("svd:0", "must be a positive integer"),
    ("ae:-3", "must be a positive integer"),
    ("zip:4", "unknown method 'zip'; expected one of"),
    ("svd", "missing rank"),
    ("int4:g64", "group size 64 exceeds the embedding dimension 32"),
    ("ae:8:foo=1", "unknown option 'foo'"),
    ("svd:8 > > int8", "empty stage"),
    ("svd:8 > int9", "stage 2 ('int9')"),
])
def test_bad_methods_are_one_line_errors(method, message):
    with pytest.raises(LmembedError) as e:
        lmembed.compress(build("gpt2"), method)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(LmembedError, match="unknown method 'bogus'; expected one of ae, ") as e:
        parse_pipeline("bogus")
    listed = str(e.value).split("expected one of ")[1].split(", ")
    assert {"ae", "int4", "int8", "svd"} <= set(listed) and listed == sorted(listed)


def test_model_without_input_embeddings():
    class NoEmb(torch.nn.Module):
        def get_input_embeddings(self):
            return None

    with pytest.raises(LmembedError, match="no input embeddings"):
        lmembed.compress(NoEmb(), "int8")


def test_compressing_twice_is_refused():
    model = build("gpt2")
    lmembed.compress(model, "int8")
    with pytest.raises(LmembedError, match="already compressed"):
        lmembed.compress(model, "int4")


@pytest.fixture
def saved(tmp_path):
    model = build("gpt2")
    lmembed.compress(model, "svd:8")
    return lmembed.save(model, tmp_path / "m")


def test_truncated_weights_file(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(LmembedError, match="corrupt or truncated safetensors"):
        lmembed.load(saved)


def test_manifest_that_does_not_match_tensors(saved):
    m = json.loads((saved / "lmembed.json").read_text())
    m["modules"][0]["spec"]["rank"] = 9  # inconsistent with its own codes
    m["manifest_sha256"] = manifest_digest(m)  # a consistent manifest that is wrong: the deeper checks
    (saved / "lmembed.json").write_text(json.dumps(m))
    with pytest.raises(LmembedError, match=r"lmembed.json: module entry 0: .*malformed"):
        lmembed.load(saved)
    m["modules"][0]["spec"]["codes"]["embedding_dim"] = 9  # consistent, but not what was saved
    m["manifest_sha256"] = manifest_digest(m)
    (saved / "lmembed.json").write_text(json.dumps(m))
    with pytest.raises(LmembedError, match="does not match the tensors in model.safetensors"):
        lmembed.load(saved)


def test_missing_manifest_and_overwrite_refused(saved, tmp_path):
    (saved / "lmembed.json").unlink()
    with pytest.raises(LmembedError, match="lmembed.json: lmembed manifest .* not found"):
        lmembed.load(saved)
    model = build("gpt2")
    lmembed.compress(model, "int8")
    with pytest.raises(LmembedError, match="not empty; pass --force"):
        lmembed.save(model, saved)
    with pytest.raises(LmembedError, match="lmembed did not write"):  # no manifest: nothing says these are ours
        lmembed.save(model, saved, force=True)
    assert copy.copy(lmembed.save(model, tmp_path / "fresh")) == tmp_path / "fresh"


# --- CLI and bench ------------------------------------------------------------------------------
WORDS = "the cat a dog bird my friend teacher child sees likes finds follows calls helps ball tree house river book " \
        "garden .".split()


def _text(tmp_path):
    from conftest import _sentences

    p = tmp_path / "text.txt"
    p.write_text("\n".join(_sentences(300, 3)) + "\n")
    return p


def test_cli_compress_writes_loadable_folder_and_refuses_overwrite(tmp_path, capsys):
    from lmembed.cli import main
    from tiny_models import save_folder

    folder = save_folder("gpt2", tmp_path / "gpt2", WORDS)
    out = tmp_path / "out"
    argv = ["compress", str(folder), "--method", "int8", "--out", str(out), "--eval-text", str(_text(tmp_path)),
            "--no-progress"]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["eval"]["metric"] == "ppl" and abs(rep["eval"]["delta_pct"]) < 1.0
    assert "3.76x smaller" in capsys.readouterr().out
    model = lmembed.load(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the cat sees a dog")["input_ids"][:2] == [3, 4]
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    assert main(argv) == 2 and "not empty; pass --force" in capsys.readouterr().err
    # calibrated methods take --calib; without it they say so in one line
    cal = ["compress", str(folder), "--method", "gptq-int4:g8", "--out", str(tmp_path / "cal"), "--no-progress"]
    assert main([*cal, "--calib-tokens", "64"]) == 0  # no --calib: calibrated on text sampled from the model
    assert "calibrate: 64 tokens of model, seed 0" in capsys.readouterr().err
    assert main([*cal, "--calib", str(_text(tmp_path)), "--calib-tokens", "64", "--force"]) == 0
    assert lmembed.load(tmp_path / "cal").get_input_embeddings().bits == 4


def test_bench_compress_table_resume_and_bad_methods(tmp_path, capsys):
    from lmembed.bench.compress import bench_compress
    from tiny_models import save_folder

    folder = save_folder("llama-tied", tmp_path / "llama", WORDS)
    text = str(_text(tmp_path))
    kw = dict(text=text, methods="int8,svd:8,ae:8:epochs=1", max_tokens=600, progress=False, log=lambda s: None)
    res = bench_compress(str(folder), tmp_path / "b", **kw)
    rows = {(r["method"], r["side"]): r for r in res["rows"]}
    methods = ("int8", "svd:8", "ae:8:epochs=1")
    assert set(rows) == {("dense", "-")} | {(m, s) for m in methods for s in ("input", "both")}
    # the paper's protocol keeps a dense head: fewer bytes saved than the honest tied one
    assert rows[("svd:8", "input")]["stored_bytes"] > rows[("svd:8", "both")]["stored_bytes"]
    assert rows[("int8", "both")]["ratio"] == pytest.approx(V * D * 4 / (V * D + 2 * V))
    assert abs(rows[("int8", "both")]["delta_pct"]) < 1.0
    # the same fit serves both protocols
    assert rows[("ae:8:epochs=1", "input")]["rel_fro_error"] == rows[("ae:8:epochs=1", "both")]["rel_fro_error"]
    for f in ("compress.json", "compress.md", "compress.png"):
        assert (tmp_path / "b" / f).stat().st_size > 100
    # resume: finished rows are read back, not recomputed
    row_file = next((tmp_path / "b" / "rows").glob("int8--both-*.json"))
    data = json.loads(row_file.read_text())
    data["metric"] = 123.0
    row_file.write_text(json.dumps(data))
    res2 = bench_compress(str(folder), tmp_path / "b", **kw)
    assert [r["metric"] for r in res2["rows"] if r["method"] == "int8" and r["side"] == "both"] == [123.0]
    with pytest.raises(LmembedError, match="rank 40 must be in 1..31"):
        bench_compress(str(folder), tmp_path / "c", **{**kw, "methods": "int8,svd:40"})
    assert not (tmp_path / "c" / "rows" / "dense.json").exists()  # refused before any work
