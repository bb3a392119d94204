"""The contract every registered method keeps, end to end, on a tiny tied Llama.

One test per entry of the method registry (and per variant in VARIANTS), with a method string made
from the registry itself (example()): each required positional argument filled from its parser
(FILL), a few options that keep the fit small (OPTIONS), and, for a stage that cannot come first
(kl refines a previous stage), the first standalone example whose output it takes in front of it.
A newly registered method is picked up on its own, or its test fails saying what example it needs.

For each: compress -> stored_bytes is exactly the bytes of the tensors the save writes for it ->
lmembed.save / lmembed.load give the same tensors and logits, bit for bit -> transformers'
from_pretrained after `import lmembed` gives the same logits -> `lmembed export --format hf`
writes a folder plain transformers loads with close logits -> the GGUF writer takes the method
or refuses it in one line -> fine-tuning has something to train (gradients reach it) unless the
kind is one whose stored form has nothing trainable (FROZEN_KINDS). Then: every stored kind is
produced by some example, and spec format versions (a newer one is refused in one line, a spec
without one loads as version 1).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf
from safetensors import safe_open

import lmembed
from lmembed.cli import main
from lmembed.compression.formats.base import MODULE_KINDS, CompressedEmbedding, CompressedHead
from lmembed.compression.integration.io import MANIFEST, WEIGHTS, write_manifest
from lmembed.compression.integration.sites import compressed_modules
from lmembed.compression.registry import (
    REGISTRY,
    group_size,
    method_names,
    non_negative_float,
    non_negative_int,
    parse_method,
    parse_pipeline,
    positive_float,
    positive_int,
)
from lmembed.errors import LmembedError
from lmembed.export.gguf import compress_gguf
from lmembed.export.gguf_file import read_token_embd
from lmembed.training.finetune import set_embedding_training
from tiny_models import build, word_tokenizer

# What a required positional argument gets, by its parser: small values for a 300 x 32 matrix.
FILL = {positive_int: "4", non_negative_int: "4", positive_float: "4.5", non_negative_float: "1.0",
        group_size: "g32", str: "lee"}
# Options that keep a fit small, or that a method needs on this model (groupreduce's token counts).
OPTIONS = {"ae": ["epochs=2"], "wae": ["epochs=2"], "groupreduce": ["corpus=lee"], "kmixed": ["search=2"],
           "tc": ["search=4"], **{f"kq{b}": ["search=5"] for b in range(2, 9)}}
# Settings the examples made from defaults do not reach (wsvd's per-row ranks: the rowrank kind).
VARIANTS = ["wsvd:4:alloc=rows", "trim:lee > int8:g32"]
# Kinds whose stored form has nothing fine-tuning trains (lmembed.training.finetune trains dense
# matrices, factors and the fp16 scales of QuantizedEmbedding codes): super-block codes keep their
# scales in the packed rows, tc its codes and per-band tables.
FROZEN_KINDS = {"superblock", "kmixed", "tc"}

WORDS = "the cat a dog bird my friend teacher child sees likes finds follows calls helps ball tree house .".split()
quiet = {"log": lambda s: None}


def example(name: str) -> str:
    """A small valid method string for the registered method `name`, made from its declaration."""
    cls = REGISTRY[name]
    parts = [name]
    for arg in cls.positional:
        if not arg.required:
            break
        text = FILL.get(arg.parse)
        if text is None:
            pytest.fail(f"method {name}: its required argument {arg.name} has a parser ({arg.parse!r}) the contract "
                        "test cannot fill; add its parser to FILL or an example to OPTIONS/VARIANTS in "
                        "tests/test_contract.py")
        parts.append(text)
    text = ":".join(parts + OPTIONS.get(name, []))
    method = parse_method(text)
    if "plain" not in method.follows:  # refines a previous stage: the first one that gives what it takes
        for other in sorted(REGISTRY):
            prev = REGISTRY[other]
            if other == name or "plain" not in prev.follows or prev.vocabulary:
                continue
            first = example(other)
            if parse_pipeline(first)[-1].makes("plain") in method.follows:
                return f"{first} > {text}"
        pytest.fail(f"method {name}: no registered method gives what it follows ({method.follows})")
    return text


def examples() -> list[str]:
    return [*method_names(), *VARIANTS]


def _text(case: str) -> str:
    return case if case in VARIANTS else example(case)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def fitted(stats):
    """example text -> (compressed model, report, tokenizer); each example is fitted once."""
    cache: dict[str, tuple] = {}

    def get(text: str):
        if text not in cache:
            model, tok = build("llama-tied"), word_tokenizer(WORDS)
            stages = parse_pipeline(text)
            calib = stats if any(s.needs_calib for s in stages) else None
            rep = lmembed.compress(model, text, tokenizer=tok, calib=calib)
            cache[text] = (model, rep, rep.pop("tokenizer", tok))
        return cache[text]

    return get


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tiny_gguf import SENTENCES
    from tiny_gguf import write_gguf as write_tiny

    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("contract-gguf")
    (root / "calib.txt").write_text("\n".join(SENTENCES) + "\n")
    return {"src": write_tiny(root / "tied.gguf"), "calib": root / "calib.txt"}


def kinds_in(module: torch.nn.Module) -> set[str]:
    return {m.kind for m in module.modules() if isinstance(m, CompressedEmbedding)}


def tied(model) -> bool:
    """The input and output sites hold one matrix (one compressed module, or one Parameter)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(out, CompressedHead):
        return out.embedding is inp
    return out.weight is inp.weight


