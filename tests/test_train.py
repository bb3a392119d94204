from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lmembed
from lmembed.config import make_config
from lmembed.errors import LmembedError, TrainingDiverged
from lmembed.evaluation import lm_nll, ppl


def _cfg(data, **kw):
    base = {"epochs": 3, "batch_size": 8, "bptt": 10, "eval_batch_size": 4, "lr": 5.0, "decay_start": 1}
    base.update(kw)
    return make_config("lstm", "tiny", data=str(data), **base)


def test_loss_decreases_and_metrics_written(tiny_corpus, tmp_path):
    m = lmembed.train(_cfg(tiny_corpus), tmp_path / "run", progress=False, log=lambda s: None)
    h = m["history"]
    assert h[-1]["train_ppl"] < h[0]["train_ppl"] * 0.7
    assert m["valid_ppl"] < 0.5 * m["vocab_size"]  # far better than a uniform guess
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("params", "embedding_params", "tie", "valid_ppl", "test_ppl", "tokens_per_s", "epochs"):
        assert key in saved
    assert saved["test_ppl"] == pytest.approx(m["test_ppl"])
    assert (tmp_path / "run" / "report.md").read_text().count("|") > 10
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_save_load_round_trip_gives_identical_ppl(tiny_corpus, tmp_path, arch):
    cfg = make_config(arch, "tiny", data=str(tiny_corpus), tie="tied", epochs=1)
    m = lmembed.train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    r = lmembed.evaluate_run(tmp_path / "run", split="test", data=str(tiny_corpus))
    assert r["ppl"] == m["test_ppl"]
    model, tok, cfg2 = lmembed.load_run(tmp_path / "run")
    assert model.head.out.weight is model.embedding.weight  # still tied after loading
    assert cfg2 == cfg


def test_resume_equals_uninterrupted(tiny_corpus, tmp_path):
    cfg = _cfg(tiny_corpus, proj_reg=0.01, tie="tied")
    full = lmembed.train(cfg, tmp_path / "full", progress=False, log=lambda s: None)
    part = lmembed.train(cfg, tmp_path / "part", progress=False, log=lambda s: None, stop_after_epoch=1)
    assert not part["finished"]
    resumed = lmembed.train(cfg, tmp_path / "part", resume=True, progress=False, log=lambda s: None)
    assert [r["valid_ppl"] for r in resumed["history"]] == [r["valid_ppl"] for r in full["history"]]
    assert resumed["test_ppl"] == full["test_ppl"]


def test_same_seed_same_numbers_other_seed_differs(tiny_corpus, tmp_path):
    a = lmembed.train(_cfg(tiny_corpus, epochs=1), tmp_path / "a", progress=False, log=lambda s: None)
    b = lmembed.train(_cfg(tiny_corpus, epochs=1), tmp_path / "b", progress=False, log=lambda s: None)
    c = lmembed.train(_cfg(tiny_corpus, epochs=1, seed=1), tmp_path / "c", progress=False, log=lambda s: None)
    assert a["test_ppl"] == b["test_ppl"] != c["test_ppl"]


def test_refuses_to_overwrite_without_force(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LmembedError, match="not empty; pass --force"):
        lmembed.train(_cfg(tiny_corpus, epochs=1), out, progress=False, log=lambda s: None)
    assert (out / "notes.txt").read_text() == "mine"
    lmembed.train(_cfg(tiny_corpus, epochs=1), out, force=True, progress=False, log=lambda s: None)
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces only a run's own files


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(tiny_corpus, epochs=3)
    lmembed.train(cfg, out, progress=False, log=lambda s: None, stop_after_epoch=1)
    before = (out / "checkpoint.pt").read_bytes()
    from lmembed.models.lstm import LSTMLM

    forward, calls = LSTMLM.forward, []

    def poisoned(self, x, state=None, **kw):  # the weights blow up on the 5th training step
        out, state = forward(self, x, state, **kw)
        calls.append(1)
        return (out * float("nan"), state) if self.training and len(calls) >= 5 else (out, state)

    monkeypatch.setattr(LSTMLM, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"epoch 2 step 5: training loss is nan.*last good checkpoint is kept"):
        lmembed.train(cfg, out, resume=True, progress=False, log=lambda s: None)
    assert (out / "checkpoint.pt").read_bytes() == before
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1


