"""--force owns only what lmembed wrote, outputs never overwrite inputs, one writer per real folder,
and interrupted writes (kills, SIGTERM, Ctrl-C, a full disk) leave the old output whole and their
leftovers to the next run. Faults are injected at LMEMBED_FAULT points (lmembed.common.faults)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers as tf
from safetensors import SafetensorError

import lmembed
from lmembed.cli import main
from lmembed.common.files import clean_leftovers
from lmembed.common.locks import lock_path, locked
from lmembed.errors import LmembedError
from tiny_models import build
from trust_helpers import model_folder, one_line_error, tiny_save

QUIET = ["--no-eval", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return model_folder(tmp_path_factory.mktemp("force") / "m")


def _compress(model: Path, out, *extra) -> list:
    return ["compress", model, "--method", "int8", "--out", out, *QUIET, *extra]


def _users_folder(root: Path) -> dict[str, str]:
    """A folder of the user's that holds lmembed's file names."""
    root.mkdir(parents=True, exist_ok=True)
    mine = {"config.json": '{"mine": 1}', "report.md": "my report", "tokenizer.json": "{}", "notes.txt": "mine"}
    for name, text in mine.items():
        (root / name).write_text(text)
    return mine


def _intact(root: Path, mine: dict[str, str]) -> bool:
    return {p.name: p.read_text() for p in root.iterdir() if p.is_file()} == mine


# --- 1. --force replaces only an lmembed output ------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["compress", "{model}", "--method", "int8", "--out", "{out}", "--force", *QUIET],
    ["export", "{save}", "--out", "{out}", "--force"],
    ["train", "--data", "{corpus}", "--preset", "tiny", "--epochs", "1", "--out", "{out}", "--force"],
    ["bench", "compress", "{model}", "--methods", "int8", "--data", "{corpus}/ptb.test.txt", "--out", "{out}"],
])
def test_force_refuses_a_folder_lmembed_did_not_write(argv, model, tiny_corpus, tmp_path, capsys):
    save = tiny_save(tmp_path / "save")
    out = tmp_path / "D"
    mine = _users_folder(out)
    err = one_line_error([a.format(model=model, out=out, save=save, corpus=tiny_corpus) for a in argv], capsys)
    assert "lmembed did not write" in err and _intact(out, mine)


def test_force_refuses_the_home_folder(model, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    mine = _users_folder(home)
    (home / "runs").mkdir()  # an lmembed run among the user's files does not make the folder lmembed's
    (home / "runs" / "config.json").write_text(json.dumps(lmembed.make_config("lstm", "tiny", data="x").to_dict()))
    monkeypatch.setenv("HOME", str(home))
    assert "lmembed did not write" in one_line_error(_compress(model, "~", "--force"), capsys)
    assert _intact(home, mine)


def test_force_refuses_the_filesystem_root_before_any_work(model, capsys, monkeypatch):
    monkeypatch.setattr("lmembed.cli.compress.open_source", lambda *a: pytest.fail("the model was loaded"))
    before = set(os.listdir("/"))
    assert "filesystem root" in one_line_error(_compress(model, "/", "--force"), capsys)
    assert set(os.listdir("/")) == before


# --- 2. an output is never an input --------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["{x}", "{x}/sub/..", "{link}", "{parent}"])
def test_compress_refuses_its_model_folder_as_output(spelling, tmp_path, capsys):
    src = model_folder(tmp_path / "m")
    (src / "sub").mkdir()
    (tmp_path / "link").symlink_to(src)
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    out = spelling.format(x=src, link=tmp_path / "link", parent=tmp_path)
    err = one_line_error(_compress(src, out, "--force"), capsys)
    assert "the input" in err
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


@pytest.mark.parametrize("spelling", ["{x}", "{x}/../{name}"])
def test_export_refuses_its_save_as_output(spelling, tmp_path, capsys):
    save = tiny_save(tmp_path / "s")
    out = spelling.format(x=save, name=save.name)
    assert "is the input" in one_line_error(["export", save, "--out", out, "--force"], capsys)
    lmembed.load(save)  # still whole


# --- 3. links, modes --------------------------------------------------------------------------------------------
def test_a_linked_output_writes_its_target_and_stays_a_link(model, tmp_path):
    target = tmp_path / "target"
    assert main([str(a) for a in _compress(model, target)]) == 0
    (target / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main([str(a) for a in ["compress", model, "--method", "int4:g16", "--out", link, "--force", *QUIET]]) == 0
    assert link.is_symlink() and (target / "notes.txt").read_text() == "mine"
    assert json.loads((target / "lmembed.json").read_text())["modules"][0]["spec"]["bits"] == 4


@pytest.mark.parametrize("umask, folder_mode", [(0o022, 0o755), (0o027, 0o750), (0o077, 0o711)])
def test_saves_keep_the_umask_and_a_replaced_folder_keeps_its_mode(umask, folder_mode, tmp_path):
    old = os.umask(umask)
    try:
        fresh = tiny_save(tmp_path / "fresh")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o777 & ~umask
        assert {stat.S_IMODE(f.stat().st_mode) for f in fresh.iterdir()} == {0o666 & ~umask}
        os.chmod(fresh, folder_mode)
        model = build("llama-tied")
        lmembed.compress(model, "int8")
        lmembed.save(model, fresh, force=True)
        assert stat.S_IMODE(fresh.stat().st_mode) == folder_mode
    finally:
        os.umask(old)


# --- 4. one writer per real folder -----------------------------------------------------------------------
def test_spellings_and_links_of_one_folder_share_one_lock(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "x", target_is_directory=True)
    paths = [tmp_path / "x", tmp_path / "sub" / ".." / "x", tmp_path / "link", f"{tmp_path}/./x/"]
    assert len({lock_path(p) for p in paths}) == 1


def test_a_second_writer_through_a_link_is_refused(tmp_path):
    out = tmp_path / "x"
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from lmembed.common.locks import locked
        with locked({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        model = build("gpt2")
        lmembed.compress(model, "int8")
        for spelling in (tmp_path / "link", tmp_path / "link" / ".." / "x"):
            with pytest.raises(LmembedError, match=f"in use by pid {holder.pid}"):
                lmembed.save(model, spelling)
    finally:
        holder.kill()
        holder.wait()


# --- 5. kills, SIGTERM, Ctrl-C, a full disk -----------------------------------------------------------------
SAVE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import lmembed
from tiny_models import build
m = build("gpt2"); lmembed.compress(m, {method!r})
lmembed.save(m, {out!r}, force=True)
"""


