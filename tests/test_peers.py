"""`lmembed bench peers` and the `wiki` corpus: byte accounting to the bit, peer round trips,
missing peers, budgets and winners, resume, bad input, deterministic disjoint splits."""

from __future__ import annotations

import json
import sys
from fractions import Fraction

import pytest
import torch

from lmembed.bench import peers as P
from lmembed.errors import LmembedError

WORDS = "the cat a dog bird my friend teacher child sees likes finds follows calls helps ball tree house river book " \
        "garden .".split()
V, D = 16, 128

# configuration -> exact bits per value of a V x D matrix (codes + scales + zeros, per value)
EXPECTED_BITS = {
    "gguf:Q4_0": Fraction(18 * 8, 32), "gguf:Q4_1": Fraction(20 * 8, 32), "gguf:Q5_0": Fraction(22 * 8, 32),
    "gguf:Q5_1": Fraction(24 * 8, 32), "gguf:Q8_0": Fraction(34 * 8, 32), "gguf:MXFP4": Fraction(17 * 8, 32),
    "hqq:2b-g32": 2 + Fraction(32, 32), "hqq:3b-g64": 3 + Fraction(32, 64), "hqq:3b-g32": 3 + Fraction(32, 32),
    "hqq:4b-g64": 4 + Fraction(32, 64), "hqq:4b-g32": 4 + Fraction(32, 32), "hqq:8b-g128": 8 + Fraction(32, 128),
    "quanto:qint4-g64": 4 + Fraction(32, 64), "quanto:qint4-g32": 4 + Fraction(32, 32),
    "quanto:qint2-g32": 2 + Fraction(32, 32), "quanto:qint8": 8 + Fraction(16, D),
    "torchao:int4-g32-sym": 4 + Fraction(16, 32), "torchao:int4-g32-asym": 4 + Fraction(16 + 8, 32),
    "torchao:int3-g64-asym": 3 + Fraction(24, 64), "torchao:int8-sym": 8 + Fraction(16, D),
}


def _cfg(label: str) -> P.PeerConfig:
    (cfg,) = P.parse_peers(label)
    return cfg


def _has(family: str) -> bool:
    return P.installed(family) is not None  # find_spec("optimum.quanto") raises when optimum is absent


@pytest.mark.parametrize("label", sorted(EXPECTED_BITS))
def test_peer_bytes_exact_to_the_bit(label):
    cfg = _cfg(label)
    parts = P.peer_parts(cfg, V, D)
    assert Fraction(sum(parts.values()) * 8, V * D) == EXPECTED_BITS[label]
    assert P.peer_misfit(cfg, D) is None
    assert (P.peer_misfit(cfg, 97) is None) == (cfg.group is None)  # groups must not straddle rows


def test_gguf_block_table_matches_gguf():
    pytest.importorskip("gguf")
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, size in P.GGUF_BLOCKS.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == size


@pytest.mark.parametrize("label", sorted(EXPECTED_BITS))
def test_peer_round_trip_shape_and_measured_bytes(label):
    cfg = _cfg(label)
    if not _has(cfg.family):
        pytest.skip(f"{cfg.family} not installed")
    E = torch.randn(V, D, generator=torch.Generator().manual_seed(0)) * 0.05
    back, parts = P.quantise(E, cfg)
    assert back.shape == E.shape and back.dtype == torch.float32 and torch.isfinite(back).all()
    assert parts == P.peer_parts(cfg, V, D)  # what the library stored is what the format says
    err = ((back - E).norm() / E.norm()).item()
    assert 0 <= err < (0.02 if cfg.bits == 8 or label == "gguf:Q8_0" else 0.7)


def test_parse_peers_defaults_and_bad_names():
    labels = [c.label for c in P.parse_peers(P.DEFAULT_PEERS)]
    assert labels[:2] == ["gguf:Q4_0", "gguf:Q4_1"] and "hqq:4b-g64" in labels and len(labels) == len(set(labels))
    assert [c.label for c in P.parse_peers("hqq:4b-g64,hqq")].count("hqq:4b-g64") == 1
    for bad, what in (("awq", "not a peer"), ("hqq:7b-g64", "hqq:NAME"), ("gguf:Q4_K", "gguf:NAME"),
                      ("quanto:qint4", "quanto:NAME"), ("torchao:int4-g32", "torchao:NAME")):
        with pytest.raises(LmembedError, match=what) as e:
            P.parse_peers(bad)
        assert "--peers" in str(e.value) and "\n" not in str(e.value)


def _row(source, method, bits, metric):
    return P.make_row(source=source, method=method, bits_per_value=bits, metric=metric, delta_pct=0.0, status="ok")


