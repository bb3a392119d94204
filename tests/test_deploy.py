"""Compressed models where users run them: the packed-code kernel, plain transformers folders for
vocabulary-only compression, transformers' own door (the registered quantizer), `lmembed export`,
and loud failures wherever plain transformers cannot represent a save."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import lmembed
from lmembed.cli import main
from lmembed.compression.formats import kernels
from lmembed.compression.methods.quantize import quantize_rows
from lmembed.errors import LmembedError
from lmembed.export.hf import export_hf
from tiny_models import ARCHS, V, build, inputs, word_tokenizer

WORDS = "the cat a dog bird my friend teacher child sees likes finds follows calls helps ball tree house .".split()
CORPUS = ["the cat sees a dog .", "my friend likes the ball .", "a child finds the tree ."]
TEXT = "the dog likes the cat . a child sees my friend ."


def _logits(model, **kw):
    with torch.no_grad():
        return model(**kw).logits


# --- the packed-code kernel -------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group, grid", [(8, 40, "int"), (8, 8, "int"), (4, 8, "int"), (4, 40, "half"),
                                               (4, 32, "int"), (8, 32, "half"), (3, 8, "int"), (2, 16, "half"),
                                               (5, 40, "int")])
def test_kernel_logits_equal_the_dequantised_matrix(bits, group, grid):
    torch.manual_seed(bits * 100 + group)
    d = 64 if group == 32 else 40  # int4 in whole 32s takes the in-place path
    w = torch.randn(300, d)
    q = quantize_rows(w, bits, group, grid)
    dense = q.dense()
    if kernels.library() is None:
        pytest.skip("no C compiler: the kernel is optional")
    shift = (0.5 if grid == "half" else 0.0) - (1 << (bits - 1))
    for m in range(1, kernels.KERNEL_MAX_ROWS + 1):  # decoding: codes read row by row
        h = torch.randn(m, d)
        fast = kernels.packed_logits(q.packed, q.scales, h, bits=bits, group=group, shift=shift)
        assert torch.allclose(fast, h @ dense.t(), rtol=1e-5, atol=1e-5)
        assert torch.equal(q.logits(h), fast)  # the module takes it for few rows
    decoded = kernels.decode(q.packed, q.scales, d, bits=bits, group=group, shift=shift)
    assert torch.equal(decoded, dense)  # a prompt: the compiled decoder gives the PyTorch path's values exactly
    h = torch.randn(kernels.KERNEL_MAX_ROWS + 5, d)
    assert kernels.packed_logits(q.packed, q.scales, h, bits=bits, group=group, shift=shift) is None
    assert torch.allclose(q.logits(h), h @ dense.t(), rtol=1e-5, atol=1e-5)


def test_kernel_steps_aside_for_gradients_and_when_disabled(monkeypatch):
    q = quantize_rows(torch.randn(50, 16), 4, 8)
    h = torch.randn(2, 16, requires_grad=True)
    assert kernels.packed_logits(q.packed, q.scales, h, bits=4, group=8, shift=-8.0) is None
    q.logits(h).sum().backward()  # the PyTorch path keeps autograd
    assert h.grad is not None and h.grad.abs().sum() > 0
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setenv("LMEMBED_KERNELS", "0")
    assert kernels.library() is None and q.logits(h.detach()).shape == (2, 50)


# --- vocabulary-only compression is a plain transformers folder ----------------------------------------
PLAIN_LOAD = """
import json, sys, torch, transformers as tf
folder, ids_path, out_path = sys.argv[1:4]
model = getattr(tf, json.load(open(folder + "/config.json"))["architectures"][0]).from_pretrained(folder)
tok = tf.AutoTokenizer.from_pretrained(folder)
ids = torch.tensor([tok(open(ids_path).read(), add_special_tokens=False)["input_ids"]])
kw = {"decoder_input_ids": ids} if "T5" in type(model).__name__ else {}
with torch.no_grad():
    torch.save({"ids": ids, "logits": model(input_ids=ids, **kw).logits}, out_path)
