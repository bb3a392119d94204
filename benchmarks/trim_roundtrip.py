"""Vocabulary trimming on real models: exactness, round trip, and what the tokenizer remap does.

    python benchmarks/trim_roundtrip.py --out runs/bench5-trim-roundtrip            # smollm2 + minilm
    python benchmarks/trim_roundtrip.py --models minilm --corpus lee --held-out lee:test

For each model: trim to the tokens the target corpus uses (``trim:CORPUS``), save with the
remapped tokenizer, reload with ``AutoTokenizer.from_pretrained`` + ``lmembed.load``, and check

1. segmentation: every chunk of the target corpus tokenises to the same tokens as before
   (new ids mapped back through the kept ids), i.e. dropping merges lost nothing on kept text;
2. exactness: on a passage of the target corpus, the reloaded model's logits equal the original
   model's logits at the kept ids (causal LMs; encoders: the hidden states), max |difference|;
3. held-out text: how many more tokens the trimmed tokenizer needs, and how many are unknown.

Writes trim_roundtrip.json and .md under --out (refuses a non-empty --out without --force).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoTokenizer

import lmembed
from lmembed.common.files import prepare_out_dir, write_json
from lmembed.common.report import markdown_table, write_text
from lmembed.common.runtime import seed_everything
from lmembed.compression.methods.counts import corpus_files, text_chunks
from lmembed.compression.methods.trim import unk_id
from lmembed.data.corpus import iter_lines
from lmembed.data.texts import load_text
from lmembed.evaluation.pretrained import model_kind
from lmembed.models.pretrained import load_pretrained


def segmentation_mismatches(tok, new_tok, kept: torch.Tensor, corpus: str) -> tuple[int, int]:
    """(chunks whose tokens differ after mapping back, chunks) over the whole target corpus."""
    files, encoding = corpus_files(corpus)
    bad = total = 0
    for f in files:
        for chunk in text_chunks(iter_lines([f], encoding)):
            old = tok(chunk, add_special_tokens=False)["input_ids"]
            new = new_tok(chunk, add_special_tokens=False)["input_ids"]
            total += 1
            bad += kept[torch.tensor(new, dtype=torch.long)].tolist() != old
    return bad, total


@torch.no_grad()
def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def run_model(name: str, corpus: str, held_out: str, out: Path, passage_tokens: int) -> dict:
    model, tok = load_pretrained(name)
    original = copy.deepcopy(model)
    rep = lmembed.compress(model, f"trim:{corpus}", tokenizer=tok)
    new_tok = rep.pop("tokenizer")
    folder = lmembed.save(model, out / name, tokenizer=new_tok, report=rep)
    loaded, loaded_tok = lmembed.load(folder), AutoTokenizer.from_pretrained(folder)
    kept = loaded.get_input_embeddings().kept.long()
    files, encoding = corpus_files(corpus)
    passage = "".join(iter_lines(files[:1], encoding))[:20000]
    old = torch.tensor([tok(passage, add_special_tokens=False)["input_ids"][:passage_tokens]])
    new = torch.tensor([loaded_tok(passage, add_special_tokens=False)["input_ids"][:passage_tokens]])
    same_tokens = torch.equal(kept[new], old)
    a, b = outputs(original, old), outputs(loaded, new)
    causal = model_kind(original) == "causal"
    if causal:
        a = a[..., kept]
    diff = (a - b).abs().max().item()
    bad, chunks = segmentation_mismatches(tok, loaded_tok, kept, corpus)
    text = load_text(held_out)
    h_old = tok(text, add_special_tokens=False)["input_ids"]
    h_new = loaded_tok(text, add_special_tokens=False)["input_ids"]
    v = rep["vocab"]
    return {
        "model": name, "corpus": corpus, "original_vocab": v["original_vocab"], "kept": v["kept"],
        "kept_from_corpus": v["kept_from_corpus"], "kept_alphabet": v["kept_alphabet"],
        "kept_merge_parents": v["kept_merge_parents"], "ratio": rep["ratio"], "stored_bytes": rep["stored_bytes"],
        "index_bytes": v["index_bytes"], "corpus_tokens": v["corpus_tokens"],
        "corpus_chunks_resegmented": bad, "corpus_chunks": chunks, "passage_tokens": old.shape[1],
        "passage_same_tokens": same_tokens, "compared": "logits at kept ids" if causal else "hidden states",
        "max_abs_diff": diff, "argmax_agree": bool((a.argmax(-1) == b.argmax(-1)).all()) if causal else None,
        "held_out": held_out, "held_out_tokens": len(h_old), "held_out_tokens_trimmed": len(h_new),
        "held_out_token_increase_pct": 100 * (len(h_new) / len(h_old) - 1),
        "held_out_unk": sum(i == unk_id(loaded_tok) for i in h_new) if unk_id(loaded_tok) is not None else 0,
        "held_out_decodes_back": loaded_tok.decode(h_new) == tok.decode(h_old),
        "autotokenizer_class": type(loaded_tok).__name__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,minilm")
    p.add_argument("--corpus", default="shakespeare", help="target corpus (bundled name: its train split)")
    p.add_argument("--held-out", default="shakespeare:test")
    p.add_argument("--passage-tokens", type=int, default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    args = p.parse_args()
    seed_everything(args.seed)
    out = prepare_out_dir(args.out, force=args.force)
    rows = [run_model(m.strip(), args.corpus, args.held_out, out, args.passage_tokens)
            for m in args.models.split(",") if m.strip()]
    write_json(out / "trim_roundtrip.json", {"rows": rows, "seed": args.seed})
    cols = ["model", "original_vocab", "kept", "ratio", "corpus_chunks_resegmented", "corpus_chunks",
            "passage_same_tokens", "compared", "max_abs_diff", "argmax_agree", "held_out_token_increase_pct",
            "held_out_unk", "held_out_decodes_back", "autotokenizer_class"]
    table = markdown_table(rows, cols)
    write_text(out / "trim_roundtrip.md", f"# Trimming round trip: `trim:{args.corpus}`, held-out "
                                          f"`{args.held_out}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
