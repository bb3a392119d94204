"""Encoder-decoder models with tie modes, the parallel-corpus reader, decoding, the seq2seq trainer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmembed.cli import main
from lmembed.common.runtime import count_params
from lmembed.config import make_seq2seq_config
from lmembed.data.parallel import build_vocabularies, check_tie_vocab, load_parallel
from lmembed.errors import LmembedError, TrainingDiverged
from lmembed.evaluation.translation import beam_search, bleu_chrf, greedy
from lmembed.models.seq2seq import Seq2SeqTransformer
from lmembed.training.seq2seq import evaluate_seq2seq_run, load_seq2seq_run, train_seq2seq

# modern word -> a Folio-like spelling of it
SPELLING = {"upon": "vpon", "heaven": "heauen", "love": "loue", "give": "giue", "have": "haue", "again": "againe",
            "rain": "raine", "heart": "hart", "joy": "ioy", "mind": "minde", "lord": "Lord", "night": "night",
            "ever": "euer", "sweet": "sweete", "eyes": "eies", "true": "true"}


def write_parallel(root: Path, n_train: int = 600, seed: int = 0) -> Path:
    """A learnable spelling-normalisation task in the train/valid/test .src/.tgt layout."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", 60), ("test", 60)):
        modern = [" ".join(rng.choice(list(SPELLING)) for _ in range(rng.randint(2, 5))) for _ in range(n)]
        (root / f"{split}.src").write_text("".join(" ".join(SPELLING[w] for w in s.split()) + "\n" for s in modern))
        (root / f"{split}.tgt").write_text("".join(s + "\n" for s in modern))
    return root


@pytest.fixture(scope="module")
def parallel_dir(tmp_path_factory) -> Path:
    return write_parallel(tmp_path_factory.mktemp("par") / "data")


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second OpenMP thread only adds synchronisation (and on a busy
    machine, waiting for a core), so run them single-threaded and restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(data, **kw):
    # bpe 400: every word of SPELLING becomes one token, so the task is word-for-word
    base = {"data": str(data), "bpe": 400, "epochs": 2, "lr": 3e-3, "lr_schedule": "constant", "batch_size": 8,
            "bleu_sample": 20, "device": "cpu"}
    base.update(kw)
    return make_seq2seq_config("tiny", **base)


def _quiet(_msg: str) -> None:
    pass


# --- parameter counts ---------------------------------------------------------------------------
def _layers(d: int, ff: int, enc: int, dec: int) -> int:
    ln = 2 * d
    attn = 4 * d * d + 4 * d  # q, kv (2d) and out projections with biases
    mlp = d * ff + ff + ff * d + d
    return enc * (2 * ln + attn + mlp) + dec * (3 * ln + 2 * attn + mlp) + 2 * ln  # + final encoder/decoder norms


@pytest.mark.parametrize("tie,vs,vt", [("none", 300, 400), ("decoder", 300, 400), ("none", 350, 350),
                                       ("decoder", 350, 350), ("three-way", 350, 350)])
def test_parameter_counts_are_exact(tie, vs, vt):
    cfg = make_seq2seq_config("tiny", tie=tie, shared_vocab=vs == vt, d_model=32, ff=64, enc_layers=2, dec_layers=1)
    model = Seq2SeqTransformer(cfg, vs, vt)
    d = 32
    emb = {"none": vs * d + 2 * vt * d, "decoder": vs * d + vt * d, "three-way": vt * d}[tie]
    assert model.embedding_params() == emb
    assert count_params(model) == emb + vt + _layers(d, 64, 2, 1)  # + output bias


def test_tying_shares_one_parameter_and_drops_exactly_the_shared_matrices():
    counts = {}
    for tie in ("none", "decoder", "three-way"):
        m = Seq2SeqTransformer(make_seq2seq_config("tiny", tie=tie, shared_vocab=True), 300, 300)
        counts[tie] = count_params(m)
        if tie != "none":
            assert m.head.out.weight is m.tgt_embedding.weight
        assert (m.src_embedding.weight is m.tgt_embedding.weight) == (tie == "three-way")
    d = 32
    assert counts["none"] - counts["decoder"] == 300 * d
    assert counts["decoder"] - counts["three-way"] == 300 * d


