"""The shape of the package: every module importable by its dotted path, no import cycles between
files or packages, the CLI generated from the configs, one resolver for every kind of folder."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lmembed
from lmembed.cli import build_parser, main
from lmembed.compression import registry
from lmembed.compression.registry import REGISTRY, as_pipeline, parse_method, parse_pipeline
from lmembed.config import RunConfig, Seq2SeqConfig, make_config
from lmembed.errors import LmembedError
from tiny_models import build, inputs, save_folder

SRC = Path(lmembed.__file__).parent


def all_modules() -> list[str]:
    names = (m.name for m in pkgutil.walk_packages(lmembed.__path__, "lmembed."))
    return sorted(n for n in names if not n.endswith("__main__"))  # importing those runs them


def test_every_submodule_is_reached_by_its_dotted_path():
    """`import lmembed.a.b as m` walks attributes: a function bound over a submodule's name (the old
    lmembed.train) would come back instead of the module."""
    import types

    for name in all_modules():
        mod = importlib.import_module(name)
        obj = lmembed
        for part in name.split(".")[1:]:
            obj = getattr(obj, part)
        assert obj is mod and isinstance(obj, types.ModuleType), name


def _imports(path: Path) -> set[str]:
    """Absolute lmembed modules a file imports (at any depth, lazy imports included)."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if (SRC.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (SRC.parent / Path(*sub.split("."))).is_dir() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("lmembed") and m != module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


COMPRESSION_LAYERS = ("methods", "calibration", "registry", "integration", "formats")


def test_no_import_cycles_between_files_or_packages():
    files = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): _imports(p)
             for p in SRC.rglob("*.py")}
    # a package's __init__ re-exports its own modules: that is not a dependency between files
    file_graph = {m: {d for d in deps if not m.startswith(d + ".") and d != "lmembed"} for m, deps in files.items()
                  if m != "lmembed"}
    assert _cycle(file_graph) is None, _cycle(file_graph)

    def pkg(m: str) -> str:
        parts = m.split(".")
        inside = len(parts) > 2 and parts[1] == "compression" and parts[2] in COMPRESSION_LAYERS
        return ".".join(parts[:3] if inside else parts[:2])

    pkg_graph: dict[str, set[str]] = {}
    for m, deps in file_graph.items():
        pkg_graph.setdefault(pkg(m), set()).update(pkg(d) for d in deps if pkg(d) != pkg(m))
    assert _cycle(pkg_graph) is None, _cycle(pkg_graph)
    # the layers docs/layout.md describes: the CLI on top, benches below it, the two flows (training,
    # compression) over the evaluation they share... down to errors; nothing below reaches up
    order = ["lmembed.cli", "lmembed.bench", "lmembed.experimental", "lmembed.export", "lmembed.training",
             "lmembed.evaluation", "lmembed.compression", "lmembed.models", "lmembed.config", "lmembed.tasks",
             "lmembed.data", "lmembed.common", "lmembed._version", "lmembed.errors"]
    inner = ["lmembed.compression"] + [f"lmembed.compression.{n}" for n in COMPRESSION_LAYERS]
    packages = {pkg(m) for m in file_graph} - {"lmembed.__main__"}
    layered = set(order) | set(inner)
    # compression's own modules (api, choose, stages) sit on top of its subpackages with the package
    assert {p for p in packages if p.count(".") == 1} <= set(order), sorted(packages - layered)
    assert {p for p in packages if p.count(".") == 2 and p.startswith("lmembed.compression.")} <= set(inner), \
        sorted(packages - layered)
    for layers in (order, inner):
        for i, upper in enumerate(layers):
            for lower in layers[i + 1:]:
                assert upper not in pkg_graph.get(lower, set()), f"{lower} imports {upper}"


# --- the method grammar: typed objects, parsed and printed --------------------------------------
def _text_strategy(arg: registry.Arg):
    p = arg.parse
    if p in (registry.positive_int,):
        return st.integers(1, 5000).map(str)
    if p is registry.non_negative_int:
        return st.integers(0, 5000).map(str)
    if p is registry.group_size:
        return st.integers(1, 512).map(lambda n: f"g{n}")
    if p in (registry.non_negative_float, registry.positive_float, registry.fraction, registry.finite_float):
        lo = 1e-6 if p is registry.positive_float else 0.0
        return st.floats(lo, 1.0 if p is registry.fraction else 100.0, allow_nan=False).map(repr)
    if p is registry.bool_flag:
        return st.sampled_from(["1", "0", "true", "false", "on", "off"])
    if getattr(p, "show", None) is not None and arg.name == "keep":
        return st.one_of(st.integers(1, 99).map(str), st.integers(1, 999).map(lambda n: f"top{n}"))
    if arg.name == "choices":
        return st.lists(st.integers(1, 8), min_size=1, max_size=4).map(lambda b: "-".join(map(str, b)))
    if getattr(p, "allowed", None):
        return st.sampled_from(list(p.allowed))
    if p is str:
        return st.sampled_from(["lee", "shakespeare", "corpus_dir"])
    if arg.name == "split":
        return st.sampled_from(["train", "valid", "test"])
    raise AssertionError(f"no strategy for {arg.name} ({p})")