def saved_bytes(folder, model) -> dict[int, int]:
    """id(compressed module) -> bytes of the tensors the save holds for it (shared tensors once)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        sizes = {k: f.get_slice(k) for k in f.keys()}
        sizes = {k: math.prod(s.get_shape()) * _itemsize(s.get_dtype()) for k, s in sizes.items()}
    aliases = manifest["aliases"]
    out = {}
    for module, in_paths, head_paths in compressed_modules(model).values():
        prefix = in_paths[0] if in_paths else f"{head_paths[0]}.embedding"
        names = {aliases.get(f"{prefix}.{k}", f"{prefix}.{k}") for k in module.state_dict()}
        assert names <= set(sizes), f"the save lacks {sorted(names - set(sizes))}"
        out[id(module)] = sum(sizes[n] for n in names)
    inside = tuple(f"{p}." for _, ins, heads in compressed_modules(model).values() for p in ins + heads)
    written = {n for n in sizes if n.startswith(inside)} - set(manifest["sentinels"])
    named = {aliases.get(n, n) for n in model.state_dict() if n.startswith(inside)}
    assert written == named, f"tensors written beside the compressed modules' own: {sorted(written - named)}"
    return out


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1,
            "U8": 1, "BOOL": 1}[dtype]


@pytest.mark.parametrize("case", examples())
def test_method_contract(case, fitted, tiny_gguf, tmp_path):
    text = _text(case)
    model, rep, tok = fitted(text)
    found = compressed_modules(model)
    assert len(found) == 1, "a tied model compressed on both sides keeps one module"
    (module, in_paths, head_paths), = found.values()
    assert in_paths and head_paths and tied(model), "the one module serves lookups and the head"
    v = model.config.vocab_size
    assert module.num_embeddings == v and (v < 300) == parse_pipeline(text)[0].vocabulary
    ids = torch.randint(0, v, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    assert torch.isfinite(ref).all()

    # stored bytes: exactly the tensors the save writes (a plain trimmed folder: the matrix + kept ids)
    folder = lmembed.save(model, tmp_path / "saved", tokenizer=tok)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert rep["stored_bytes"] == module.stored_bytes() == manifest["embedding_bytes"]
    if manifest["layout"] == "plain":
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            matrix = f.get_tensor("model.embed_tokens.weight")
        kept = module.kept
        assert module.stored_bytes() == matrix.numel() * matrix.element_size() + kept.numel() * kept.element_size()
        assert manifest["vocab"]["kept"] == kept.long().tolist()
    else:
        assert saved_bytes(folder, model) == {id(module): module.stored_bytes()}
        (entry,) = manifest["modules"]
        assert entry["stored_bytes"] == module.stored_bytes() and entry["spec"] == module.spec()

    # lmembed.load: the same tensors, bit for bit, and the same logits
    loaded = lmembed.load(folder)
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert kinds_in(loaded) == kinds_in(model) and tied(loaded)
    assert torch.equal(_logits(loaded, ids), ref)

    # transformers' own door (lmembed imported): the same logits (a vocabulary-only save is a plain
    # transformers folder: a plain model)
    hf = tf.AutoModelForCausalLM.from_pretrained(folder)
    assert kinds_in(hf) == (set() if manifest["layout"] == "plain" else kinds_in(model)) and tied(hf)
    assert torch.equal(_logits(hf, ids), ref)

    # lmembed export --format hf: a plain folder transformers loads, close logits
    out = tmp_path / "plain"
    assert main(["export", str(folder), "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == v
    plain = tf.AutoModelForCausalLM.from_pretrained(out)
    assert not kinds_in(plain) and tied(plain)
    assert torch.allclose(_logits(plain, ids), ref, atol=1e-4, rtol=1e-4)

    check_gguf(text, tiny_gguf, tmp_path)
    check_trainable(loaded, ids)


def check_gguf(text: str, tiny: dict, tmp_path) -> None:
    """The GGUF writer takes the method (a file whose token_embd is lmembed's matrix) or refuses
    it in one line, writing nothing."""
    dst = tmp_path / "out.gguf"
    try:
        rep = compress_gguf(tiny["src"], text, dst, calib=str(tiny["calib"]), calib_tokens=256, **quiet)
    except LmembedError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
        assert text in message, f"the refusal names the method: {message}"
        assert not dst.exists()
        return
    assert dst.is_file() and rep["method"] == text
    rows, _ = read_token_embd(dst)
    source = read_token_embd(tiny["src"])[0].shape[0]
    assert rows.shape[1] == 32 and (rows.shape[0] < source) == parse_pipeline(text)[0].vocabulary
    assert rep["max_abs_error"] <= 1e-3, rep["max_abs_error"]


def check_trainable(model, ids) -> None:
    """What fine-tuning trains in the token embeddings: something, reached by the gradients, unless
    the kind keeps nothing trainable (FROZEN_KINDS)."""
    info = set_embedding_training(model, "train")
    emb = model.get_input_embeddings()
    kinds = kinds_in(emb)
    params = dict(emb.named_parameters())
    if kinds <= FROZEN_KINDS:
        assert info["trainable"] == [] and info["trainable_params"] == 0, (kinds, info["trainable"])
        return
    assert info["trainable"] and info["trainable_params"] > 0, f"{sorted(kinds)}: nothing to fine-tune"
    model.train()
    with torch.enable_grad():
        model(input_ids=ids).logits.float().pow(2).mean().backward()
    grads = {name: params[name].grad for name in info["trainable"]}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), "a trainable tensor gets no gradient"
    # (a part can be all zeros, the padding row: its scale's gradient is zero; the whole cannot be)
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_every_stored_kind_is_made_by_some_example(fitted):
    made = set()
    for case in examples():
        made |= kinds_in(fitted(_text(case))[0])
    assert set(MODULE_KINDS) <= made, f"no example produces {sorted(set(MODULE_KINDS) - made)}: add one to VARIANTS"


def test_examples_are_made_from_the_registry():
    assert set(method_names()) == set(REGISTRY)
    for name in REGISTRY:
        stages = parse_pipeline(example(name))
        assert stages[-1].name == name and len(stages) <= 2


# --- spec format versions --------------------------------------------------------------------------
def _rewrite_specs(folder, edit) -> None:
    """Apply `edit` to every module spec (nested ones too) in lmembed.json and config.json, then
    write the manifest again with its checksums, as a save by another lmembed would have."""
    def walk(spec):
        edit(spec)
        for key in ("codes", "inner"):
            if isinstance(spec.get(key), dict):
                walk(spec[key])
        for key in ("parts", "blocks"):
            for part in spec.get(key) or []:
                if isinstance(part, dict):
                    walk(part)

    manifest = json.loads((folder / MANIFEST).read_text())
    config = json.loads((folder / "config.json").read_text())
    for entry in [*manifest["modules"], *config["quantization_config"]["modules"]]:
        walk(entry["spec"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(manifest.pop("files"))
    manifest.pop("manifest_sha256")
    write_manifest(folder, manifest, names)


@pytest.fixture
def int4_save(tmp_path):
    model = build("llama-tied")
    lmembed.compress(model, "svd:8 > int4:g8")
    folder = lmembed.save(model, tmp_path / "m", tokenizer=word_tokenizer(WORDS))
    return model, folder


def test_every_spec_carries_its_kinds_format_version(int4_save):
    model, folder = int4_save
    spec = json.loads((folder / MANIFEST).read_text())["modules"][0]["spec"]
    assert spec["kind"] == "factorized" and spec["codes"]["kind"] == "quantized"
    assert spec["version"] == MODULE_KINDS["factorized"].FORMAT_VERSION
    assert spec["codes"]["version"] == MODULE_KINDS["quantized"].FORMAT_VERSION
    for cls in MODULE_KINDS.values():
        assert isinstance(vars(cls).get("FORMAT_VERSION"), int), f"{cls.__name__} declares no FORMAT_VERSION"


@pytest.mark.parametrize("where", ["outer", "nested"])
def test_a_newer_format_version_is_refused_in_one_line(int4_save, where, capsys):
    _, folder = int4_save
    target = "factorized" if where == "outer" else "quantized"
    _rewrite_specs(folder, lambda s: s.update(version=99) if s["kind"] == target else None)
    for load in (lmembed.load, tf.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(LmembedError) as e:
            load(folder)
        message = str(e.value)
        assert "\n" not in message
        assert f"'{target}'" in message and "version 99" in message and "up to version 1" in message
        assert "upgrade lmembed" in message
    out = folder.parent / "cli-export"
    capsys.readouterr()
    assert main(["export", str(folder), "--out", str(out)]) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "version 99" in err and "Traceback" not in err


def test_a_spec_without_a_version_loads_as_version_1(int4_save):
    model, folder = int4_save
    _rewrite_specs(folder, lambda s: s.pop("version"))
    assert "version" not in json.loads((folder / MANIFEST).read_text())["modules"][0]["spec"]
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    for loaded in (lmembed.load(folder), tf.AutoModelForCausalLM.from_pretrained(folder)):
        want, got = model.state_dict(), loaded.state_dict()
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
        module = loaded.get_input_embeddings()
        assert module.spec()["version"] == 1 and module.codes.spec()["version"] == 1


@pytest.mark.parametrize("version", [0, -1, "1", True, 1.0])
def test_a_malformed_version_is_refused(version):
    from lmembed.compression.formats.base import build_module

    with pytest.raises(LmembedError, match="version"):
        build_module({"kind": "dense", "version": version, "num_embeddings": 4, "embedding_dim": 8, "scale": 1.0})


def test_a_kind_must_declare_its_own_version():
    from lmembed.compression.formats.base import register_module
    from lmembed.compression.formats.quantized import QuantizedEmbedding

    class Sub(QuantizedEmbedding):
        kind = "contract-test-sub"

    with pytest.raises(TypeError, match="FORMAT_VERSION"):
        register_module(Sub)
    assert "contract-test-sub" not in MODULE_KINDS