# --- three-way needs one vocabulary -------------------------------------------------------------
def test_three_way_refused_with_two_vocabularies(parallel_dir):
    with pytest.raises(LmembedError, match="three-way needs one vocabulary.*--shared-vocab"):
        make_seq2seq_config("tiny", tie="three-way", shared_vocab=False)
    with pytest.raises(LmembedError, match="three-way needs one shared vocabulary"):
        Seq2SeqTransformer(make_seq2seq_config("tiny", tie="three-way", shared_vocab=True), 300, 301)
    text = load_parallel(parallel_dir)
    src_tok, tgt_tok = build_vocabularies(text, 300, shared=False)
    with pytest.raises(LmembedError, match="two BPE models"):
        check_tie_vocab("three-way", src_tok, tgt_tok)
    shared = build_vocabularies(text, 300, shared=True)
    assert shared[0] is shared[1]
    check_tie_vocab("three-way", *shared)


def test_cli_three_way_without_shared_vocab_is_one_error_line(parallel_dir, tmp_path, capsys):
    rc = main(["train-seq2seq", "--data", str(parallel_dir), "--preset", "tiny", "--tie", "three-way",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("lmembed: error: --tie three-way needs one vocabulary")
    assert not (tmp_path / "run").exists()


# --- the corpus reader --------------------------------------------------------------------------
def test_misaligned_corpus_is_a_clear_error(tmp_path):
    root = write_parallel(tmp_path / "bad", n_train=50)
    lines = (root / "train.tgt").read_text().splitlines()
    (root / "train.tgt").write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(LmembedError) as e:
        load_parallel(root)
    msg = str(e.value)
    assert "train.tgt" in msg and "47 lines" in msg and "train.src has 50" in msg and "\n" not in msg


def test_missing_file_and_empty_pairs(tmp_path):
    root = write_parallel(tmp_path / "c", n_train=20)
    (root / "valid.tgt").unlink()
    with pytest.raises(LmembedError, match="valid.tgt: file not found"):
        load_parallel(root)
    root = write_parallel(tmp_path / "d", n_train=20)
    src = (root / "train.src").read_text().splitlines()
    src[3] = "   "
    (root / "train.src").write_text("\n".join(src) + "\n\n\n")  # trailing blank lines do not count
    text = load_parallel(root)
    assert len(text.splits["train"][0]) == 19 and text.skipped["train"] == 1


# --- decoding -----------------------------------------------------------------------------------
def test_incremental_decoding_matches_full_forward_and_beam1_is_greedy():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(make_seq2seq_config("tiny", tie="three-way", shared_vocab=True), 300, 300).eval()
    src = torch.randint(1, 300, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    tgt = torch.randint(1, 300, (3, 6))
    full = torch.log_softmax(model(src, mask, tgt), -1)
    state = model.start(model.encode(src, mask), mask)
    steps = []
    for t in range(6):
        lp, state = model.step(tgt[:, t], state)
        steps.append(lp)
    assert torch.allclose(full, torch.stack(steps, 1), atol=1e-5)
    assert beam_search(model, src, mask, eos=0, max_len=12, beam=1) == greedy(model, src, mask, eos=0, max_len=12)


def test_bleu_chrf_bounds():
    refs = ["upon the heath", "when shall we three meet again"]
    assert bleu_chrf(refs, refs) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    worse = bleu_chrf(["vpon the heath", "when shall we three meet againe"], refs)
    assert 0 < worse["bleu"] < 100 and 0 < worse["chrf"] < 100


# --- training -----------------------------------------------------------------------------------
def test_training_learns_and_writes_a_complete_run(parallel_dir, tmp_path):
    out = tmp_path / "run"
    m = train_seq2seq(_cfg(parallel_dir, tie="decoder", epochs=8), out, progress=False, log=_quiet)
    h = m["history"]
    assert h[-1]["train_loss"] < 0.5 * h[0]["train_loss"]
    assert m["valid_ppl"] < 0.25 * h[0]["valid_ppl"] and m["valid_ppl"] < 3  # 16 equally likely words: 16
    assert m["test_bleu"] > m["test_copy_bleu"] + 20  # it learnt the spellings (copying scores ~1)
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("params", "embedding_params", "test_bleu", "test_chrf", "test_bleu_greedy", "valid_ppl", "history"):
        assert key in saved
    assert len((out / "test.beam.txt").read_text().splitlines()) == 60
    assert (out / "report.md").read_text().count("|") > 10 and (out / "curves.png").stat().st_size > 1000
    model, src_tok, tgt_tok, cfg = load_seq2seq_run(out, device="cpu")
    assert model.head.out.weight is model.tgt_embedding.weight  # still tied after loading
    again = evaluate_seq2seq_run(out, split="test", device="cpu", data=str(parallel_dir))
    assert again["bleu"] == pytest.approx(m["test_bleu"]) and again["ppl"] == pytest.approx(m["test_ppl"])


def test_resume_equals_uninterrupted_and_seed_matters(parallel_dir, tmp_path):
    cfg = _cfg(parallel_dir, tie="three-way", shared_vocab=True, epochs=2)
    full = train_seq2seq(cfg, tmp_path / "full", progress=False, log=_quiet)
    part = train_seq2seq(cfg, tmp_path / "part", progress=False, log=_quiet, stop_after_epoch=1)
    assert not part["finished"] and not (tmp_path / "part" / "test.beam.txt").exists()
    resumed = train_seq2seq(cfg, tmp_path / "part", resume=True, progress=False, log=_quiet)
    assert [r["valid_ppl"] for r in resumed["history"]] == [r["valid_ppl"] for r in full["history"]]
    assert resumed["test_bleu"] == full["test_bleu"] and resumed["test_ppl"] == full["test_ppl"]
    with pytest.raises(LmembedError, match="not empty; pass --force"):
        train_seq2seq(cfg, tmp_path / "full", progress=False, log=_quiet)
    other = train_seq2seq(_cfg(parallel_dir, tie="three-way", shared_vocab=True, epochs=1, seed=1),
                          tmp_path / "other", progress=False, log=_quiet)
    assert other["history"][0]["valid_ppl"] != full["history"][0]["valid_ppl"]


def test_bench_tying_seq2seq_table(parallel_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "tying", "--seq2seq", "--data", str(parallel_dir), "--preset", "tiny", "--epochs", "1",
               "--bleu-sample", "0", "--eval-pairs", "20", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "tying-seq2seq.json").read_text())
    rows = {r["model"]: r for r in res["rows"]}
    assert list(rows) == ["none", "decoder", "three-way"]
    v, d = rows["none"]["tgt_vocab"], 32
    assert rows["none"]["params"] - rows["decoder"]["params"] == v * d
    assert rows["decoder"]["params"] - rows["three-way"]["params"] == v * d
    assert rows["three-way"]["param_reduction"] == pytest.approx(2 * v * d / rows["none"]["params"])
    assert "size reduction" in (out / "tying-seq2seq.md").read_text()
    assert (out / "tying-seq2seq.png").stat().st_size > 1000
    rc = main(["bench", "tying", "--seq2seq", "--bptt", "20", "--out", str(out)])
    assert rc == 2 and "--bptt" in capsys.readouterr().err


def test_nan_loss_stops_with_the_shared_guard(parallel_dir, tmp_path, monkeypatch):
    def poisoned(self, src, src_mask, tgt_in, targets=None, label_smoothing=0.0):
        return (self.src_embedding.weight.sum() * float("nan")) if targets is not None else None

    monkeypatch.setattr(Seq2SeqTransformer, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 1 step 1: training loss is nan"):
        train_seq2seq(_cfg(parallel_dir, epochs=1), tmp_path / "run", progress=False, log=_quiet)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing diverged was saved
