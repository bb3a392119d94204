"""lmembed compress: compress one model's token embeddings and save it as a drop-in folder."""

from __future__ import annotations

import argparse
from typing import Any

from ..common.files import check_out_dir, json_bytes
from ..common.locks import locked
from ..common.report import markdown_table
from ..common.runtime import seed_everything
from ..compression import compress, save
from ..compression.hf import SIDES
from ..compression.registry import as_pipeline, describe_methods
from ..errors import LmembedError
from ..evaluation.pretrained import EVAL_TOKENS
from ..evaluation.subject import Subject, load_subject
from ..evaluation.targets import open_model
from ..export.blocks import BLOCK_TYPES
from .args import calib_flags, progress_flag


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="compress a model's token embeddings (svd, ae, int8, int4, pipelines)",
                       description="Compress MODEL's token embeddings in place and save a model folder that "
                                   "lmembed.load() restores.\n\nMethods:\n" + describe_methods(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="bundled name (minilm, smollm2), local HF folder, hub id, or an lmembed run dir")
    p.add_argument("--method", required=True, help="method string or pipeline, e.g. ae:128, int4:g32, 'svd:256 > int8'")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--side", default="auto", choices=SIDES,
                   help="auto: both sides (one module if tied) or the input when there is no head; input: the "
                        "paper's protocol (head stays dense)")
    calib_flags(p, apart_from="--eval-text")
    p.add_argument("--eval-text", help="evaluate dense and compressed on this text (file, folder, corpus[:split])")
    p.add_argument("--max-tokens", type=int, default=EVAL_TOKENS, help="tokens of --eval-text to evaluate on")
    p.add_argument("--gguf-type", choices=sorted(BLOCK_TYPES), metavar="TYPE",
                   help="MODEL.gguf -> OUT.gguf: llama.cpp block type of the token matrix (default: the one that holds "
                        "the method's codes exactly: int8 -> Q8_0, int4 -> Q4_0; a trim alone keeps the source's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace what lmembed wrote in --out (other files stay)")
    progress_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    as_pipeline(args.method)  # a typo fails here, before the model loads
    with locked(args.out, "output"):  # one writer for the whole command
        if str(args.model).endswith(".gguf") or str(args.out).endswith(".gguf"):
            return _run_gguf(args)
        return _run_save(args)


def _run_save(args) -> int:
    seed_everything(args.seed)
    check_out_dir(args.out, force=args.force)  # refuse early, before any heavy work
    subject = load_subject(args.model, text=args.eval_text, max_tokens=args.max_tokens,
                           progress=args.progress) if args.eval_text else None
    opened = None if subject else open_model(args.model)
    model, tok = (subject.model, subject.tokenizer) if subject else (opened.model, opened.tokenizer)
    before = subject.evaluate(model) if subject else None
    report = compress(model, args.method, calib=args.calib, calib_tokens=args.calib_tokens, side=args.side,
                      seed=args.seed, progress=args.progress, log=print, tokenizer=tok)
    new_tok = report.pop("tokenizer", None)  # trim: the remapped tokenizer goes with the model
    tok = new_tok if new_tok is not None else tok
    if subject is not None:
        report["eval"] = _evaluate_after(subject, model, new_tok, before, args.eval_text)
    table, markdown = _report_files(args.model, report)
    save(model, args.out, tokenizer=tok, force=args.force, report=report, extra_files={
        "report.json": json_bytes(report), "report.md": markdown.encode()})
    print(table, end="")
    print(f"saved to {args.out} (load with lmembed.load({str(args.out)!r}))")
    return 0


def _run_gguf(args) -> int:
    """MODEL.gguf -> OUT.gguf: the token matrix rewritten in a llama.cpp block type, the rest copied."""
    if not (str(args.model).endswith(".gguf") and str(args.out).endswith(".gguf")):
        raise LmembedError(f"{args.model} -> {args.out}: a GGUF output needs a GGUF model (MODEL.gguf --out NEW.gguf)")
    if args.eval_text:
        raise LmembedError("--eval-text: not for GGUF files; evaluate NEW.gguf with `lmembed bench compress`")
    from ..export import compress_gguf

    compress_gguf(args.model, args.method, args.out, gguf_type=args.gguf_type, calib=args.calib,
                  calib_tokens=args.calib_tokens, seed=args.seed, force=args.force)
    return 0


def _evaluate_after(subject: Subject, model: Any, new_tok: Any, before: dict, text: str) -> dict[str, Any]:
    if new_tok is not None and subject.for_tokenizer is None:
        raise LmembedError(f"--eval-text: a {subject.metric} evaluation of a trimmed vocabulary is not supported")
    after = (subject.evaluate if new_tok is None else subject.for_tokenizer(new_tok))(model)
    return {"text": text, "metric": subject.metric, "dense": before, "compressed": after,
            "delta_pct": 100 * (after[subject.metric] / before[subject.metric] - 1)}


def _report_files(model_spec: str, report: dict[str, Any]) -> tuple[str, str]:
    """(table for the terminal, report.md)."""
    rows = [{**m, "method": report["method"], "side": report["side"]} for m in report["matrices"]]
    table = markdown_table(rows, ["method", "side", "role", "kind", "stored_bytes", "ratio", "ratio_fp16",
                                  "rel_fro_error", "mean_row_cosine", "knn10_overlap"])
    extra = ""
    if "eval" in report:
        e = report["eval"]
        extra = (f"\n{e['metric']} on {e['text']}: dense {e['dense'][e['metric']]:.4g}, compressed "
                 f"{e['compressed'][e['metric']]:.4g} ({e['delta_pct']:+.2f} %)\n")
    return table + extra, f"# lmembed compress: {model_spec} with {report['method']}\n\n{table}{extra}"