def _save_in_child(out: Path, method: str, fault: str = "") -> subprocess.CompletedProcess:
    code = SAVE_SCRIPT.format(tests=str(Path(__file__).parent), method=method, out=str(out))
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "LMEMBED_FAULT": fault},
                          capture_output=True, text=True)


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _bits(out: Path) -> int:
    return lmembed.load(out).get_input_embeddings().bits


@pytest.mark.parametrize("fault, code, bits", [
    ("save:staged", 137, 8),  # kill -9 with the new folder built: it stays behind
    ("save:staged=term", -15, 8),  # SIGTERM there: its staging folder removed on the way out
    ("save:switched", 137, 4),  # kill -9 mid-switch: the user's file is in the old folder
])
def test_an_interrupted_save_leaves_the_old_output_and_the_next_run_cleans_up(fault, code, bits, tmp_path):
    out = tmp_path / "S"
    first = build("gpt2")
    lmembed.compress(first, "int8")
    lmembed.save(first, out)
    (out / "notes.txt").write_text("mine")
    res = _save_in_child(out, "int4:g16", fault)
    assert res.returncode == code, res.stderr[-2000:]
    assert _bits(out) == bits
    assert bool(_siblings(out)) == (code == 137)
    with locked(out):  # the next command on S: leftovers removed, the user's file back in place
        pass
    assert _siblings(out) == [] and (out / "notes.txt").read_text() == "mine"
    assert _bits(out) == bits


def test_leftovers_of_a_killed_gguf_write_go_with_the_next_run_on_that_file(tmp_path):
    out = tmp_path / "new.gguf"
    for name in (".new.gguf.tmp4242", ".new.gguf.ab12cd34.tmp", ".new.gguf.x.tmp4242", ".other.gguf.tmp1"):
        (tmp_path / name).write_bytes(b"half a file")
    with locked(out):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new.gguf.x.tmp4242", ".other.gguf.tmp1"]
    assert clean_leftovers(out) == []


@pytest.mark.parametrize("command", ["compress", "export"])
def test_a_full_disk_is_one_line_and_keeps_the_old_output(command, model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "S"
    argv = _compress(model, out) if command == "compress" else ["export", tiny_save(tmp_path / "s"), "--out", out]
    assert main([str(a) for a in argv]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if command == "compress":  # safetensors' own error, where lmembed writes the tensors
        monkeypatch.setenv("LMEMBED_FAULT", "save:disk-full")
    else:  # the same error from transformers' save_pretrained
        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", full)
    err = one_line_error([*argv, "--force"], capsys)
    what = "save" if command == "compress" else "export"
    assert f"{out}: cannot write the {what} (No space left on device); the old output is unchanged" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _siblings(out) == []


@pytest.mark.parametrize("command, argv", [
    ("compress", ["compress", "{model}", "--method", "int8", "--out", "{out}", *QUIET]),
    ("export", ["export", "{model}", "--out", "{out}"]),
    ("train", ["train", "--out", "{out}"]),
])
def test_each_command_says_what_an_interrupt_left(command, argv, model, tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"lmembed.cli.{command}.run", interrupted)
    assert main([a.format(model=model, out=tmp_path / "o") for a in argv]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: ") and len(err.splitlines()) == 1
    assert ("--resume" in err) == (command == "train")
