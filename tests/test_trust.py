"""Bad input and faults, as a new user meets them: every one a single `lmembed: error:` line (exit
code 2, no traceback) or an exact recovery; nothing a user wrote is lost; nothing half-written or
edited passes as good. Kills are deterministic (LMEMBED_FAULT points, see lmembed.common.faults)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmembed
from lmembed.cli import main
from lmembed.compression.integration.verify import manifest_digest, read_manifest
from lmembed.config import RunConfig, make_config
from lmembed.errors import LmembedError
from tiny_models import build, word_tokenizer

WORDS = "the cat a dog bird my friend teacher child sees likes finds follows calls helps ball tree house .".split()


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()  # what setting up printed (progress bars of a save) is not the command's
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmembed: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import write_corpus

    root = tmp_path_factory.mktemp("trust")
    corpus = write_corpus(root / "corpus")
    run = root / "run"
    lmembed.train(make_config("lstm", "tiny", data=str(corpus), epochs=1), run, log=lambda s: None)
    return run, corpus


@pytest.fixture
def saved(tmp_path):
    model = build("gpt2")
    lmembed.compress(model, "int4:g16")
    return lmembed.save(model, tmp_path / "save", tokenizer=word_tokenizer(WORDS))


# --- 1. bad values on the command line: refused before any work ---------------------------------
TRAIN_BAD = [
    (["--lr", "nan"], "--lr nan: must be a finite number"), (["--lr", "-5"], "--lr -5.0: must be > 0"),
    (["--lr", "inf"], "must be a finite number"), (["--emb-dim", "1000000000"], "--emb-dim 1000000000: must be <="),
    (["--max-steps", "0"], "--max-steps 0: must be >= 1"), (["--dropout", "1.5"], "--dropout 1.5: must be < 1"),
    (["--batch-size", "0"], "--batch-size 0"), (["--epochs", "0"], "--epochs 0"), (["--bptt", "-1"], "--bptt -1"),
    (["--layers", "100000"], "--layers 100000"), (["--clip", "-1"], "--clip -1.0"), (["--tie", "both"], "--tie"),
    (["--device", "tpu"], "--device tpu"), (["--preset", "gigantic"], "--preset gigantic"),
    (["--bpe", "10"], "--bpe 10: must be >= 260"), (["--proj-reg", "-1"], "--proj-reg -1.0"),
    (["--warmup-steps", "-3"], "--warmup-steps -3"), (["--lr", "x"], "--lr: invalid float value"),
    (["--data", "{tmp}/nowhere"], "nowhere: corpus directory not found"), (["--heads", "0"], "--heads 0"),
]


@pytest.mark.parametrize("flags, message", TRAIN_BAD)
def test_train_refuses_bad_values_in_one_line(flags, message, tiny_corpus, tmp_path, capsys):
    flags = [f.format(tmp=tmp_path) for f in flags]
    data = [] if "--data" in flags else ["--data", tiny_corpus]
    err = one_line_error(["train", *data, "--preset", "tiny", *flags, "--out", tmp_path / "o"], capsys)
    assert message in err
    assert not (tmp_path / "o").exists()  # refused before the run folder is touched


COMPRESS_BAD = [
    ("int9", "unknown method 'int9'"), ("ae:8:lr=nan", "lr 'nan' is invalid (must be a finite number)"),
    ("svd:0", "must be a positive integer"), ("int4:g0", "must be a positive integer"),
    ("mixed:1.0", "below the narrowest width"), ("kl:0", "must be a positive integer"), ("svd:8 >", "empty stage"),
    ("", "empty stage"), ("svd:8 > trim:x", "must be the first stage"), ("int4:grid=quarter", "expected one of"),
    ("ae:8:epochs=99999999999", "must be at most"), ("svd:99999", "rank 99999 must be in"),
]


@pytest.mark.parametrize("method, message", COMPRESS_BAD)
def test_compress_refuses_bad_methods_in_one_line(method, message, tmp_path, capsys):
    model = tmp_path / "m"
    build("gpt2").save_pretrained(model)
    word_tokenizer(WORDS).save_pretrained(model)
    err = one_line_error(["compress", model, "--method", method, "--out", tmp_path / "o", "--no-eval", "--quiet"],
                         capsys)
    assert message in err
    assert not (tmp_path / "o").exists()


def test_method_typos_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lmembed.cli.compress.open_source", lambda *a, **k: pytest.fail("the model was loaded"))
    assert "unknown method 'int9'" in one_line_error(["compress", "smollm2", "--method", "int9", "--out",
                                                      tmp_path / "o"], capsys)
    monkeypatch.setattr("lmembed.bench.compress.load_subject", lambda *a, **k: pytest.fail("the model was loaded"))
    assert "zip" in one_line_error(["bench", "compress", "smollm2", "--methods", "int8,zip:4", "--out",
                                    tmp_path / "b"], capsys)


OTHER_BAD = [
    (["eval", "{tmp}/missing-run"], "missing-run: run directory not found"),
    (["export", "{tmp}", "--out", "{tmp}/x"], "lmembed manifest"),
    (["export", "{tmp}", "--out", "{tmp}/x", "--dtype", "int8"], "--dtype: invalid choice"),
    (["analyze", "{tmp}/nomodel", "--out", "{tmp}/a"], "nomodel"),
    (["analyze", "{tmp}", "--out", "{tmp}/a", "--pair-words", "1"], "--pair-words >= 2"),
    (["finetune", "minilm", "--task", "{tmp}/none.csv", "--out", "{tmp}/f", "--lr", "0"], "--lr 0.0: must be > 0"),
    (["finetune", "minilm", "--task", "{tmp}/none.csv", "--out", "{tmp}/f", "--epochs", "0"], "--epochs 0"),
    (["finetune", "minilm", "--task", "{tmp}/none.csv", "--out", "{tmp}/f", "--warmup", "1.5"], "--warmup 1.5"),
    (["finetune", "minilm", "--task", "{tmp}/none.csv", "--out", "{tmp}/f"], "none.csv"),
    (["bench", "compress", "smollm2", "--methods", ",", "--out", "{tmp}/b"], "--methods: give at least one"),
    (["bench", "tying", "--models", "tyed", "--out", "{tmp}/b", "--preset", "tiny"], "--models 'tyed'"),
    (["bench", "tying", "--seq2seq", "--bptt", "5", "--out", "{tmp}/b"], "--bptt do not apply"),
    (["train-seq2seq", "--tie", "three-way", "--out", "{tmp}/s"], "--tie three-way needs"),
    (["compress", "{tmp}/nomodel", "--method", "int8", "--out", "{tmp}/o"], "nomodel"),
    (["compress", "x.gguf", "--method", "int8", "--out", "{tmp}/o"], "GGUF output needs a GGUF model"),
    (["train", "--out", "{tmp}/t", "--nonsense"], "unrecognized arguments: --nonsense"),
    (["compress", "smollm2", "--method", "kmixed:4", "--calib-tokens", "-3", "--out", "{tmp}/o"],
     "--calib-tokens: expected a positive number of tokens, not -3"),
    (["bench", "peers", "smollm2", "--bits", "abc", "--out", "{tmp}/p"], "--bits: 'abc' is not a number"),
    (["bench", "peers", "smollm2", "--peers", "awq", "--out", "{tmp}/p"], "'awq' is not a peer"),
]


@pytest.mark.parametrize("argv, message", OTHER_BAD)
def test_other_commands_refuse_bad_input_in_one_line(argv, message, tmp_path, capsys):
    assert message in one_line_error([a.format(tmp=tmp_path) for a in argv], capsys)


# --- 2. files lmembed reads back: checked, never trusted ---------------------------------------------
def _edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    d = fn(d)
    path.write_text(json.dumps(d))


RUN_TAMPERING = [
    ("config.json", lambda p: p.write_text("{not json"), "not valid JSON"),
    ("config.json", lambda p: p.write_text("[1, 2]"), "expected a JSON object"),
    ("config.json", lambda p: _edit_json(p, lambda d: {**d, "emb_dim": "wide"}), "--emb-dim wide: must be an integer"),
    ("config.json", lambda p: _edit_json(p, lambda d: {**d, "emb_dim": 10**12}), "must be <="),
    ("config.json", lambda p: _edit_json(p, lambda d: {**d, "secret": 1}), "unknown run config field(s): secret"),
    ("config.json", lambda p: p.write_bytes(os.urandom(300)), "run config"),
    ("tokenizer.json", lambda p: p.write_text("{"), "not valid JSON"),
    ("tokenizer.json", lambda p: _edit_json(p, lambda d: {**d, "itos": [1, 2]}), "'itos' must be a list"),
    ("tokenizer.json", lambda p: _edit_json(p, lambda d: {**d, "kind": "magic"}), "unknown tokenizer kind"),
    ("tokenizer.json", lambda p: p.write_text("[]"), "expected a JSON object"),
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), "cannot read weights"),
    ("model.safetensors", lambda p: p.write_bytes(b""), "cannot read weights"),
    ("checkpoint.pt", lambda p: (p.parent / "model.safetensors").unlink() or torch.save(
        {"model": {}, "epoch": 1, "evil": Evil()}, p), "refuses to load"),
]


class Evil:
    """A pickle payload: unpickling it would run code."""

    def __reduce__(self):
        return (os.system, ("echo owned",))


@pytest.mark.parametrize("name, tamper, message", RUN_TAMPERING)
def test_tampered_run_files_are_one_line_errors(name, tamper, message, run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir[0], run)
    tamper(run / name)
    assert message in one_line_error(["eval", run, "--data", run_dir[1]], capsys)


def _resign(folder: Path, edit) -> None:
    """Edit the manifest and recompute its own digest (a consistent but wrong manifest)."""
    m = json.loads((folder / "lmembed.json").read_text())
    edit(m)
    m["manifest_sha256"] = manifest_digest(m)
    (folder / "lmembed.json").write_text(json.dumps(m))


def _first_spec(m):
    return m["modules"][0]["spec"]


SAVE_TAMPERING = [
    (lambda f: _flip(f / "model.safetensors"), "checksum mismatch"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:500]),
     "corrupt or truncated"),
    (lambda f: _edit_json(f / "lmembed.json", lambda m: {**m, "dtype": "int8"}), "checksum mismatch"),
    (lambda f: _edit_json(f / "lmembed.json", lambda m: (_first_spec(m).update(out_dtype="int8"), m)[1]),
     "checksum mismatch"),
    (lambda f: (f / "lmembed.json").write_text("[]"), "not an lmembed manifest"),
    (lambda f: (f / "lmembed.json").write_bytes(b"\xff\xfe garbage"), "not valid JSON"),
    (lambda f: (f / "config.json").unlink(), "config.json: missing"),
    (lambda f: _resign(f, lambda m: _first_spec(m).update(out_dtype="int8")), "out_dtype = 'int8'"),
    (lambda f: _resign(f, lambda m: m.update(dtype="complex64")), "dtype 'complex64' is not one lmembed writes"),
    (lambda f: _resign(f, lambda m: _first_spec(m).update(num_embeddings=10**12)), "num_embeddings = 1000000000000"),
    (lambda f: _resign(f, lambda m: m["modules"][0].update(input_paths=["__class__"])), "has no module '__class__'"),
    (lambda f: _resign(f, lambda m: m["modules"][0].update(input_paths=["a; rm -rf /"])), "not a dotted module name"),
    (lambda f: _resign(f, lambda m: m["files"].update({"../../etc/passwd": m["files"]["config.json"]})),
     "must be a plain file name"),
    (lambda f: _resign(f, lambda m: m.update(model_kind="pickle")), "model_kind 'pickle'"),
    (lambda f: _resign(f, lambda m: m["aliases"].update({"x": 3})), "aliases must map"),
]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper, message", SAVE_TAMPERING)
def test_tampered_saves_never_load(tamper, message, saved, tmp_path, capsys):
    tamper(saved)
    with pytest.raises(LmembedError, match=None) as e:
        lmembed.load(saved)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert message in one_line_error(["export", saved, "--out", tmp_path / "x"], capsys)


def _resigned_config(folder: Path, edit) -> None:
    from lmembed.common.files import sha256_file

    _edit_json(folder / "config.json", edit)
    _resign(folder, lambda m: m["files"]["config.json"].update(
        sha256=sha256_file(folder / "config.json"), bytes=(folder / "config.json").stat().st_size))


@pytest.mark.parametrize("edit, message", [
    (lambda c: {k: v for k, v in c.items() if k != "model_type"}, "no model_type"),
    (lambda c: {**c, "n_layer": 10**6}, "n_layer = 1000000; expected an integer in 0..4096"),
    (lambda c: {**c, "vocab_size": "big"}, "vocab_size = 'big'"),
])
def test_a_saved_config_is_checked_before_anything_is_built(edit, message, saved):
    _resigned_config(saved, edit)
    with pytest.raises(LmembedError, match=message):
        lmembed.load(saved)


def test_remote_code_is_never_run_nor_asked_for(tmp_path):
    folder = tmp_path / "m"
    build("llama-tied").save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_json(folder / "config.json", lambda c: {**c, "auto_map": {"AutoModelForCausalLM": "evil.Model",
                                                                     "AutoConfig": "evil.Config"}})
    code = f"import lmembed; lmembed.open_model({str(folder)!r})"
    res = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=300)
    assert not marker.exists() and "run custom code" not in res.stdout + res.stderr


def test_a_pickle_payload_in_pytorch_model_bin_is_refused(tmp_path):
    folder = tmp_path / "m"
    build("gpt2").save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(LmembedError) as e:
        lmembed.open_model(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_a_damaged_corpus_cache_is_rebuilt(tiny_corpus):
    corpus = lmembed.load_corpus(tiny_corpus)
    first = corpus.train.copy()
    bins = list(Path(corpus.cache_dir).glob("train.bin"))
    data = bytearray(bins[0].read_bytes())
    data[:4] = (10**7).to_bytes(4, "little")  # an id far beyond the vocabulary
    bins[0].write_bytes(bytes(data))
    again = lmembed.load_corpus(tiny_corpus)
    assert (again.train == first).all()


def test_a_run_folder_is_never_followed_from_its_config(run_dir, tmp_path, capsys):
    err = one_line_error(["eval", run_dir[0]], capsys)
    assert "pass --data" in err and "does not follow paths read from files" in err
    assert main(["eval", str(run_dir[0]), "--data", str(run_dir[1]), "--out", str(tmp_path / "e.json")]) == 0


def test_short_eval_text_is_scored_not_refused():
    from lmembed.evaluation.pretrained import causal_ppl

    res = causal_ppl(build("gpt2"), torch.arange(3, 203), window=512, stride=256)  # 200 tokens, stride > window
    assert 190 <= res["tokens"] < 200 and res["ppl"] > 1


# --- 3. --force replaces only lmembed's files, and only after the inputs are checked ---------------------
@pytest.mark.parametrize("argv", [
    ["compress", "{model}", "--method", "int9", "--out", "{out}", "--force"],
    ["train", "--data", "{tmp}/nonexistent", "--preset", "tiny", "--out", "{out}", "--force"],
    ["bench", "compress", "{model}", "--methods", "int8,int9", "--out", "{out}", "--force"],
    ["export", "{tmp}", "--out", "{out}", "--force"],
])
def test_force_with_bad_input_touches_nothing(argv, tmp_path, capsys):
    model = tmp_path / "m"
    build("gpt2").save_pretrained(model)
    out = tmp_path / "D"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_error([a.format(model=model, out=out, tmp=tmp_path) for a in argv], capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_force_keeps_a_users_files_and_replaces_lmembeds(tmp_path, tiny_corpus, capsys):
    model = tmp_path / "m"
    build("gpt2").save_pretrained(model)
    word_tokenizer(WORDS).save_pretrained(model)
    out = tmp_path / "D"
    compress = ["compress", str(model), "--out", str(out), "--no-eval", "--quiet", "--method"]
    assert main([*compress, "int8"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main([*compress, "int4:g16"]) == 2  # needs --force
    assert main([*compress, "int4:g16", "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "lmembed.json").read_text())["modules"][0]["spec"]["bits"] == 4
    run = tmp_path / "R"
    args = ["train", "--data", str(tiny_corpus), "--preset", "tiny", "--epochs", "1", "--out", str(run)]
    assert main(args) == 0
    (run / "notes.txt").write_text("mine")
    assert main([*args, "--force", "--seed", "1"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and json.loads((run / "config.json").read_text())["seed"] == 1


# --- 4. one writer per folder ---------------------------------------------------------------------
def test_a_second_writer_is_refused_and_named(tmp_path, tiny_corpus, capsys):
    out = tmp_path / "R"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from lmembed.common.locks import locked
        with locked({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = one_line_error(["train", "--data", tiny_corpus, "--preset", "tiny", "--out", out], capsys)
        assert f"pid {holder.pid}" in err and "in use" in err
        model = build("gpt2")
        lmembed.compress(model, "int8")
        with pytest.raises(LmembedError, match="in use"):
            lmembed.save(model, out)
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--data", str(tiny_corpus), "--preset", "tiny", "--epochs", "1", "--out", str(out)]) == 0


# --- 5. kills at the worst moments: the old result or the new one, complete --------------------------
def test_a_killed_training_resumes_to_the_same_numbers(tiny_corpus, tmp_path):
    args = ["-m", "lmembed", "train", "--data", str(tiny_corpus), "--preset", "tiny", "--epochs", "2",
            "--no-progress"]
    env = {**os.environ, "LMEMBED_FAULT": "train:epoch"}
    killed = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "k")], env=env, capture_output=True)
    assert killed.returncode == 137 and (tmp_path / "k" / "checkpoint.pt").exists()
    assert main(args[2:] + ["--out", str(tmp_path / "k"), "--resume"]) == 0
    assert main(args[2:] + ["--out", str(tmp_path / "u")]) == 0
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("k", "u"))
    assert a["test_ppl"] == b["test_ppl"] and [h["valid_ppl"] for h in a["history"]] == [
        h["valid_ppl"] for h in b["history"]]


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it(tiny_corpus, tmp_path):
    cfg = make_config("lstm", "tiny", data=str(tiny_corpus), epochs=1)
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))  # what a kill during epoch 1 leaves
    m = lmembed.train(cfg, run, resume=True, log=lambda s: None)
    assert m["finished"] and m["epochs"] == 1


def test_a_killed_bench_resumes_to_the_same_table(tmp_path):
    folder = tmp_path / "m"
    build("gpt2").save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    (tmp_path / "text.txt").write_text(" ".join(WORDS * 40))
    args = ["bench", "compress", str(folder), "--data", str(tmp_path / "text.txt"), "--methods", "int8,int4:g16",
            "--max-tokens", "200"]
    env = {**os.environ, "LMEMBED_FAULT": "bench:row"}
    killed = subprocess.run([sys.executable, "-m", "lmembed", *args, "--out", str(tmp_path / "k")], env=env,
                            capture_output=True)
    assert killed.returncode == 137
    assert main([*args, "--out", str(tmp_path / "k")]) == 0
    assert main([*args, "--out", str(tmp_path / "u")]) == 0
    rows = [[(r["method"], r["metric"]) for r in json.loads((tmp_path / d / "compress.json").read_text())["rows"]]
            for d in ("k", "u")]
    assert rows[0] == rows[1]


# --- 6. fuzzing what lmembed reads ---------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                    max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(fields=st.dictionaries(st.sampled_from([f for f in RunConfig.__dataclass_fields__]), JSON, max_size=6))
def test_any_run_config_json_is_accepted_checked_or_refused_in_one_line(fields):
    try:
        cfg = RunConfig.from_dict(fields, "config.json")
    except LmembedError as e:
        assert "\n" not in str(e)
    else:
        cfg.validate()  # what was accepted passes every check


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=st.dictionaries(st.sampled_from(["format", "layout", "model_kind", "dtype", "modules", "aliases",
                                             "sentinels", "files", "vocab"]), JSON, max_size=3))
def test_any_manifest_json_is_refused_in_one_line(edit, saved):
    folder = saved.parent / f"fuzz-{abs(hash(repr(edit)))}"
    if not folder.exists():
        import shutil

        shutil.copytree(saved, folder)
    m = json.loads((saved / "lmembed.json").read_text())
    m.update(edit)
    m["manifest_sha256"] = manifest_digest(m)
    (folder / "lmembed.json").write_text(json.dumps(m))
    try:
        read_manifest(folder)
        lmembed.load(folder)
    except LmembedError as e:
        assert "\n" not in str(e)