def test_vocab_mismatch_on_resume(tiny_corpus, tmp_path):
    cfg = _cfg(tiny_corpus, epochs=2)
    lmembed.train(cfg, tmp_path / "run", progress=False, log=lambda s: None, stop_after_epoch=1)
    (tiny_corpus / "ptb.train.txt").write_text("completely different words here\n" * 50)
    with pytest.raises(LmembedError, match="vocabulary mismatch on resume"):
        lmembed.train(cfg, tmp_path / "run", resume=True, progress=False, log=lambda s: None)


def test_resume_with_other_config_is_refused(tiny_corpus, tmp_path):
    lmembed.train(_cfg(tiny_corpus, epochs=2), tmp_path / "run", progress=False, log=lambda s: None,
                  stop_after_epoch=1)
    with pytest.raises(LmembedError, match=r"different configuration: lr"):
        lmembed.train(_cfg(tiny_corpus, epochs=2, lr=1.0), tmp_path / "run", resume=True, progress=False,
                      log=lambda s: None)


def test_corrupt_checkpoint(tiny_corpus, tmp_path):
    cfg = _cfg(tiny_corpus, epochs=2)
    lmembed.train(cfg, tmp_path / "run", progress=False, log=lambda s: None, stop_after_epoch=1)
    ck = tmp_path / "run" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    with pytest.raises(LmembedError, match="checkpoint.pt: checkpoint is corrupt or truncated"):
        lmembed.train(cfg, tmp_path / "run", resume=True, progress=False, log=lambda s: None)


def test_truncated_weights_file(tiny_corpus, tmp_path):
    lmembed.train(_cfg(tiny_corpus, epochs=1), tmp_path / "run", progress=False, log=lambda s: None)
    w = tmp_path / "run" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(LmembedError, match="model.safetensors: cannot read weights"):
        lmembed.load_run(tmp_path / "run")


def test_window_eval_matches_full_context_when_window_covers_all():
    """Sliding windows with stride < window must score every target exactly once."""
    from lmembed.evaluation.perplexity import windows

    for n, w, s in [(10, 4, 2), (5, 4, 2), (3, 4, 4), (100, 16, 5), (17, 17, 1)]:
        scored = []
        for start, end, k in windows(n, w, s):
            assert end - start <= w and k <= end - start
            scored.extend(range(end - k, end))
        assert scored == list(range(n))


def test_transformer_window_eval_equals_manual(tiny_corpus, tmp_path):
    cfg = make_config("transformer", "tiny", data=str(tiny_corpus), epochs=1, bptt=16)
    lmembed.train(cfg, tmp_path / "t", progress=False, log=lambda s: None)
    model, tok, _ = lmembed.load_run(tmp_path / "t")
    ids = np.arange(1, 17, dtype=np.int32) % tok.vocab_size
    nll, n = lm_nll(model, ids, batch_size=1, bptt=16, device=torch.device("cpu"))
    with torch.no_grad():
        logits = model(torch.from_numpy(ids[None, :-1].astype(np.int64)))[0]
    manual = torch.nn.functional.cross_entropy(logits[0], torch.from_numpy(ids[1:].astype(np.int64)), reduction="sum")
    assert n == 15 and math.isclose(nll, manual.item(), rel_tol=1e-5)
    assert ppl(nll, n) == pytest.approx(math.exp(manual.item() / 15))


def test_max_steps_bounds_training(tiny_corpus, tmp_path):
    m = lmembed.train(_cfg(tiny_corpus, epochs=5, max_steps=7), tmp_path / "run", progress=False, log=lambda s: None)
    assert sum(r["steps"] for r in m["history"]) == 7
    assert m["epochs"] == 1 and m["finished"]