def test_budget_best_and_winner():
    rows = [_row("dense", "dense", 32.0, 10.0), _row("lmembed", "kq4", 4.43, 11.0), _row("lmembed", "kq3", 3.43, 14.0),
            _row("peer", "Q4_0", 4.5, 11.5), _row("peer", "hqq3", 3.5, 13.0), _row("peer", "Q5_1", 6.0, 10.5),
            _row("peer", "missing", 4.0, None)]
    table = {b["bits"]: b for b in P.budget_table(rows, [3.0, 3.5, 4.5, 6.0, 40.0], lower_is_better=True)}
    assert table[3.0] == {"bits": 3.0, "lmembed": None, "peer": None, "winner": None}
    assert table[3.5]["lmembed"]["method"] == "kq3" and table[3.5]["peer"]["method"] == "hqq3"
    assert table[3.5]["winner"] == "peer"  # 13 < 14
    assert table[4.5]["winner"] == "lmembed" and table[4.5]["peer"]["method"] == "Q4_0"
    assert table[6.0]["peer"]["method"] == "Q5_1" and table[6.0]["winner"] == "peer"
    assert table[40.0]["lmembed"]["method"] == "kq4"  # dense is neither side
    up = P.budget_table(rows, [4.5], lower_is_better=False)[0]  # higher is better: the other way round
    assert up["lmembed"]["method"] == "kq3" and up["peer"]["method"] == "hqq3" and up["winner"] == "lmembed"
    tie = P.budget_table([_row("lmembed", "a", 4.0, 1.0), _row("peer", "b", 4.0, 1.0)], [4.0], True)[0]
    assert tie["winner"] == "tie"


@pytest.mark.parametrize("spec", ["3,x", "0", "-1", "4,nan", "33", ""])
def test_bad_bits_is_one_line(spec):
    with pytest.raises(LmembedError, match="--bits") as e:
        P.parse_bits(spec)
    assert "\n" not in str(e.value)


def test_bits_sorted_unique():
    assert P.parse_bits("8, 3,4.5,3") == [3.0, 4.5, 8.0]


def test_cli_bad_bits_one_line_before_loading(tmp_path, capsys):
    from lmembed.cli import main

    assert main(["bench", "peers", "no-such-model", "--bits", "3,four", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bits" in err and "'four'" in err
    assert not (tmp_path / "o").exists()


def _setup(tmp_path, arch="llama-tied"):
    from conftest import _sentences
    from tiny_models import save_folder

    folder = save_folder(arch, tmp_path / arch, WORDS)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(_sentences(300, 3)) + "\n")
    return str(folder), str(text)


def test_bench_rows_bits_resume_and_not_installed(tmp_path, monkeypatch):
    from lmembed.compression.formats.superblock import row_bytes
    from tiny_models import D as d
    from tiny_models import V as v

    folder, text = _setup(tmp_path)
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)  # hqq cannot be imported
    kw = dict(text=text, methods="kq4:g16,int4:g32,int8", peers="gguf:Q4_0,gguf:Q8_0,hqq:4b-g32", bits="4.5,6,9",
              max_tokens=400, progress=False, log=lambda s: None)
    res = P.bench_peers(folder, tmp_path / "b", **kw)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "kq4:g16", "int4:g32", "int8", "gguf:Q4_0", "gguf:Q8_0", "hqq:4b-g32"]
    assert all(list(r) == list(P.ROW_KEYS) for r in res["rows"])
    # lmembed rows to the bit: one tied matrix, stored once
    assert rows["kq4:g16"]["stored_bytes"] == v * row_bytes(d, 4, 16) and rows["kq4:g16"]["values"] == v * d
    assert rows["int4:g32"]["bits_per_value"] == 4 + 16 / 32 and rows["int8"]["bits_per_value"] == 8 + 16 / d
    hqq = rows["hqq:4b-g32"]
    assert hqq["status"] == "not installed" and hqq["metric"] is None and hqq["bits_per_value"] == 5.0
    assert res["peers"]["hqq"] is None
    if _has("gguf"):
        assert rows["gguf:Q4_0"]["bits_per_value"] == 4.5 and rows["gguf:Q4_0"]["status"] == "ok"
        assert res["budgets"][0]["peer"]["method"] == "gguf:Q4_0" and res["budgets"][0]["winner"] is not None
    assert json.loads((tmp_path / "b" / "peers.json").read_text())["budgets"] == res["budgets"]
    for f in ("peers.md", "peers.png"):
        assert (tmp_path / "b" / f).stat().st_size > 100
    assert "not installed" in (tmp_path / "b" / "peers.md").read_text()
    saved = sorted(p.name for p in (tmp_path / "b" / "rows").glob("*.json"))
    assert len(saved) == 6 and not any("hqq" in n for n in saved)  # a missing peer is retried next time
    row_file = next((tmp_path / "b" / "rows").glob("lmembed--int8-*.json"))
    row_file.write_text(json.dumps({**json.loads(row_file.read_text()), "metric": 123.0}))
    again = {r["method"]: r for r in P.bench_peers(folder, tmp_path / "b", **kw)["rows"]}
    assert again["int8"]["metric"] == 123.0  # read back, not recomputed
    with pytest.raises(LmembedError, match="other settings"):
        P.bench_peers(folder, tmp_path / "b", **{**kw, "max_tokens": 300})