assert not any(m.startswith("lmembed") for m in sys.modules), "lmembed was imported"
"""


def _plain_process(folder: Path, tmp_path: Path) -> dict:
    (tmp_path / "text.txt").write_text(TEXT)
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), str(tmp_path / "text.txt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-1500:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2", "bert"])
def test_trimmed_save_loads_in_plain_transformers_with_the_same_logits(arch, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    model, tok = build(arch), word_tokenizer(WORDS)
    rep = lmembed.compress(model, f"trim:{corpus}", tokenizer=tok)
    folder = lmembed.save(model, tmp_path / "trimmed", tokenizer=rep.pop("tokenizer"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    plain = _plain_process(folder, tmp_path)
    ours = _logits(lmembed.load(folder), input_ids=plain["ids"])
    assert plain["logits"].shape[-1] == rep["vocab"]["kept"] < V
    assert torch.equal(plain["logits"], ours)


def test_compressed_save_fails_loudly_in_plain_transformers(tmp_path):
    model = build("llama-tied")
    lmembed.compress(model, "int4:g16")
    folder = lmembed.save(model, tmp_path / "q", tokenizer=word_tokenizer(WORDS))
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), str(tmp_path / "x"), str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode != 0 and "ignore_mismatched_sizes" in res.stderr  # never a random embedding
    assert "lmembed.import_lmembed_before_from_pretrained" in res.stderr  # the report says what to do
    assert "lmembed" in json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]


# --- transformers' own door ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_returns_the_compressed_model_and_round_trips(arch, tmp_path):
    model = build(arch)
    lmembed.compress(model, "svd:8 > int8")
    folder = lmembed.save(model, tmp_path / "m")
    cls = getattr(tf, type(model).__name__)
    ref = _logits(lmembed.load(folder), **inputs(arch))
    hf = cls.from_pretrained(folder)
    assert torch.equal(_logits(hf, **inputs(arch)), ref)
    head = hf.get_output_embeddings()
    assert (head.embedding is hf.get_input_embeddings()) == (arch != "llama-untied")  # tied stays one module
    hf.save_pretrained(tmp_path / "again")
    assert torch.equal(_logits(cls.from_pretrained(tmp_path / "again"), **inputs(arch)), ref)
    bf = cls.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    out = _logits(bf, **inputs(arch))
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=0.1, rtol=0.05)


# --- lmembed export --format hf ------------------------------------------------------------------------
def test_export_writes_a_plain_folder_of_the_reconstruction(tmp_path, capsys):
    model = build("llama-tied")
    lmembed.compress(model, "int4:g16")
    folder = lmembed.save(model, tmp_path / "q", tokenizer=word_tokenizer(WORDS))
    ours = _logits(lmembed.load(folder), input_ids=word_tokenizer(WORDS)(TEXT, return_tensors="pt")["input_ids"])
    out = tmp_path / "exported"
    assert main(["export", str(folder), "--out", str(out)]) == 0
    plain = _plain_process(out, tmp_path)
    assert torch.allclose(plain["logits"], ours, atol=1e-5, rtol=1e-5)
    assert main(["export", str(folder), "--out", str(out)]) == 2  # exists: needs --force
    assert "--force" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(folder), "--out", str(out), "--force", "--dtype", "bfloat16"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # a user's file survives --force
    half = tf.LlamaForCausalLM.from_pretrained(out)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_export_refuses_what_it_cannot_write(tmp_path, tiny_corpus):
    with pytest.raises(LmembedError, match="lmembed manifest"):
        export_hf(tmp_path, tmp_path / "o")
    run = tmp_path / "run"
    lmembed.train(lmembed.make_config("lstm", "tiny", data=str(tiny_corpus), epochs=1), run, log=lambda s: None)
    model, tok, _ = lmembed.load_run(run)
    lmembed.compress(model, "int8")
    lmembed.save(model, tmp_path / "run-int8", tokenizer=tok)
    with pytest.raises(LmembedError, match="an lmembed run, not a transformers model"):
        export_hf(tmp_path / "run-int8", tmp_path / "o")


@pytest.mark.parametrize("method", ["int8", "svd:8 > int4:g8", "mixed:4.5:g16", "wsvd:8", "wsvd:8:alloc=rows",
                                    "kq4:g16", "tc:5", "groupreduce:8:2:corpus={corpus}", "trim:{corpus} > int8"])
def test_every_module_kind_saves_loads_and_opens_through_transformers(method, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 5) + "\n")
    model, tok = build("llama-tied"), word_tokenizer(WORDS)
    calib = torch.arange(3, 300).repeat(8) if method.split(":")[0] in ("mixed", "wsvd", "tc") else None
    rep = lmembed.compress(model, method.format(corpus=corpus), tokenizer=tok, calib=calib, calib_tokens=2048)
    folder = lmembed.save(model, tmp_path / "m", tokenizer=rep.pop("tokenizer", tok))
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, input_ids=ids)
    assert torch.equal(_logits(lmembed.load(folder), input_ids=ids), ref)
    assert torch.equal(_logits(tf.LlamaForCausalLM.from_pretrained(folder), input_ids=ids), ref)
