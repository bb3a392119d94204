from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmembed.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "lmembed", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "eval", "bench"):
        assert cmd in out.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "{tmp}/nope", "--out", "{tmp}/o"], "nope: corpus directory not found"),
        (["train", "--data", "{corpus}", "--preset", "gigantic", "--out", "{tmp}/o"], "--preset gigantic: unknown"),
        (["train", "--data", "{corpus}", "--preset", "tiny", "--lr", "1", "--device", "tpu", "--out", "{tmp}/o"],
         "--device tpu"),
        (["eval", "{tmp}/missing-run"], "missing-run: run directory not found"),
    ],
)
def test_bad_input_is_one_line(argv, message, tmp_path, tiny_corpus, capsys):
    argv = [a.format(tmp=tmp_path, corpus=tiny_corpus) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmembed: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_train_eval_and_bench_cli(tiny_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_corpus), "--preset", "tiny", "--epochs", "1", "--tie", "tied",
                 "--out", str(run), "--no-progress"]) == 0
    assert main(["eval", str(run), "--split", "valid", "--data", str(tiny_corpus)]) == 0
    res = json.loads((run / "eval-valid.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert res["ppl"] == pytest.approx(metrics["valid_ppl"])

    out = tmp_path / "bench"
    argv = ["bench", "tying", "--data", str(tiny_corpus), "--preset", "tiny", "--epochs", "1", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    table = json.loads((out / "tying.json").read_text())
    rows = {r["model"]: r for r in table["rows"]}
    assert set(rows) == {"untied", "tied", "untied+PR", "tied+PR"}
    v, d = metrics["vocab_size"], 32
    assert rows["untied"]["params"] - rows["tied"]["params"] == v * d
    assert rows["tied+PR"]["params"] - rows["tied"]["params"] == d * d + d  # P and its bias
    assert (out / "tying.png").exists() and "tied+PR" in (out / "tying.md").read_text()
    # a second call reuses the finished runs (no retraining): same numbers
    assert main(argv) == 0
    again = json.loads((out / "tying.json").read_text())
    assert again["rows"] == table["rows"]
    # --models picks rows (reused); a misspelt name is a one-line error
    assert main([*argv, "--models", "tied,untied"]) == 0
    picked = json.loads((out / "tying.json").read_text())["rows"]
    assert [r["model"] for r in picked] == ["untied", "tied"] and picked[0] == table["rows"][0]
    assert main([*argv, "--models", "tied,tyed"]) == 2
