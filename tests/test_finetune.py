"""Fine-tuning with compressed embeddings: tasks, training modes, seeds, resume, bench, CLI."""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest
import torch

import lmembed
import lmembed.training.finetune as ft
from lmembed.bench.finetune import bench_finetune, compare_ae_svd
from lmembed.cli import main
from lmembed.compression import FactorizedEmbedding, QuantizedEmbedding
from lmembed.errors import LmembedError
from lmembed.evaluation.classification import classification_metrics
from lmembed.tasks import load_task, seeded_split
from lmembed.tasks import polarity as pol
from lmembed.training.finetune import (
    FinetuneConfig,
    epochs_to_fraction,
    finetune,
    freeze_scales,
    set_embedding_training,
    train_seed,
)
from tiny_models import build, save_folder, word_tokenizer

GOOD = ["good", "great", "fine", "nice"]
BAD = ["bad", "awful", "poor", "sad"]
FILL = [f"w{i}" for i in range(30)]
WORDS = GOOD + BAD + FILL
FAST = FinetuneConfig(epochs=4, lr=1e-2, batch_size=16, max_length=16, warmup=0.1, evals_per_epoch=2,
                      device="cpu")


def _sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """A trivially separable task: the polarity word decides the label, the filler is noise."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        words = rng.sample(FILL, 4) + [rng.choice(GOOD if pos else BAD)]
        rng.shuffle(words)
        rows.append((" ".join(words), "pos" if pos else "neg"))
    return rows


def _csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return save_folder("bert-encoder", tmp_path_factory.mktemp("enc") / "model", WORDS)


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    return _csv(tmp_path_factory.mktemp("task") / "toy.csv", _sentences(240))


# --- learning ------------------------------------------------------------------------------------
def test_tiny_model_learns_separable_task_dense_and_compressed(tiny_encoder, tiny_task, tmp_path):
    rep = finetune(tiny_encoder, tiny_task, tmp_path / "dense", config=FAST, seeds=[0], log=lambda s: None)
    assert rep["summary"]["test_accuracy"]["mean"] > 0.9
    assert rep["results"][0]["history"][-1]["valid_accuracy"] > 0.9
    model = lmembed.load(lmembed.save(_compressed("svd:8"), tmp_path / "svd8", tokenizer=word_tokenizer(WORDS)))
    before = model.get_input_embeddings().codes.weight.detach().clone()
    rep = finetune(tmp_path / "svd8", tiny_task, tmp_path / "ft-svd", config=FAST, seeds=[0], log=lambda s: None)
    assert rep["summary"]["test_accuracy"]["mean"] > 0.9
    assert rep["embedding"]["kind"] == "factorized" and rep["embedding"]["ratio"] > 1
    assert set(rep["trainable"]["trainable"]) == {"codes.weight", "decoder"}
    # the saved folder is never modified by fine-tuning
    again = lmembed.load(tmp_path / "svd8").get_input_embeddings().codes.weight
    assert torch.equal(again, before)


def _compressed(method: str):
    model = build("bert-encoder")
    lmembed.compress(model, method, progress=False)
    return model


def test_same_seed_same_numbers_other_seed_differs(tiny_encoder, tiny_task):
    task = load_task(tiny_task)
    cfg = FinetuneConfig(epochs=1, lr=3e-3, batch_size=16, max_length=16, evals_per_epoch=2, device="cpu")
    a, b, c = (train_seed(tiny_encoder, task, cfg, s, log=lambda s: None) for s in (0, 0, 1))
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in a["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in b["history"]]
    assert a["test_accuracy"] == b["test_accuracy"]
    assert [h["train_loss"] for h in a["history"]] != [h["train_loss"] for h in c["history"]]


# --- what the embeddings may learn ---------------------------------------------------------------
@pytest.mark.parametrize(("mode", "expected"), [("train", {"codes.weight", "decoder", "bias"}),
                                                ("decoder", {"decoder", "bias"}), ("freeze", set())])
def test_embedding_modes_on_factorized(mode, expected):
    model = _compressed("ae:8:epochs=1")
    emb = model.get_input_embeddings()
    assert isinstance(emb, FactorizedEmbedding) and emb.bias is not None
    info = set_embedding_training(model, mode)
    assert set(info["trainable"]) == expected
    assert {n for n, p in emb.named_parameters() if p.requires_grad} == expected
    assert model.encoder.layer[0].attention.self.query.weight.requires_grad  # the body always trains


def test_int_scales_train_in_fp32_and_return_to_fp16(tiny_task, tmp_path, monkeypatch):
    model = _compressed("int4")
    q = model.get_input_embeddings()
    assert isinstance(q, QuantizedEmbedding)
    ids = torch.arange(50)
    ref = q(ids).clone()
    info = set_embedding_training(model, "train")
    assert info["trainable"] == ["scales"] and q.scales.dtype == torch.float32 and q.scales.requires_grad
    assert torch.equal(q(ids), ref)  # unfreezing changes nothing numerically
    freeze_scales(q)
    assert q.scales.dtype == torch.float16 and "scales" in dict(q.named_buffers())
    assert set_embedding_training(model, "train", train_scales=False)["trainable_params"] == 0
    # a fine-tune in train mode moves the scales but never the packed codes, and ends in fp16
    saved = lmembed.save(_compressed("int8"), tmp_path / "int8", tokenizer=word_tokenizer(WORDS))
    orig = lmembed.load(saved).get_input_embeddings()
    seen, real = {}, ft.load_encoder

    def spy(spec):
        seen["enc"], tok = real(spec)
        return seen["enc"], tok

    monkeypatch.setattr(ft, "load_encoder", spy)
    cfg = FinetuneConfig(epochs=1, lr=1e-2, batch_size=16, max_length=16, device="cpu")
    res = ft.train_seed(saved, load_task(tiny_task), cfg, 0, log=lambda s: None)
    assert res["embeddings"]["trainable"] == ["scales"] and res["embedding_info"]["kind"] == "quantized"
    tuned = seen["enc"].get_input_embeddings()
    assert tuned.scales.dtype == torch.float16 and not torch.equal(tuned.scales, orig.scales)
    assert torch.equal(tuned.packed, orig.packed)


# --- tasks ---------------------------------------------------------------------------------------
def test_missing_label_column_is_a_clear_error(tmp_path):
    path = _csv(tmp_path / "t.csv", _sentences(20), header="sentence,label")
    with pytest.raises(LmembedError, match=r"t\.csv: no column 'text' in the header \(columns: sentence, label\)"):
        load_task(path)
    with pytest.raises(LmembedError, match="no column 'polarity'.*--label-col"):
        load_task(path, text_col="sentence", label_col="polarity")
    jl = tmp_path / "t.jsonl"
    jl.write_text(json.dumps({"text": "a b", "label": 1}) + "\n" + json.dumps({"text": "c d"}) + "\n")
    with pytest.raises(LmembedError, match=r"t\.jsonl: line 2 has no 'label' field \(fields: text\)"):
        load_task(jl)


def test_single_class_and_unseen_label_are_errors(tmp_path):
    one = _csv(tmp_path / "one.csv", [(t, "pos") for t, _ in _sentences(30)])
    with pytest.raises(LmembedError, match=r"one\.csv: label column 'label' has a single class \('pos' in all 30"):
        load_task(one)
    folder = tmp_path / "split"
    folder.mkdir()
    _csv(folder / "train.csv", _sentences(30))
    _csv(folder / "dev.csv", [("a b", "pos"), ("c d", "maybe")])
    with pytest.raises(LmembedError, match=r"dev\.csv: line 3: label 'maybe' does not occur in the training split"):
        load_task(folder)


def test_non_utf8_line_reported_with_its_number(tmp_path):
    for name, lines in (("t.csv", [b"text,label", b"good day,pos", b"caf\xe9 bad,neg"]),
                        ("t.jsonl", [b'{"text": "good", "label": 1}', b'{"text": "caf\xe9", "label": 0}']),
                        ("t.tsv", [b"text\tlabel", b"a\tpos", b"b\tneg", b"\xff\xfe\tpos"])):
        path = tmp_path / name
        path.write_bytes(b"\n".join(lines) + b"\n")
        with pytest.raises(LmembedError, match=rf"{name}: line {len(lines)} is not valid UTF-8"):
            load_task(path)


def test_formats_pairs_and_folder_splits(tmp_path):
    rows = _sentences(50)
    jl = tmp_path / "t.jsonl"
    jl.write_text("".join(json.dumps({"a": t, "b": "x", "y": int(y == "pos")}) + "\n" for t, y in rows))
    task = load_task(jl, text_col="a,b", label_col="y")
    assert task.label_names == ["0", "1"] and task.splits["train"].pairs is not None
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 40, "valid": 5, "test": 5}
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f'say "{t}\t{y}\n' for t, y in rows))
    assert load_task(tsv).splits["train"].texts[0].startswith('say "')  # quotes are text in TSV
    folder = tmp_path / "f"
    folder.mkdir()
    _csv(folder / "train.csv", rows)
    _csv(folder / "test.csv", rows[:7])
    task = load_task(folder, split_seed=3)
    assert len(task.splits["test"]) == 7 and len(task.splits["valid"]) == 5 and len(task.splits["train"]) == 45
    sub = task.limit_train(10, seed=1)
    assert len(sub.splits["train"]) == 10 and sub.splits["valid"] is task.splits["valid"]
    assert set(sub.splits["train"].texts) <= set(task.splits["train"].texts)


def test_seeded_split_is_fixed_disjoint_and_complete():
    a, b, c = seeded_split(101, 0), seeded_split(101, 0), seeded_split(101, 1)
    assert a == b and a != c
    assert sorted(a["train"] + a["valid"] + a["test"]) == list(range(101))
    assert (len(a["train"]), len(a["valid"]), len(a["test"])) == (81, 10, 10)


def _fake_sdist(path, content: bytes):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        info = tarfile.TarInfo(pol.MEMBER)
        info.size = len(content)
        t.addfile(info, io.BytesIO(content))
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo(pol.INNER)
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))


def test_polarity_from_cached_sdist(monkeypatch, tmp_path):
    monkeypatch.setenv("LMEMBED_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LmembedError, match="polarity data not fetched yet; run `python -m lmembed.tasks fetch`"):
        pol.data_file(fetch=False)
    lines = [f"{i}\t{r}\tsentence number {i} caf\u00e9" for i, r in
             enumerate([2.5, -1.25, 0, 0.1, -3.0] * 8 + [0.0], 1)]
    content = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    folder = pol.cache_dir()
    folder.mkdir(parents=True)
    _fake_sdist(folder / pol.SDIST, content)
    with pytest.raises(LmembedError, match="unexpected checksum"):
        pol.data_file(fetch=False)
    import hashlib

    monkeypatch.setattr(pol, "SHA256", hashlib.sha256(content).hexdigest())
    task = load_task("polarity", split_seed=0)
    assert task.label_names == ["negative", "positive"]
    assert sum(len(s) for s in task.splits.values()) == 32 and "9 sentences rated exactly 0" in task.notes[0]
    texts = {t: y for s in task.splits.values() for t, y in zip(s.texts, s.labels, strict=True)}
    assert texts["sentence number 1 café"] == 1 and texts["sentence number 2 café"] == 0
    assert texts["sentence number 4 café"] == 1
    assert load_task("polarity", split_seed=0).splits["test"].texts == task.splits["test"].texts
    (folder / pol.SDIST).write_bytes(b"not a tarball")
    (folder / pol.FILENAME).unlink()
    with pytest.raises(LmembedError, match="corrupt or truncated archive"):
        pol.data_file(fetch=False)


# --- reports, resume, bench, CLI -----------------------------------------------------------------
def test_metrics_and_epochs_to_99():
    m = classification_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 2)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert classification_metrics([1, 1], [1, 1], 3)["macro_f1"] == 1.0  # absent classes do not count
    hist = [{"epoch": e, "valid_accuracy": a} for e, a in ((0.5, 0.6), (1.0, 0.86), (1.5, 0.8), (2.0, 0.865))]
    assert epochs_to_fraction(hist) == 1.0


def test_resume_uses_cached_seeds_and_refuses_other_settings(tiny_encoder, tiny_task, tmp_path, monkeypatch):
    cfg = FinetuneConfig(epochs=1, lr=3e-3, batch_size=32, max_length=16, device="cpu")
    rep = finetune(tiny_encoder, tiny_task, tmp_path / "run", config=cfg, seeds=[0, 1], log=lambda s: None)
    assert len(rep["summary"]["test_accuracy"]["values"]) == 2 and rep["summary"]["test_accuracy"]["std"] is not None
    for f in ("finetune.json", "finetune.md", "curves.png", "loss.png", "seeds/seed-0.json", "seeds/seed-1.json"):
        assert (tmp_path / "run" / f).is_file()
    monkeypatch.setattr(ft, "train_seed", lambda *a, **k: pytest.fail("a cached seed was trained again"))
    again = finetune(tiny_encoder, tiny_task, tmp_path / "run", config=cfg, seeds=[0, 1], log=lambda s: None)
    assert again["summary"] == rep["summary"]
    with pytest.raises(LmembedError, match="other settings; pass --force"):
        finetune(tiny_encoder, tiny_task, tmp_path / "run", config=FinetuneConfig(epochs=2), seeds=[0])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(LmembedError, match="not empty and not a finetune run folder; pass --force"):
        finetune(tiny_encoder, tiny_task, tmp_path / "mine", config=cfg, seeds=[0])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_bench_table_comparison_and_resume(tiny_encoder, tiny_task, tmp_path, monkeypatch):
    cfg = FinetuneConfig(epochs=1, lr=3e-3, batch_size=32, max_length=16, device="cpu")
    task = load_task(tiny_task)
    res = bench_finetune(str(tiny_encoder), task, tmp_path / "b", methods="dense,svd:8,ae:8:epochs=2,int8",
                         seeds=[0, 1], config=cfg, log=lambda s: None)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "svd:8", "ae:8:epochs=2", "int8"]
    assert rows["dense"]["ratio"] == 1.0 and rows["svd:8"]["ratio"] > 3 and rows["int8"]["ratio"] > 3.5
    assert [c["rank"] for c in res["comparisons"]] == [8] and res["comparisons"][0]["seeds"] == 2
    assert (tmp_path / "b" / "models").is_dir() and len(list((tmp_path / "b" / "models").iterdir())) == 3
    md = (tmp_path / "b" / "bench_finetune.md").read_text()
    assert "| svd:8 |" in md and "rank 8: ae - svd" in md and (tmp_path / "b" / "bench_finetune.png").is_file()
    import lmembed.bench.finetune as bf

    monkeypatch.setattr(bf, "finetune", lambda *a, **k: pytest.fail("a cached row was fine-tuned again"))
    monkeypatch.setattr(bf, "compress", lambda *a, **k: pytest.fail("a cached model was compressed again"))
    assert bench_finetune(str(tiny_encoder), task, tmp_path / "b", methods="dense,svd:8,ae:8:epochs=2,int8",
                          seeds=[0, 1], config=cfg, log=lambda s: None)["rows"] == res["rows"]


def test_compare_pairs_by_seed():
    rows = [{"method": "svd:4", "seeds": [0, 1], "test_accuracy": [0.80, 0.82]},
            {"method": "ae:4", "seeds": [0, 1], "test_accuracy": [0.81, 0.80]},
            {"method": "ae:2", "seeds": [0, 1], "test_accuracy": [0.7, 0.7]}]
    (c,) = compare_ae_svd(rows)
    assert c["rank"] == 4 and c["ae_at_least_svd_seeds"] == 1
    assert c["diff_points"]["mean"] == pytest.approx(-0.5) and not c["holds"]


def test_cli_finetune_and_one_line_errors(tiny_encoder, tiny_task, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["finetune", str(tiny_encoder), "--task", str(tiny_task), "--out", str(out), "--seeds", "1",
               "--epochs", "1", "--lr", "3e-3", "--max-length", "16", "--device", "cpu", "--freeze-embeddings",
               "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "finetune.json").read_text())
    assert rep["config"]["embeddings"] == "freeze" and rep["trainable"]["trainable_params"] == 0
    assert "test accuracy" in capsys.readouterr().out
    rc = main(["finetune", str(tiny_encoder), "--task", str(tiny_task), "--out", str(tmp_path / "x"),
               "--label-col", "stars"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("lmembed: error: ") and "'stars'" in err
    assert not (tmp_path / "x").exists()
