"""Data-parallel training with torchrun + gloo on CPU equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmembed.cli import main


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "lmembed", *args], capture_output=True, text=True, env=env, timeout=300)


def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_two_gloo_ranks_equal_one_process(tiny_corpus, tmp_path, arch):
    common = ["train", "--data", str(tiny_corpus), "--arch", arch, "--preset", "tiny", "--tie", "tied",
              "--batch-size", "8", "--eval-batch-size", "4", "--device", "cpu", "--no-progress"]
    if arch == "lstm":  # a moderate lr: at lr 20 float noise (reduction order) is amplified chaotically
        common += ["--lr", "2"]
    assert main([*common, "--epochs", "2", "--out", str(tmp_path / "one")]) == 0
    res = _torchrun([*common, "--epochs", "2", "--out", str(tmp_path / "two")])
    assert res.returncode == 0, res.stderr[-2000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["train_ppl"] == pytest.approx(a["train_ppl"], rel=1e-4)
        assert b["valid_ppl"] == pytest.approx(a["valid_ppl"], rel=1e-4)
    assert two["test_ppl"] == pytest.approx(one["test_ppl"], rel=1e-4)
    # only rank 0 wrote: one metrics file, one log line per epoch
    assert res.stdout.count("epoch   1 |") == 1


def test_resume_with_a_different_world_size(tiny_corpus, tmp_path):
    common = ["train", "--data", str(tiny_corpus), "--preset", "tiny", "--batch-size", "8", "--eval-batch-size", "4",
              "--device", "cpu", "--no-progress", "--lr", "2"]
    assert main([*common, "--epochs", "2", "--out", str(tmp_path / "ref")]) == 0
    res = _torchrun([*common, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert res.returncode == 0, res.stderr[-2000:]
    assert main([*common, "--epochs", "2", "--out", str(tmp_path / "run"), "--resume"]) == 0
    ref, run = _metrics(tmp_path / "ref"), _metrics(tmp_path / "run")
    assert [r["valid_ppl"] for r in run["history"]] == pytest.approx([r["valid_ppl"] for r in ref["history"]], rel=1e-4)


def test_errors_reach_every_rank(tiny_corpus, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    res = _torchrun(["train", "--data", str(tiny_corpus), "--preset", "tiny", "--device", "cpu", "--out", str(out)])
    assert res.returncode != 0
    assert res.stderr.count("not empty; pass --force") == 2  # both ranks exit with the one-line error
    assert (out / "mine.txt").read_text() == "x"
