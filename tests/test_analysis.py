"""Embedding analysis: Spearman, OOV handling, benchmark parsing, subword lookup, rank, U/V/tied, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lmembed.cli import main
from lmembed.errors import LmembedError
from lmembed.evaluation.embeddings import agreement_sample, analyze, embedding_matrix, model_matrices
from lmembed.evaluation.rank import effective_rank, energy_rank, singular_values
from lmembed.evaluation.similarity import (
    Analogies,
    WordIndex,
    analogy_accuracy,
    load_benchmark,
    nearest_neighbours,
    parse_benchmark,
    similarity_agreement,
    spearman,
    word_similarity,
)

# Five words on the unit circle at known angles: cos(a, b) falls as the angle between them grows.
WORDS = ["<eos>", "cat", "dog", "car", "tree", "sky"]
ANGLES = {"cat": 0, "dog": 10, "car": 40, "tree": 90, "sky": 170}


def circle_matrix() -> torch.Tensor:
    E = torch.zeros(len(WORDS), 2)
    E[0] = torch.tensor([0.3, -0.7])
    for i, w in enumerate(WORDS[1:], 1):
        a = math.radians(ANGLES[w])
        E[i] = torch.tensor([math.cos(a), math.sin(a)]) * (1 + i)  # norms differ: cosine must ignore them
    return E


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_spearman_known_values_and_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one adjacent swap in 4 items: 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties take the average rank: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4) -> 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_word_similarity_on_hand_made_benchmark(tmp_path):
    E, index = circle_matrix(), WordIndex(WORDS)
    # human scores ordered like the cosines (smaller angle = more similar): rho = 1
    good = write(tmp_path / "good.txt", "# comment\ncat\tdog\t9.5\ncat car 7\n\ncat\ttree\t3\ncat\tsky\t0.5\n")
    res = word_similarity(E, index, load_benchmark(good))
    assert res["spearman"] == pytest.approx(1.0)
    assert (res["pairs"], res["covered"], res["oov_pairs"], res["benchmark"]) == (4, 4, 0, "good")
    # swap the human order of the middle two pairs: rho = 0.8 as above
    swapped = parse_benchmark(["cat dog 9", "cat car 3", "cat tree 7", "cat sky 0"], "swapped")
    assert word_similarity(E, index, swapped)["spearman"] == pytest.approx(0.8)


def test_oov_pairs_are_counted_and_left_out():
    E, index = circle_matrix(), WordIndex(WORDS)
    bench = parse_benchmark(["cat dog 9", "cat zebra 8", "cat car 7", "unicorn zebra 5", "cat tree 3", "cat sky 1"],
                            "oov")
    res = word_similarity(E, index, bench)
    assert (res["pairs"], res["covered"], res["oov_pairs"], res["oov_words"]) == (6, 4, 2, 2)
    assert set(res["oov_examples"]) == {"zebra", "unicorn"}
    assert res["spearman"] == pytest.approx(1.0)  # computed on the covered pairs only
    none = word_similarity(E, index, parse_benchmark(["foo bar 1", "baz qux 2"], "none"))
    assert none["covered"] == 0 and none["spearman"] is None


@pytest.mark.parametrize("line, bad_no", [("cat dog", 3), ("cat dog high", 3), ("cat\t\t5", 3), ("cat dog nan", 3)])
def test_malformed_benchmark_line_is_named(tmp_path, line, bad_no):
    path = write(tmp_path / "bench.txt", f"# header\ncat dog 1\n{line}\ncar tree 2\n")
    with pytest.raises(LmembedError) as e:
        load_benchmark(path)
    msg = str(e.value)
    assert f"bench.txt: line {bad_no}:" in msg and "word1 word2 score" in msg and len(msg.splitlines()) == 1


def test_missing_benchmark_and_empty_file(tmp_path):
    with pytest.raises(LmembedError, match="nope.txt: benchmark file not found"):
        load_benchmark(tmp_path / "nope.txt")
    with pytest.raises(LmembedError, match="no 'word1 word2 score' lines"):
        load_benchmark(write(tmp_path / "empty.txt", "# only a comment\n"))


def test_builtin_benchmarks_from_gensim():
    pytest.importorskip("gensim")
    simlex, ws = load_benchmark("simlex999"), load_benchmark("ws353")
    assert len(simlex.pairs) == 999 and len(ws.pairs) == 353
    assert ("old", "new", 1.58) in simlex.pairs


def test_subword_lookup_conventions():
    vocab = {"[CLS]": 0, "Ġcat": 1, "cat": 2, "##dog": 3, "ĠParis": 4, "▁tree": 5, "house": 6, "Ġthe": 7}
    index = WordIndex.from_vocab(vocab)
    assert index.lookup("cat") == 1  # the space-prefixed form is preferred over the bare piece
    assert index.lookup("paris") == 4 and index.lookup("Paris") == 4  # case variants
    assert index.lookup("tree") == 5 and index.lookup("house") == 6
    assert index.lookup("dog") is None  # a WordPiece continuation is not a word
    assert index.lookup("CLS") is None
    assert set(index.word_rows().tolist()) == {1, 2, 4, 5, 6, 7}


def test_word_vocab_is_case_insensitive():
    index = WordIndex(["<unk>", "<eos>", "jerusalem", "the"])
    assert index.lookup("Jerusalem") == 2 and index.lookup("THE") == 3 and index.lookup("Paris") is None


def test_effective_rank_and_energy_rank():
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(50, 8))
    s = singular_values(Q * 3)
    assert effective_rank(s) == pytest.approx(8.0, rel=1e-6)  # equal singular values: erank = d
    rank_one = torch.outer(torch.randn(50), torch.randn(8))
    assert effective_rank(singular_values(rank_one)) == pytest.approx(1.0, abs=1e-3)
    assert energy_rank(np.array([3.0, 1.0, 1.0]), 0.8) == 1 and energy_rank(np.array([1.0, 1.0]), 0.9) == 2


def test_matrix_agreement_rotation_invariant_and_scale_free():
    torch.manual_seed(0)
    A = torch.randn(200, 16)
    Q, _ = torch.linalg.qr(torch.randn(16, 16))
    rows = np.arange(200)
    assert similarity_agreement(A, (A @ Q) * 5, rows) == pytest.approx(1.0)
    assert abs(similarity_agreement(A, torch.randn(200, 16), rows)) < 0.1


def test_agreement_sample_is_seeded_and_can_keep_frequent_words():
    index = WordIndex(["<eos>", *[f"w{c}" for c in "abcdefghijklmnopqrst"]])  # only letters are words: w+letter
    a, b = agreement_sample(index, 21, 5, seed=1), agreement_sample(index, 21, 5, seed=1)
    assert np.array_equal(a, b) and len(a) == 5 and 0 not in a  # <eos> is not a word
    top = agreement_sample(index, 21, 50, seed=1, top=6)
    assert top.tolist() == [1, 2, 3, 4, 5]


def test_analogies_and_neighbours():
    # king - man + woman lands exactly on queen; the uncovered question is counted as such
    vocab = ["man", "woman", "king", "queen", "apple", "Ġpear"]
    E = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1], [0.1, 0, 0, 1]])
    quest = Analogies("toy", (("family", "man", "woman", "king", "queen"),
                              ("gram-x", "king", "queen", "man", "woman"),
                              ("family", "man", "woman", "king", "princess")))
    res = analogy_accuracy(E, WordIndex(vocab), quest)
    assert (res["covered"], res["correct"], res["accuracy"]) == (2, 2, 1.0)
    assert res["semantic"] == 1.0 and res["syntactic"] == 1.0
    nb = nearest_neighbours(E, WordIndex(vocab), ["apple", "zebra"], k=2)
    assert nb["apple"][0][0] == "Ġpear" and nb["zebra"] is None and len(nb["apple"]) == 2


class _Toy(nn.Module):
    def __init__(self, tied: bool, v: int = 6, d: int = 2):
        super().__init__()
        self.emb, self.out = nn.Embedding(v, d), nn.Linear(d, v)
        if tied:
            self.out.weight = self.emb.weight

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.out


class _Dense(nn.Module):
    """Stands for a compressed module: only dense() knows the matrix."""

    def __init__(self, E):
        super().__init__()
        self.codes = nn.Parameter(E.clone())

    def dense(self):
        return self.codes * 2


def test_model_matrices_untied_tied_and_compressed():
    assert set(model_matrices(_Toy(tied=False))) == {"U", "V"}
    assert set(model_matrices(_Toy(tied=True))) == {"tied"}
    enc = _Toy(tied=False)
    enc.get_output_embeddings = lambda: None
    assert set(model_matrices(enc)) == {"U"}
    E = torch.randn(6, 2)
    assert torch.equal(embedding_matrix(_Dense(E)), E * 2)
    comp = _Toy(tied=False)
    comp.emb = _Dense(E)
    comp.out = nn.Module()
    comp.out.embedding = comp.emb  # a head wrapping the input module: the tie survives compression
    assert set(model_matrices(comp)) == {"tied"} and torch.equal(model_matrices(comp)["tied"], E * 2)


def test_analyze_api_on_untied_model(tmp_path):
    model = _Toy(tied=False)
    with torch.no_grad():
        model.emb.weight.copy_(circle_matrix())
        model.out.weight.copy_(circle_matrix()[[0, 5, 2, 3, 4, 1]])  # V: cat and sky swap places
    bench = write(tmp_path / "b.txt", "cat dog 9.5\ncat car 7\ncat tree 3\ncat sky 0.5\n")
    res = analyze(model, WORDS, benchmarks=[bench], analogies=None, words=["cat", "zzz"], k=2)
    assert res["tied"] is False and set(res["matrices"]) == {"U", "V"}
    assert res["matrices"]["U"]["similarity"]["b"]["spearman"] == pytest.approx(1.0)
    # V: cosines (cat,dog..sky) = cos 160, 130, 80, 170 degrees: ranks 2,3,4,1 vs 4,3,2,1 -> 1 - 6*8/60
    assert res["matrices"]["V"]["similarity"]["b"]["spearman"] == pytest.approx(0.2)
    assert res["matrices"]["U"]["neighbours"]["cat"][0][0] == "dog"
    assert [a["a"] + a["b"] for a in res["agreement"]] == ["UV"]
    json.dumps(res)  # JSON-ready


def _run_dir(corpus, out, tie):
    """A run directory as `lmembed train` leaves it (config, tokenizer, weights), untrained: analysis only
    needs the files, and training would cost most of this test's time."""
    from lmembed.common.files import write_json
    from lmembed.config import make_config
    from lmembed.data.vocab import WordTokenizer, save_tokenizer
    from lmembed.models import build_model
    from lmembed.models.store import save_weights

    out.mkdir()
    cfg = make_config("lstm", "tiny", data=str(corpus), tie=tie)
    tok = WordTokenizer.build((corpus / "ptb.train.txt").read_text().splitlines())
    torch.manual_seed(0 if tie == "none" else 1)
    save_weights(build_model(cfg, tok.vocab_size), out / "model.safetensors")
    save_tokenizer(tok, out / "tokenizer.json")
    write_json(out / "config.json", cfg.to_dict())