@st.composite
def method_texts(draw):
    cls = REGISTRY[draw(st.sampled_from(sorted(REGISTRY)))]
    parts = [cls.name]
    pos = [a for a in cls.positional]
    n = draw(st.integers(sum(a.required for a in pos), len(pos)))
    parts += [draw(_text_strategy(a)) for a in pos[:n]]
    for a in cls.options:
        if draw(st.booleans()):
            parts.append(f"{a.name}={draw(_text_strategy(a))}")
    return ":".join(parts)


@settings(max_examples=300, deadline=None)
@given(text=method_texts())
def test_method_text_round_trips_through_objects(text):
    try:
        m = parse_method(text)
    except LmembedError as e:  # a combination no matrix can take (mixed:1.0 below every width): one line
        assert "\n" not in str(e)
        assume(False)
    again = parse_method(str(m))
    assert again == m and str(again) == str(m)  # the printer is the parser's inverse
    assert type(m)(**m.values()) == m  # typed construction accepts exactly the parsed values
    if "plain" in m.follows:
        assert as_pipeline([m]) == [m] and as_pipeline(str(m)) == [m]
    else:  # a stage that refines another (kl) cannot start a pipeline, in either form
        for form in ([m], str(m)):
            with pytest.raises(LmembedError, match="put it after another stage"):
                as_pipeline(form)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30))
def test_any_method_string_is_parsed_or_refused_in_one_line(text):
    try:
        parse_pipeline(text)
    except LmembedError as e:
        assert "\n" not in str(e)


def test_typed_methods_compress_like_their_strings():
    ids = inputs("gpt2")
    for typed, text in ((lmembed.Int4(group=16), "int4:g16"), ([lmembed.SVD(8), lmembed.Int8()], "svd:8 > int8"),
                        (lmembed.experimental.Mixed(4.5, group=16, grid="half"), None)):
        a, b = build("gpt2"), build("gpt2")
        if text is None:  # calibrated: the typed and printed forms must agree with each other
            text = str(typed)
            rep = lmembed.compress(a, typed, calib=torch.arange(3, 300).repeat(8), calib_tokens=2048)
            lmembed.compress(b, text, calib=torch.arange(3, 300).repeat(8), calib_tokens=2048)
        else:
            rep = lmembed.compress(a, typed)
            lmembed.compress(b, text)
        assert rep["method"] == text
        with torch.no_grad():
            assert torch.equal(a(**ids).logits, b(**ids).logits)


@pytest.mark.parametrize("bad", [lambda: lmembed.Int4(group=0), lambda: lmembed.SVD(), lambda: lmembed.SVD(-1),
                                 lambda: lmembed.AutoEncoder(8, lr=float("nan")), lambda: lmembed.Int8(foo=1),
                                 lambda: lmembed.Trim("a:b"), lambda: lmembed.compress(build("gpt2"), 42)])
def test_bad_typed_methods_are_one_line_errors(bad):
    with pytest.raises(LmembedError) as e:
        bad()
    assert "\n" not in str(e.value)


# --- CLI flags come from the config declarations ------------------------------------------------
def _flags(command: list[str]) -> set[str]:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    if len(command) > 1:
        sub = sub._subparsers._group_actions[0].choices[command[1]]
    return set(sub._option_string_actions)


def test_every_config_field_has_its_flag():
    lm = {"--" + f.name.replace("_", "-") for f in fields(RunConfig) if f.metadata.get("flag", True)}
    s2s = {"--" + f.name.replace("_", "-") for f in fields(Seq2SeqConfig) if f.metadata.get("flag", True)}
    assert lm <= _flags(["train"])
    assert s2s <= _flags(["train-seq2seq"])
    assert (lm | s2s) - {"--tie", "--proj-reg"} <= _flags(["bench", "tying"])


