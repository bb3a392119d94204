"""A tiny Llama model as a GGUF file, written in tests with the gguf package's own writer.

The layout is what llama.cpp's converter produces for a Llama checkpoint: llama.* hyper-parameters,
a byte-level BPE tokenizer under tokenizer.ggml.* (tokens, token types, merges, scores, special
ids), and tensors under llama.cpp's names, attention q/k rows in its rotary order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers as tf

D, LAYERS, HEADS = 32, 2, 2

SENTENCES = ["the cat sees the ball", "a dog likes a tree", "the bird finds the house", "my friend follows the river",
             "the teacher calls a book", "a child helps the garden", "quick brown foxes jump over lazy dogs",
             "shakespeare wrote plays and sonnets", "thoughtful thinkers think thoroughly"] * 10


def byte_bpe(texts: list[str], vocab_size: int = 400):
    """(tokens in id order, merges 'a b') of a byte-level BPE trained on `texts`; id 0 is <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def rotary_order(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k rows (each head's two halves) -> llama.cpp's (pairs interleaved)."""
    out, inp = w.shape
    return w.reshape(heads, 2, out // heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def build_model(vocab: int, tied: bool, dim: int = D) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=64,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, rms_norm_eps=1e-6,
                         rope_theta=10000.0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a spread of row norms, like trained embeddings
        model.model.embed_tokens.weight.mul_(torch.linspace(0.5, 2.0, vocab)[:, None])
    return model


def write_gguf(path: Path, *, tied: bool = True, embd_type: str = "Q8_0", head_type: str = "F16",
               with_embd: bool = True, dim: int = D) -> Path:
    """The tiny model as a GGUF file; token_embd stored as `embd_type`, an untied output.weight as
    `head_type`, the other matrices F32 except ffn_down (F16). `dim` 256 or 512 gives rows that
    K-quants can hold."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    tokens, merges = byte_bpe(SENTENCES)
    model = build_model(len(tokens), tied, dim)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(64)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(dim // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def put(name: str, x: np.ndarray, kind: str = "F32") -> None:
        data = gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), QT[kind])
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=QT[kind])

    if with_embd:
        put("token_embd.weight", sd["model.embed_tokens.weight"], embd_type)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", rotary_order(sd[p + "self_attn.q_proj.weight"], HEADS))
        put(f"blk.{i}.attn_k.weight", rotary_order(sd[p + "self_attn.k_proj.weight"], HEADS))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], "F16")
    put("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        put("output.weight", sd["lm_head.weight"], head_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
