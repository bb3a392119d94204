"""Vocabulary trimming: model + tokenizer remap, exact logits on kept text, round trips, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from transformers import AutoTokenizer

import lmembed
from lmembed.compression import CompressedHead, DenseEmbedding
from lmembed.compression.formats.trimmed import TrimmedEmbedding
from lmembed.errors import LmembedError
from tiny_models import ARCHS, D, V, build, word_tokenizer

WORDS = "the cat a dog bird my friend teacher child sees likes finds follows calls helps ball tree house river book " \
        "garden .".split()
CORPUS = ["the cat sees a dog .", "my friend likes the ball .", "a child finds the tree .", "the dog sees the cat ."]
KEPT_TEXT = "the dog likes the cat . a child sees my friend ."


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(CORPUS) + "\n")
    return p


def _ids(tok, text):
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def _logits(model, ids):
    kw = {"decoder_input_ids": ids} if "T5" in type(model).__name__ else {}
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_trimmed_model_has_the_original_logits_on_kept_tokens_and_round_trips(arch, corpus, tmp_path):
    tok = word_tokenizer(WORDS)
    original, model = build(arch), build(arch)
    rep = lmembed.compress(model, f"trim:{corpus}", tokenizer=tok)
    new_tok = rep.pop("tokenizer")
    kept = model.get_input_embeddings().kept.long()
    used = {t for line in CORPUS for t in line.split()}
    assert rep["vocab"]["kept"] == len(kept) == len(used) + 3 == model.config.vocab_size == len(new_tok)
    old_ids, new_ids = _ids(tok, KEPT_TEXT), _ids(new_tok, KEPT_TEXT)
    assert torch.equal(kept[new_ids], old_ids)  # a real remap: same tokens, new ids
    out = _logits(model, new_ids)
    assert out.shape[-1] == len(kept)
    assert torch.allclose(out, _logits(original, old_ids)[..., kept], atol=1e-6, rtol=0)
    # one module serves both sides of a tied model; the head's bias (BERT) is trimmed with it
    head = model.get_output_embeddings()
    assert isinstance(head, CompressedHead) and (head.embedding is model.get_input_embeddings()) == (
        arch != "llama-untied")
    folder = lmembed.save(model, tmp_path / "m", tokenizer=new_tok)
    loaded, loaded_tok = lmembed.load(folder), AutoTokenizer.from_pretrained(folder)
    assert loaded_tok(KEPT_TEXT, add_special_tokens=False)["input_ids"] == new_ids[0].tolist()
    assert torch.equal(_logits(loaded, new_ids), out)
    assert torch.equal(loaded.get_input_embeddings().kept.long(), kept)


def test_paper_protocol_keeps_a_trimmed_dense_head_and_round_trips(corpus, tmp_path):
    tok = word_tokenizer(WORDS)
    original, model = build("llama-tied"), build("llama-tied")
    rep = lmembed.compress(model, f"trim:{corpus} > int8", side="input", tokenizer=tok)
    new_tok = rep.pop("tokenizer")
    head = model.get_output_embeddings()
    kept = model.get_input_embeddings().kept.long()
    assert isinstance(head, torch.nn.Linear) and head.out_features == len(kept)
    assert torch.equal(head.weight, original.get_output_embeddings().weight[kept])
    ids = _ids(new_tok, KEPT_TEXT)
    loaded = lmembed.load(lmembed.save(model, tmp_path / "m", tokenizer=new_tok))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_stored_bytes_count_the_index_map(corpus):
    tok = word_tokenizer(WORDS)
    k = 3 + len({t for line in CORPUS for t in line.split()})
    for method, expected in [
        ("trim", k * D * 4 + k * 2),                        # fp32 rows + uint16 kept ids (V = 300 > 256)
        ("trim > int8", k * D + k * 2 + k * 2),             # + a fp16 scale per row
        ("trim > svd:8 > int8", k * 8 + k * 2 + 8 * D * 4 + k * 2),
    ]:
        rep = lmembed.compress(build("gpt2"), method.replace("trim", f"trim:{corpus}"), tokenizer=tok)
        assert rep["stored_bytes"] == expected, method
        assert rep["ratio"] == pytest.approx(V * D * 4 / expected)  # against the original V x d matrix
        assert rep["ratio_fp16"] == pytest.approx(V * D * 2 / expected)
        assert rep["shape"] == [V, D] and rep["matrices"][0]["shape"] == [k, D]


def test_min_count_and_top_n(corpus):
    tok = word_tokenizer(WORDS)
    counts = {}
    for line in CORPUS:
        for t in line.split():
            counts[t] = counts.get(t, 0) + 1
    rep = lmembed.compress(build("gpt2"), f"trim:{corpus}:2", tokenizer=tok)
    frequent = {t for t, c in counts.items() if c >= 2}
    assert rep["vocab"]["kept"] == 3 + len(frequent)
    new_tok = rep.pop("tokenizer")
    # dropped words are unknown now; the report counts the corpus tokens that hit [UNK]
    rare = sum(c for c in counts.values() if c < 2)
    assert rep["vocab"]["corpus_tokens_dropped"] == rep["vocab"]["corpus_unk_after"] == rare
    assert new_tok("the bird sees", add_special_tokens=False)["input_ids"][1] == new_tok.unk_token_id
    top = lmembed.compress(build("gpt2"), f"trim:{corpus}:top2", tokenizer=tok)["vocab"]
    assert top["kept_from_corpus"] == 2 and top["kept"] == 5  # 'the' and '.' plus the 3 specials
    # base=N also keeps the N lowest ids (3 specials, then the first words): 'bird' was never in the corpus
    based = lmembed.compress(build("gpt2"), f"trim:{corpus}:top2:base=8", tokenizer=tok)
    assert based["vocab"]["kept"] == 9 and based["vocab"]["kept_base"] == 4
    assert based["tokenizer"]("the bird", add_special_tokens=False)["input_ids"][1] != based["tokenizer"].unk_token_id


def _byte_bpe(lines: list[str], vocab_size: int = 400) -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


BPE_TRAIN = ["the quick brown fox jumps over the lazy dog", "a thoughtful thinker thinks thoroughly",
             "shakespeare wrote plays and sonnets", "brown foxes and lazy dogs sleep"] * 20


def test_byte_level_bpe_keeps_corpus_segmentation_and_encodes_any_text(tmp_path):
    tok = _byte_bpe(BPE_TRAIN)
    target = ["the quick brown fox jumps", "the lazy dog sleeps"]
    (tmp_path / "t.txt").write_text("\n".join(target) + "\n")
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                               max_position_embeddings=64, tie_word_embeddings=True)).eval()
    rep = lmembed.compress(model, f"trim:{tmp_path / 't.txt'}", tokenizer=tok)
    new_tok, vocab = rep.pop("tokenizer"), rep["vocab"]
    kept = model.get_input_embeddings().kept.long()
    assert vocab["kept"] < len(tok) and vocab["kept_alphabet"] > 0
    assert vocab["kept_merge_parents"] > 0  # tokens only used inside longer kept tokens
    for line in target:  # the target corpus tokenises exactly as before
        assert kept[_ids(new_tok, line)].tolist() == _ids(tok, line).tolist()
    held_out = "thoughtful sonnets über naïve 🙂"
    ids = new_tok(held_out, add_special_tokens=False)["input_ids"]
    assert max(ids) < len(kept) and new_tok.decode(ids) == held_out  # falls back to kept pieces, down to bytes
    assert len(ids) > len(tok(held_out, add_special_tokens=False)["input_ids"])
    merges = json.loads(new_tok.backend_tokenizer.to_str())["model"]["merges"]
    vocab_new = new_tok.get_vocab()
    assert all((a + b) in vocab_new and a in vocab_new and b in vocab_new
               for a, b in (m.split(" ", 1) if isinstance(m, str) else m for m in merges))


def test_wordpiece_alphabet_decides_between_pieces_and_unk(tmp_path):
    from tokenizers import BertWordPieceTokenizer, processors

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(BPE_TRAIN, vocab_size=200, show_progress=False)
    wp._tokenizer.post_processor = processors.BertProcessing(("[SEP]", wp.token_to_id("[SEP]")),
                                                             ("[CLS]", wp.token_to_id("[CLS]")))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", cls_token="[CLS]",
                                     sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    (tmp_path / "t.txt").write_text("the quick brown fox\nthe lazy dog\n")
    model = tf.BertModel(tf.BertConfig(vocab_size=len(tok), hidden_size=D, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    unks = {}
    for alphabet in ("none", "corpus"):
        rep = lmembed.compress(copy.deepcopy(model), f"trim:{tmp_path / 't.txt'}:alphabet={alphabet}", tokenizer=tok)
        new_tok = rep.pop("tokenizer")
        enc = new_tok("the brown thinker")
        assert enc["input_ids"][0] == new_tok.cls_token_id and enc["input_ids"][-1] == new_tok.sep_token_id
        assert new_tok.convert_ids_to_tokens(enc["input_ids"][:1]) == ["[CLS]"]
        unks[alphabet] = enc["input_ids"].count(new_tok.unk_token_id)
    assert unks == {"none": 1, "corpus": 0}  # 'thinker' is outside the corpus: [UNK], or spelled out


# --- bad input: one clear line each -------------------------------------------------------------
@pytest.mark.parametrize("method, message", [
    ("trim:{c}:99", "keeps no corpus token"),
    ("trim:{c}:top0", "keep 'top0' is invalid"),
    ("trim:/no/such/file.txt", "no such file or folder"),
    ("int8 > trim:{c}", "stage 2 ('trim:"),
    ("trim:{c}:alphabet=some", "alphabet 'some' is invalid"),
    ("trim:{c} >> int8", "empty stage"),
    ("trim:{c} > svd:32", "rank 32 must be in 1..31"),
])
def test_bad_trim_input(method, message, corpus):
    model = build("gpt2")
    w = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(LmembedError) as e:
        lmembed.compress(model, method.format(c=corpus), tokenizer=word_tokenizer(WORDS))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert torch.equal(model.get_input_embeddings().weight, w)  # nothing changed


def test_trim_needs_tokenizer_and_save_refuses_the_original(corpus, tmp_path):
    with pytest.raises(LmembedError, match="needs the model's tokenizer"):
        lmembed.compress(build("gpt2"), f"trim:{corpus}")
    model, tok = build("gpt2"), word_tokenizer(WORDS)
    lmembed.compress(model, f"trim:{corpus} > int8", tokenizer=tok)
    with pytest.raises(LmembedError, match="trimmed to 16 tokens but the tokenizer has 300"):
        lmembed.save(model, tmp_path / "m", tokenizer=tok)
    assert not (tmp_path / "m").exists()


def test_trimmed_module_spec_rebuilds():
    from lmembed.compression.formats.base import build_module

    emb = build("gpt2").get_input_embeddings()
    inner = DenseEmbedding(emb.weight.detach()[:5])
    m = TrimmedEmbedding(inner, torch.tensor([0, 3, 9, 200, 299]), V)
    again = build_module(m.spec())
    again.load_state_dict(m.state_dict())
    assert torch.equal(again.dense(), m.dense()) and again.kept.dtype == torch.uint16


# --- bench and CLI ------------------------------------------------------------------------------
def _grammar(tmp_path, n, seed, name):
    from conftest import _sentences

    p = tmp_path / name
    p.write_text("\n".join(_sentences(n, seed)) + "\n")
    return p


def test_bench_evaluates_trimmed_rows_with_their_tokenizer(tmp_path):
    from lmembed.bench.compress import bench_compress
    from tiny_models import save_folder

    folder = save_folder("llama-tied", tmp_path / "llama", WORDS)
    target, held_out = _grammar(tmp_path, 200, 0, "target.txt"), _grammar(tmp_path, 100, 7, "held.txt")
    methods = f"trim:{target},trim:{target} > int8,groupreduce:8:2:corpus={target}"
    res = bench_compress(str(folder), tmp_path / "b", text=str(held_out), methods=methods, max_tokens=600,
                         progress=False, log=lambda s: None)
    rows = {(r["method"], r["side"]): r for r in res["rows"]}
    trim = rows[(f"trim:{target}", "both")]
    assert trim["vocab"] == trim["report"]["vocab"]["kept"] and trim["unk_tokens"] == 0
    assert trim["stored_bytes"] == trim["vocab"] * (D * 4 + 2)
    # kept-token text: same logits, softmax over fewer tokens -> never worse
    assert trim["delta_pct"] < 0 and trim["eval"]["tokens_original"] == trim["eval"]["tokens_text"]
    # the paper's protocol keeps a dense head, trimmed too
    assert rows[(f"trim:{target}", "input")]["stored_bytes"] == trim["stored_bytes"] + trim["vocab"] * D * 4
    assert rows[(f"trim:{target} > int8", "both")]["metric"] == pytest.approx(trim["metric"], rel=0.01)
    assert "| vocab | unk |" in (tmp_path / "b" / "compress.md").read_text()
    assert (tmp_path / "b" / "pareto.png").stat().st_size > 1000


def test_pareto_frontier():
    from lmembed.bench.pareto import frontier

    rows = [{"method": m, "stored_bytes": b, "metric": q} for m, b, q in
            [("dense", 100, 10.0), ("a", 50, 10.5), ("b", 40, 12.0), ("c", 60, 11.0), ("d", 10, 99.0)]]
    assert [r["method"] for r in frontier(rows, lower_is_better=True)] == ["d", "b", "a", "dense"]
    flipped = [{**r, "metric": -r["metric"]} for r in rows]
    assert [r["method"] for r in frontier(flipped, lower_is_better=False)] == ["d", "b", "a", "dense"]


def test_cli_compress_trim_saves_the_remapped_tokenizer(tmp_path, capsys):
    from lmembed.cli import main
    from tiny_models import save_folder

    folder = save_folder("gpt2", tmp_path / "gpt2", WORDS)
    target, held_out = _grammar(tmp_path, 200, 0, "target.txt"), _grammar(tmp_path, 100, 7, "held.txt")
    out = tmp_path / "out"
    assert main(["compress", str(folder), "--method", f"trim:{target} > int8", "--out", str(out), "--eval-text",
                 str(held_out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    k = rep["vocab"]["kept"]
    assert k < V and rep["eval"]["compressed"]["unk_tokens"] == 0 and rep["eval"]["delta_pct"] < 1
    tok, model = AutoTokenizer.from_pretrained(out), lmembed.load(out)
    assert len(tok) == k == model.config.vocab_size
    ids = torch.tensor([tok("the cat sees a dog .")["input_ids"]])
    assert _logits(model, ids).shape == (1, 6, k)
    assert main(["compress", str(folder), "--method", "trim:nowhere.txt", "--out", str(tmp_path / "o2")]) == 2
    assert "error: method 'trim:nowhere.txt': corpus 'nowhere.txt': no such file" in capsys.readouterr().err


def test_trim_refuses_calibration_of_the_untrimmed_vocabulary(corpus):
    model = build("gpt2")
    with pytest.raises(LmembedError, match="cannot serve 'trim:"):
        lmembed.compress(model, f"trim:{corpus} > int8", tokenizer=word_tokenizer(WORDS), calib=torch.arange(50))
    assert model.config.vocab_size == V