def test_flags_reach_the_config(tiny_corpus, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("lmembed.cli.train.train", lambda cfg, out, **kw: seen.setdefault("cfg", cfg))
    assert main(["train", "--data", str(tiny_corpus), "--arch", "transformer", "--preset", "tiny", "--heads", "4",
                 "--ff", "48", "--lr-schedule", "constant", "--no-proj-bias", "--out", str(tmp_path / "r")]) == 0
    cfg = seen["cfg"]
    assert (cfg.heads, cfg.ff, cfg.lr_schedule, cfg.proj_bias, cfg.emb_dim) == (4, 48, "constant", False, 64)
    assert cfg == make_config("transformer", "tiny", data=str(tiny_corpus), heads=4, ff=48, lr_schedule="constant",
                              proj_bias=False)


# --- one resolver: every folder lmembed writes opens, and `lmembed analyze` takes it ------------------
def test_analyze_accepts_every_kind_of_folder_lmembed_writes(tiny_corpus, tmp_path, capsys):
    from test_seq2seq import _cfg as s2s_cfg
    from test_seq2seq import write_parallel

    run = tmp_path / "run"
    lmembed.train(make_config("lstm", "tiny", data=str(tiny_corpus), epochs=1, tie="tied"), run, progress=False,
                  log=lambda s: None)
    s2s = tmp_path / "s2s"
    lmembed.train_seq2seq(s2s_cfg(write_parallel(tmp_path / "par", n_train=80), epochs=1, bleu_sample=0,
                                  eval_pairs=4, tie="three-way", shared_vocab=True), s2s, log=lambda s: None)
    model, tok, _ = lmembed.load_run(run)
    lmembed.compress(model, "int4")
    lmembed.save(model, tmp_path / "run-int4", tokenizer=tok)
    words = [w for line in (tiny_corpus / "ptb.train.txt").read_text().splitlines() for w in line.split()]
    hf = save_folder("llama-tied", tmp_path / "hf", sorted(set(words)))
    hf_model = lmembed.open_model(hf)
    lmembed.compress(hf_model.model, "svd:8")
    lmembed.save(hf_model.model, tmp_path / "hf-svd", tokenizer=hf_model.tokenizer)
    kinds = {"run": "run", "s2s": "seq2seq-run", "run-int4": "compressed", "hf": "pretrained", "hf-svd": "compressed"}
    for name, kind in kinds.items():
        opened = lmembed.open_model(tmp_path / name)
        assert opened.kind == kind and opened.tokenizer is not None, name
    assert lmembed.open_model(tmp_path / "run-int4").run_config == lmembed.load_run(run)[2]
    bench = tmp_path / "pairs.txt"
    bench.write_text("cat dog 8\nball tree 2\nhouse garden 5\nteacher child 4\nriver book 1\n")
    for name in kinds:
        out = tmp_path / f"analysis-{name}"
        assert main(["analyze", str(tmp_path / name), "--out", str(out), "--benchmark", str(bench),
                     "--analogies", "none", "--pair-words", "20"]) == 0, capsys.readouterr().err
        result = json.loads((out / "analysis.json").read_text())
        assert result["targets"][0]["matrices"], name
    tied_run = json.loads((tmp_path / "analysis-run-int4" / "analysis.json").read_text())["targets"][0]
    assert list(tied_run["matrices"]) == ["tied"]  # the compressed run stays one tied matrix


def test_top_level_methods_are_the_registrys_first_class_ones():
    """The registry is the truth: `lmembed.X` for every first-class method, `lmembed.experimental.X`
    for every superseded one, and an old `lmembed.Mixed` still works with a warning."""
    import warnings

    import lmembed.experimental as experimental
    from lmembed.compression.registry import Method

    first = {c.__name__ for c in REGISTRY.values() if not c.superseded_by}
    retired = {c.__name__ for c in REGISTRY.values() if c.superseded_by}
    assert first and retired and "TransformCoding" in first and "KMixed" in first
    exported = {n for n in lmembed.__all__ if isinstance(getattr(lmembed, n), type)
                and issubclass(getattr(lmembed, n), Method) and getattr(lmembed, n).name}
    assert exported == first
    assert retired <= set(experimental.__all__)
    assert all(getattr(experimental, n).superseded_by for n in experimental.__all__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lmembed.Mixed is experimental.Mixed
    assert any("lmembed.experimental" in str(w.message) for w in caught)
    with pytest.raises(AttributeError):
        lmembed.NoSuchMethod  # noqa: B018
    help_text = registry.describe_methods()
    assert help_text.index("Experimental") < help_text.index("\n  mixed:")


def _private_imports(path: Path) -> list[str]:
    """`from <an lmembed module> import _name` in a file: a name private to another module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "lmembed"):
            found += [f"{path.relative_to(SRC.parent)}:{node.lineno}: from {'.' * node.level}{node.module or ''} "
                      f"import {a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_names():
    """A name another module needs is public (no underscore) or lives where it is used."""
    found = [line for p in sorted(SRC.rglob("*.py")) for line in _private_imports(p)]
    assert not found, "private names imported from another module:\n" + "\n".join(found)


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_60_lines():
    """From the def line to the body's last line; a longer one is split into named helpers."""
    long = [f"{p.relative_to(SRC.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in sorted(SRC.rglob("*.py")) for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_no_module_outside_the_formats_switches_on_a_storage_kind():
    """Behaviour lives on the kind (CompressedEmbedding's gguf_form, plain_parameter, tunable_scales...):
    nothing outside compression/formats tests a module against a registered kind's class, so a new
    kind is added in its own file."""
    from lmembed.compression.formats import MODULE_KINDS

    kinds = {cls.__name__ for cls in MODULE_KINDS.values()}
    formats = SRC / "compression" / "formats"
    found = []
    for p in sorted(SRC.rglob("*.py")):
        if formats in p.parents:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass") \
                    and len(node.args) == 2:
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & kinds
                found += [f"{p.relative_to(SRC.parent)}:{node.lineno}: {name}" for name in sorted(names)]
    assert not found, "isinstance over storage kinds outside their files:\n" + "\n".join(found)