def test_analyze_cli_runs_compare_and_refuse_overwrite(tiny_corpus, tmp_path, capsys):
    _run_dir(tiny_corpus, tmp_path / "untied", "none")
    _run_dir(tiny_corpus, tmp_path / "tied", "tied")
    bench = write(tmp_path / "toy.txt", "cat dog 8\nthe a 6\nball tree 2\nhouse garden 5\nteacher child 4\n"
                                        "sees likes 7\nriver book 1\nfriend teacher 6\n")
    out = tmp_path / "an"
    argv = ["analyze", str(tmp_path / "untied"), str(tmp_path / "tied"), "--benchmark", str(bench), "--analogies",
            "none", "--words", "cat,sees", "--out", str(out), "--seed", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| untied | U |" in printed and "| tied | tied |" in printed
    res = json.loads((out / "analysis.json").read_text())
    untied, tied = res["targets"]
    assert set(untied["matrices"]) == {"U", "V"} and set(tied["matrices"]) == {"tied"}
    sim = untied["matrices"]["U"]["similarity"]["toy"]
    assert sim["covered"] == 8 and -1 <= sim["spearman"] <= 1
    pairs = {(c["a"], c["b"]) for c in res["cross_agreement"]}
    assert pairs == {("untied/U", "tied/tied"), ("untied/V", "tied/tied")}
    assert untied["matrices"]["V"]["neighbours"]["cat"] and untied["settings"]["seed"] == 3
    for f in ("analysis.md", "spectra.png", "similarity.png"):
        assert (out / f).stat().st_size > 0
    assert "Nearest neighbours: tied / tied" in (out / "analysis.md").read_text()
    # refuses to overwrite; malformed benchmark: one line naming the file and line
    assert main(argv) == 2
    assert "pass --force" in capsys.readouterr().err
    bad = write(tmp_path / "bad.txt", "cat dog 8\ncat\n")
    assert main(["analyze", str(tmp_path / "tied"), "--benchmark", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmembed: error: ") and "bad.txt: line 2:" in err and len(err.splitlines()) == 1


def test_bench_tying_analysis_columns(tiny_corpus, tmp_path):
    pytest.importorskip("gensim")
    from lmembed.bench.tying import embedding_columns

    _run_dir(tiny_corpus, tmp_path / "untied", "none")
    _run_dir(tiny_corpus, tmp_path / "tied", "tied")
    rows = [{"model": "untied"}, {"model": "tied"}]
    agreement = embedding_columns({"untied": tmp_path / "untied", "tied": tmp_path / "tied"}, rows, log=lambda s: None)
    untied, tied = rows
    for key in ("simlex999_U", "simlex999_V", "ws353_U", "ws353_V", "erank_U", "erank_V"):
        assert key in untied and key in tied
    assert tied["erank_U"] == tied["erank_V"] and untied["erank_U"] != untied["erank_V"]
    assert 1 <= untied["erank_U"] <= 32
    assert [(a["a"], a["b"]) for a in agreement] == [("untied/U", "untied/V"), ("untied/U", "tied/tied"),
                                                     ("untied/V", "tied/tied")]


def test_bench_embeddings_compressed_rows(tiny_corpus, tmp_path):
    pytest.importorskip("lmembed.compression")
    from lmembed.bench.embeddings import bench_embeddings

    _run_dir(tiny_corpus, tmp_path / "tied", "tied")
    bench = write(tmp_path / "toy.txt", "cat dog 8\nthe a 6\nball tree 2\nhouse garden 5\nteacher child 4\n")
    res = bench_embeddings([str(tmp_path / "tied")], ["svd:4", "int8"], tmp_path / "b", benchmarks=[bench],
                           analogies=None, log=lambda s: None)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"none", "svd:4", "int8"} and all(r["matrix"] == "tied" for r in rows.values())
    assert rows["none"]["toy_kept"] == pytest.approx(1.0) and rows["none"]["agreement"] == 1.0
    assert rows["int8"]["ratio"] > 3 and rows["int8"]["agreement"] > 0.99  # 8-bit codes barely move cosines
    assert rows["svd:4"]["effective_rank"] <= 4 + 1e-6 and rows["svd:4"]["agreement"] < rows["int8"]["agreement"]
    assert (tmp_path / "b" / "embeddings.md").exists() and (tmp_path / "b" / "analysis.json").exists()