def test_cli_peers_on_an_encoder(tmp_path, capsys):
    from lmembed.cli import main

    folder, text = _setup(tmp_path, "bert-encoder")
    out = tmp_path / "enc"
    assert main(["bench", "peers", folder, "--data", text, "--methods", "int8", "--peers", "gguf:Q8_0",
                 "--bits", "9", "--max-tokens", "400", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "peers.json").read_text())
    assert res["metric"] == "sentence_cosine" and res["lower_is_better"] is False
    assert res["rows"][0]["metric"] == pytest.approx(1.0) and res["budgets"][0]["bits"] == 9.0
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize("methods, message", [("kq9:g32", "kq9"), ("kmixed:2", "narrowest"),
                                              ("trim:lee:100 > int8", "vocabulary")])
def test_bad_method_is_refused_before_loading(tmp_path, methods, message):
    with pytest.raises(LmembedError, match=message):
        P.bench_peers("no-such-model", tmp_path / "o", text="x", methods=methods)
    assert not (tmp_path / "o").exists()


def test_identical_reconstruction_reuses_the_dense_score(tmp_path):
    pytest.importorskip("gguf")
    from lmembed.evaluation.subject import load_subject

    folder, text = _setup(tmp_path)
    subject = load_subject(folder, text=text, max_tokens=400)
    weight = subject.model.get_input_embeddings().weight
    cfg = _cfg("gguf:Q8_0")
    with torch.no_grad():  # a matrix Q8_0 already holds exactly (as SmolLM2's, shipped in Q8_0)
        weight.copy_(P.quantise(weight.detach().float(), cfg)[0])
    before = weight.detach().clone()
    dense = P.dense_row(subject, None)
    row = P.peer_row(subject, cfg, "x", dense, 0)
    assert row["identical_to_dense"] and row["metric"] == dense["metric"] and row["eval_seconds"] == 0.0
    lossy = P.peer_row(subject, _cfg("gguf:Q4_0"), "x", dense, 0)
    assert not lossy["identical_to_dense"] and lossy["metric"] != dense["metric"] and lossy["rel_fro_error"] > 0
    assert torch.equal(weight, before)  # the swapped-in reconstruction is taken out again


# --- the wiki corpus -----------------------------------------------------------------------------
WIKITEXT = """{{Infobox thing|name={{lang|fr|Chose}}|x=1}}
'''Thing''' is a [[concept|notion]] in [[philosophy]]<ref name="a">{{cite book|title=T}}</ref> studied by many people.
[[File:Thing.png|thumb|A [[picture]] of a thing]]
{| class="wikitable"
| a || b {{nested|{{deep}}}}
|}
Short line.
== History ==
The <small>first</small> use of the ''word'' dates from 1539 ({{circa}}) and spread across Europe quickly.
* a list item with enough words to be kept if lists were kept at all
== See also ==
This paragraph is back matter and must never appear in the cleaned output text.
[[Category:Things]]
"""


def test_clean_wikitext_strips_markup():
    from lmembed.data.wiki import clean_wikitext

    assert clean_wikitext(WIKITEXT) == [
        "Thing is a notion in philosophy studied by many people.",
        "The first use of the word dates from 1539 and spread across Europe quickly.",
    ]


def test_wiki_splits_deterministic_disjoint(tmp_path, monkeypatch):
    pytest.importorskip("gensim")
    from lmembed.data import wiki
    from lmembed.data.bundled import gensim_test_file
    from lmembed.data.texts import load_text

    dump = gensim_test_file(wiki.DUMP)
    monkeypatch.setenv("LMEMBED_CACHE", str(tmp_path / "one"))
    first = wiki.wiki_files(dump)
    titles = json.loads((first["test"][0].parent / "articles.json").read_text())
    assert titles["test"] == list(wiki.TEST_TITLES) and titles["valid"] == list(wiki.VALID_TITLES)
    assert len(titles["train"]) == 52
    sets = [set(titles[s]) for s in ("train", "valid", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    test_text = load_text("wiki:test")
    assert test_text == load_text("wiki") and len(test_text.split()) > 7000
    assert not any(m in test_text for m in ("{{", "}}", "[[", "<ref", "'''"))
    train_lines = set(load_text("wiki:train").splitlines()) - {""}
    assert not train_lines & (set(test_text.splitlines()) - {""})  # not a paragraph shared
    monkeypatch.setenv("LMEMBED_CACHE", str(tmp_path / "two"))  # a fresh build gives the same bytes
    second = wiki.wiki_files(dump)
    assert all(first[s][0].read_bytes() == second[s][0].read_bytes() for s in first)
