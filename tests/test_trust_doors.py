"""Every door that loads a save checks what it loads (lmembed.compression.integration.verify): lmembed.load,
open_model, `lmembed export` and transformers' from_pretrained after `import lmembed`. Tampered
bytes, a consistent but wrong save (the manifest re-signed), files the manifest does not list, a
concurrent re-save: each is one `lmembed: error:` line, or loads exactly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lmembed
from lmembed.common.files import json_bytes
from lmembed.compression.integration import verify
from lmembed.errors import LmembedError
from tiny_models import build, word_tokenizer
from trust_helpers import (
    WORDS,
    flip_tensor_byte,
    logits,
    one_line_error,
    read_safetensors,
    resign,
    tiny_save,
    write_safetensors,
)

IDS = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One int4 save of the tiny tied Llama and its logits; tests tamper with copies."""
    folder = tiny_save(tmp_path_factory.mktemp("doors") / "s")
    return folder, logits(lmembed.load(folder), IDS)


@pytest.fixture
def save(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine[0], tmp_path / "s"))


def _hf_load(folder: Path):
    return tf.LlamaForCausalLM.from_pretrained(folder)


def _edit_quant_config(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["modules"][0]["spec"]["scale"] = 2.0  # same length: a checksum, not a size
    (folder / "config.json").write_bytes(json_bytes(cfg))


# --- 1. the transformers door verifies what lmembed.load verifies --------------------------------
DOOR_TAMPERING = [
    (lambda f: flip_tensor_byte(f / "model.safetensors", "model.embed_tokens.packed"), "checksum mismatch"),
    (lambda f: flip_tensor_byte(f / "model.safetensors", "model.layers.0.mlp.up_proj.weight"), "checksum mismatch"),
    (_edit_quant_config, "config.json: checksum mismatch"),
    (lambda f: (f / "lmembed.json").unlink(), "lmembed.save?) not found"),
    (lambda f: resign(f, lambda m: m["files"].pop("model.safetensors")), "leaves out model.safetensors"),
]


@pytest.mark.parametrize("tamper, message", DOOR_TAMPERING)
def test_the_transformers_door_refuses_what_lmembed_load_refuses(tamper, message, save):
    tamper(save)
    for door in (_hf_load, lmembed.load):
        with pytest.raises(LmembedError) as e:
            door(save)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_the_transformers_door_loads_exactly_and_save_pretrained_records_checksums(pristine, tmp_path):
    folder, ref = pristine
    hf = _hf_load(folder)
    assert torch.equal(logits(hf, IDS), ref)
    hf.save_pretrained(tmp_path / "again")
    manifest = json.loads((tmp_path / "again" / "lmembed.json").read_text())
    assert {"config.json", "model.safetensors"} <= set(manifest["files"])
    assert torch.equal(logits(lmembed.load(tmp_path / "again"), IDS), ref)
    flip_tensor_byte(tmp_path / "again" / "model.safetensors", "model.embed_tokens.scales")
    with pytest.raises(LmembedError, match="checksum mismatch"):
        _hf_load(tmp_path / "again")


# --- 2. a consistent but wrong save: the checks after the checksums -------------------------------
def _rewrite_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    resign(folder)


def _edit_header(folder: Path, edit) -> None:
    header, data = read_safetensors(folder / "model.safetensors")
    edit(header)
    write_safetensors(folder / "model.safetensors", header, data)
    resign(folder)


def _swap_offsets(h: dict, a: str, b: str) -> None:
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]


def _overlap(h: dict) -> None:
    start, end = h["model.embed_tokens.packed"]["data_offsets"]
    h["model.embed_tokens.scales"]["data_offsets"] = [start, start + (end - start) // 8]


RESIGNED = [
    (lambda t: t.update({"model.embed_tokens.scales": t["model.embed_tokens.scales"].bfloat16()}),
     "is bfloat16 [300, 2]; a quantized module stores float16 [300, 2]"),
    (lambda t: t["model.embed_tokens.scales"].__setitem__((5, 1), float("nan")), "holds NaN or inf"),
    (lambda t: t["model.embed_tokens.scales"].__setitem__((7, 0), float("inf")), "holds NaN or inf"),
    (lambda t: t.update({"model.embed_tokens.packed": t["model.embed_tokens.packed"].reshape(16, 300)}),
     "is uint8 [16, 300]; a quantized module stores uint8 [300, 16]"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].reshape(32, 64)}),
     "up_proj.weight"),
]


@pytest.mark.parametrize("edit, message", RESIGNED)
def test_a_resigned_save_with_wrong_tensors_is_refused_by_every_door(edit, message, save, tmp_path, capsys):
    _rewrite_tensors(save, edit)
    for door in (_hf_load, lmembed.load):
        with pytest.raises(LmembedError) as e:
            door(save)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert message in one_line_error(["export", save, "--out", tmp_path / "x"], capsys)


