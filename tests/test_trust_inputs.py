"""What lmembed reads besides saves: method strings and flags (bounds checked before any model
loads), text inputs (streamed, capped, special files refused) and its own caches (calibration
statistics, the fp32 conversion of a bundled GGUF), which are verified, never trusted."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import lmembed
from lmembed.compression.calibration.calibrate import _cache_dir, calibrate
from lmembed.compression.formats.transform import CEILING, widest
from lmembed.compression.registry import parse_method
from lmembed.data import texts
from lmembed.data.texts import load_text
from lmembed.errors import LmembedError
from tiny_models import build, word_tokenizer
from trust_helpers import WORDS, model_folder, one_line_error

QUIET = ["--no-eval", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return model_folder(tmp_path_factory.mktemp("inputs") / "m", "llama-tied")


# --- 1. method budgets and positional values --------------------------------------------------------
@pytest.mark.parametrize("method, message", [
    ("tc:45", "more than tc can store for any matrix"), ("tc:1000", "more than tc can store"),
    ("mixed:45", "more than mixed can store for any matrix (at most 9.500"),
    ("kmixed:45", "more than kmixed can store for any matrix (at most 8.344"),
    ("mixed:9.6", "more than mixed can store"), ("int4:32", "group '32' is invalid (write it as g32"),
    ("mixed:4.5:32", "write it as g32"), ("kq4:16", "write it as g16"),
])
def test_budgets_above_the_format_and_bare_positionals_fail_before_the_model_loads(method, message, tmp_path,
                                                                                   capsys):
    assert message in one_line_error(["compress", tmp_path / "no-such-model", "--method", method, "--out",
                                      tmp_path / "o"], capsys)


@pytest.mark.parametrize("method, shape, ceiling", [("mixed:9", (300, 64), 8.625), ("tc:9", (49152, 576), 8.247),
                                                    ("kmixed:7.7", (300, 32), 7.594)])
def test_budgets_are_bounded_exactly_once_the_matrix_is_known(method, shape, ceiling):
    with pytest.raises(LmembedError, match=f"can store for a {shape[0]} x {shape[1]} matrix"):
        parse_method(method).check(*shape)
    assert parse_method(method.split(":")[0] + f":{ceiling - 0.01:.3f}").check(*shape) is None


def test_the_tc_ceiling_covers_every_matrix_it_is_stated_for():
    assert max(widest(d, d) for d in range(16, 4097)) <= CEILING  # V = d is the widest a V >= d matrix gets
    assert widest(49152, 576) < 8.3


@pytest.mark.parametrize("argv, message", [
    (["compress", "{m}", "--method", "int8", "--out", "{o}", "--seed", str(2**70)], "--seed 1180591620717411303424"),
    (["export", "{m}", "--out", "{o}", "--seed", "-1"], "--seed -1: must be in 0..4294967295"),
    (["compress", "{m}", "--method", "int8", "--out", "{o}", "--max-tokens", "-5"], "--max-tokens"),
    (["bench", "compress", "{m}", "--methods", "int8", "--out", "{o}", "--max-tokens", "-1"],
     "--max-tokens -1: must be a positive number of tokens"),
])
def test_shared_flags_are_bounded(argv, message, model, tmp_path, capsys):
    assert message in one_line_error([a.format(m=model, o=tmp_path / "o") for a in argv], capsys)
    assert not (tmp_path / "o").exists()


def test_kl_on_an_encoder_is_refused_before_calibration(tmp_path, monkeypatch, capsys):
    encoder = model_folder(tmp_path / "enc", "bert-encoder")
    monkeypatch.setattr("lmembed.compression.calibration.calibrate.calibrate",
                        lambda *a, **k: pytest.fail("calibrated"))
    err = one_line_error(["compress", encoder, "--method", "int8 > kl:10", "--out", tmp_path / "o", *QUIET], capsys)
    assert "has no output layer" in err


# --- 2. text inputs --------------------------------------------------------------------------------
@pytest.fixture
def alarm():
    """A read that would hang fails the test after 20 s instead."""
    def hung(signum, frame):
        raise TimeoutError("the read hung")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _sparse(path: Path, size: int = 2 << 30) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # 2 GB of zeros that take no disk and no time to write
    return path


def test_a_sparse_2gb_calibration_file_is_one_line(model, tmp_path, capsys, alarm):
    calib = _sparse(tmp_path / "big.txt")
    err = one_line_error(["compress", model, "--method", "mixed:4.5:g16", "--calib", calib, "--out", tmp_path / "o",
                          *QUIET], capsys)
    assert "line 1 is longer than 16 MiB" in err and str(calib) in err


@pytest.mark.parametrize("special", ["fifo", "device"])
def test_special_files_in_a_text_folder_are_refused_without_reading_them(special, tmp_path, alarm):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("the cat sees a dog .\n")
    if special == "fifo":
        os.mkfifo(folder / "b.txt")
    else:
        (folder / "b.txt").symlink_to("/dev/zero")
    with pytest.raises(LmembedError, match=f"b.txt: is a {'FIFO' if special == 'fifo' else 'device or socket'}"):
        load_text(str(folder))
    tok = word_tokenizer(WORDS)
    with pytest.raises(LmembedError, match="not a regular file"):
        lmembed.compress(build("llama-tied"), f"trim:{folder}", tokenizer=tok)


def test_a_text_past_the_cap_is_one_error_and_a_prefix_is_read_lazily(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("the cat sees a dog .\n" * 200)
    monkeypatch.setattr(texts, "MAX_TEXT_CHARS", 1000)
    with pytest.raises(LmembedError, match="longer than"):
        load_text(str(path))
    assert load_text(str(path), max_chars=50) == ("the cat sees a dog .\n" * 3)[:50]


# --- 3. caches are verified ----------------------------------------------------------------------------
def _calibrate(m):
    return calibrate(m, torch.arange(3, 300), tokens=256, window=64)


def _entry(m) -> Path:
    entries = sorted(_cache_dir().glob("*.pt"), key=lambda p: p.stat().st_mtime)
    return entries[-1]


def _edit_stats(path: Path) -> None:
    entry = torch.load(path, weights_only=True)
    entry["stats"]["in_freq"][5] += 1000.0  # the recorded content digest no longer matches
    torch.save(entry, path)


@pytest.mark.parametrize("damage, why", [
    (_edit_stats, "its content changed after it was written"),
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "it cannot be read"),
    (lambda p: torch.save({"stats": {}}, p), "computed from other inputs"),
])
def test_a_damaged_calibration_cache_entry_is_computed_again_with_one_line(damage, why, capsys):
    m = build("llama-tied")
    first = _calibrate(m)
    damage(_entry(m))
    capsys.readouterr()
    again = _calibrate(m)
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1 and err.startswith("lmembed: note: ")
    assert torch.equal(again.in_freq, first.in_freq) and torch.equal(again.hidden_moment, first.hidden_moment)
    assert not getattr(again, "from_cache", False)
    third = _calibrate(m)  # rewritten, whole: read back from the cache, silently
    assert third.from_cache and torch.equal(third.in_freq, first.in_freq)


def test_a_calibration_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("LMEMBED_CACHE", str(blocker))
    stats = _calibrate(build("llama-tied"))
    err = capsys.readouterr().err
    assert "cannot be written" in err and "not cached" in err and len(err.strip().splitlines()) == 1
    assert stats.tokens == 256


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from lmembed.models.pretrained import BundledModel
    from tiny_gguf import write_gguf

    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return BundledModel("tiny", "none", "pip install nothing", "a tiny GGUF", gguf_file=path.name), path


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [
    (lambda f: _flip(f / "model.safetensors"), "model.safetensors changed after it was written"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]), "bytes, not"),
    (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    (lambda f: (f / "lmembed_source.json").unlink(), "lmembed_source.json is missing"),
])
def test_a_damaged_fp32_conversion_is_converted_again_with_one_line(damage, why, gguf_model, capsys):
    from lmembed.common.files import sha256_file
    from lmembed.models.pretrained import _dequantised_copy

    bundled, path = gguf_model
    folder = _dequantised_copy(bundled, path)
    digest = sha256_file(folder / "model.safetensors")
    damage(folder)
    capsys.readouterr()
    assert _dequantised_copy(bundled, path) == folder
    notes = _notes(capsys)
    assert len(notes) == 1 and why in notes[0] and "converting tiny.gguf again" in notes[0]
    assert sha256_file(folder / "model.safetensors") == digest
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert _dequantised_copy(bundled, path) == folder and _notes(capsys) == []


def _notes(capsys) -> list[str]:
    """lmembed's lines on stderr (transformers adds its progress bars there when it converts)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmembed:")]