@pytest.mark.parametrize("edit", [
    lambda h: h["model.embed_tokens.packed"].update(data_offsets=[0, 10**9]),  # beyond the end of the file
    _overlap,
    lambda h: h["model.embed_tokens.packed"].update(shape=[16, 300]),  # the same bytes, reshaped
    lambda h: h["model.embed_tokens.packed"].update(dtype="I8"),
    lambda h: _swap_offsets(h, "model.embed_tokens.scales", "model.embed_tokens.packed"),
])
def test_a_resigned_save_with_a_bad_safetensors_header_is_one_line_at_every_door(edit, save):
    _edit_header(save, edit)
    for door in (_hf_load, lmembed.load):
        with pytest.raises(LmembedError) as e:
            door(save)
        assert "\n" not in str(e.value) and str(save) in str(e.value), str(e.value)


def test_a_mixed_row_class_that_names_no_part_is_refused(tmp_path):
    folder = tiny_save(tmp_path / "m", "mixed:4.5:g16", calib=torch.arange(3, 300), calib_tokens=256)
    _rewrite_tensors(folder, lambda t: t["model.embed_tokens.row_class"].__setitem__(0, 7))
    with pytest.raises(LmembedError) as e:
        lmembed.load(folder)
    assert "class" in str(e.value) and "\n" not in str(e.value)


# --- 3. only the listed files are read ----------------------------------------------------------------------
@pytest.mark.parametrize("name, content", [
    ("added_tokens.json", {"zebra": 300, "unicorn": 301}),
    ("special_tokens_map.json", {"unk_token": "cat", "pad_token": "dog", "mask_token": "ball"}),
    ("vocab.txt", {"not": "a vocabulary"}),
])
def test_files_the_manifest_does_not_list_are_never_used(name, content, pristine, save):
    assert name not in json.loads((save / "lmembed.json").read_text())["files"]
    (save / name).write_text(json.dumps(content))
    opened = lmembed.open_model(save)
    ref = word_tokenizer(WORDS)
    assert len(opened.tokenizer) == len(ref) and opened.tokenizer.unk_token == ref.unk_token
    assert opened.tokenizer("the zebra sees a cat")["input_ids"] == ref("the zebra sees a cat")["input_ids"]
    assert torch.equal(logits(opened.model, IDS), pristine[1])


def test_a_special_file_in_place_of_a_listed_one_is_refused_without_waiting(save):
    (save / "tokenizer.json").unlink()
    os.mkfifo(save / "tokenizer.json")
    with pytest.raises(LmembedError, match="not a regular file"):
        lmembed.load(save)


# --- 4. a load is one snapshot ------------------------------------------------------------------------------
def _resave_during(monkeypatch, where: str, trigger: str | None, folder: Path, model) -> None:
    """At the worst moment of the next load (`where`, on the file `trigger`: after the manifest is
    read, or once every file is open), another writer replaces the save with --force."""
    real = getattr(verify, where)
    fired = []

    def then_resave(*args, **kwargs):
        out = real(*args, **kwargs)
        if not fired and (trigger is None or Path(args[1]).name == trigger):
            fired.append(1)
            lmembed.save(model, folder, tokenizer=word_tokenizer(WORDS), force=True)
        return out

    monkeypatch.setattr(verify, where, then_resave)


@pytest.mark.parametrize("where, trigger, new", [
    ("parse_manifest", None, True),  # its files vanish before they are opened: the folder is read again, whole
    ("listed_files", None, True),
    ("verify_fd", "tokenizer_config.json", False),  # every file is open: the old save, whole
])
def test_a_concurrent_force_resave_gives_the_old_model_or_the_new_one(where, trigger, new, pristine, save,
                                                                       monkeypatch):
    other = build("llama-tied")
    lmembed.compress(other, "int8")
    _resave_during(monkeypatch, where, trigger, save, other)
    model = lmembed.load(save)
    assert model.get_input_embeddings().bits == (8 if new else 4)
    assert torch.equal(logits(model, IDS), logits(other, IDS) if new else pristine[1])


# --- 5. fuzzing the safetensors header of a re-signed save --------------------------------------------------
HEADER_EDIT = st.fixed_dictionaries({
    "tensor": st.sampled_from(["model.embed_tokens.packed", "model.embed_tokens.scales", "model.norm.weight",
                               "model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight"]),
    "field": st.sampled_from(["dtype", "shape", "data_offsets"]),
    "value": st.one_of(st.sampled_from(["F16", "BF16", "F32", "U8", "I8", "I64", "F64", "BOOL", "X9"]),
                       st.lists(st.integers(-3, 10**6), max_size=4), st.integers(-5, 10**9), st.none(),
                       st.text(max_size=4)),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(HEADER_EDIT, min_size=1, max_size=3))
def test_any_safetensors_header_loads_or_is_refused_in_one_line(edits, pristine, tmp_path):
    folder = tmp_path / f"fuzz-{abs(hash(repr(edits)))}"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(pristine[0], folder)
    header, data = read_safetensors(folder / "model.safetensors")
    for e in edits:
        header[e["tensor"]][e["field"]] = e["value"]
    write_safetensors(folder / "model.safetensors", header, data)
    resign(folder)
    for door in (lmembed.load, _hf_load):
        try:
            door(folder)
        except LmembedError as err:
            assert "\n" not in str(err)
