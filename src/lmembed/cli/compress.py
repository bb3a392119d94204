"""lmembed compress: shrink one model's token embeddings and save it where users run models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..common.files import check_out_dir, json_bytes
from ..common.locks import locked
from ..common.runtime import seed_everything
from ..common.steps import Steps, human_bytes
from ..compression import compress, save
from ..compression.calibration.calibrate import resolve_calibration
from ..compression.choose import check_bits, choose
from ..compression.integration.sites import SIDES, find_sites
from ..compression.registry import as_pipeline, describe_methods
from ..errors import LmembedError
from ..evaluation.quick import quality_check
from ..export.blocks import BLOCK_TYPES
from .args import calib_flags, positive_tokens, progress_flag
from .summary import Quality, open_source, summary_table

EXAMPLES = """\
examples:
  lmembed compress smollm2 --bits 4.5 --out smollm2-4.5        # transformers folder, method chosen for you
  lmembed compress smollm2 --bits 4.5 --out smollm2.gguf       # llama.cpp: a calibrated GGUF block type
  lmembed compress minilm --bits 4 --out minilm-4              # a sentence encoder
  lmembed compress smollm2 --bits 4.5 --no-calib --out s2      # calibration-free (kq4:g32)
  lmembed compress smollm2 --method "tc:3.5" --out s2-tc       # choose the method yourself
"""

RECOMMENDED = """\
--bits B chooses (B = stored bits per value, everything counted):
  a model with an output layer   tc:B        calibrated transform coding (default calibration: text sampled
                                             from the model itself, nothing from your domain needed)
  an encoder without one         kmixed:B    calibrated per-row super-block widths (calibration: bundled text)
  --no-calib                     kqW:gG      the widest super-block code that fits B
  above 8.5 bits                 int8        a scale per row
  OUT.gguf                       a llama.cpp block type that fits B, rounded against the calibration

every method (--method, for experts; stages compose with '>'):
"""


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="shrink a model's token embeddings (--bits B chooses the method)",
                       description="Compress MODEL's token embeddings and save a model that transformers (after "
                                   "`import lmembed`) or llama.cpp (OUT.gguf) loads. Prints the whole model's size "
                                   "before and after and the quality cost on held-out text.\n\n" + RECOMMENDED
                                   + describe_methods(),
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="bundled name (smollm2, minilm), a transformers folder, a hub id, a .gguf file, "
                                 "or an lmembed run or save")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--bits", type=_bits, metavar="B",
                      help="stored bits per value, everything counted (e.g. 4.5 = 7.1x smaller than fp32): lmembed "
                           "chooses the method for the model and the output")
    what.add_argument("--method", help="for experts: a method or pipeline, e.g. tc:4.5, kq4:g32, 'svd:256 > int8'")
    p.add_argument("--out", required=True, help="output model folder, or NEW.gguf (MODEL must then be a .gguf)")
    p.add_argument("--no-calib", action="store_true", help="with --bits: a calibration-free method (no model run)")
    calib_flags(p, apart_from="--eval-text")
    p.add_argument("--eval-text", help="text for the quality check (default: the bundled wiki:test, which no "
                                       "calibration reads); a file, folder or corpus[:split]")
    p.add_argument("--no-eval", action="store_true", help="skip the quality check")
    p.add_argument("--max-tokens", type=positive_tokens, default=None, metavar="N",
                   help="tokens of the quality-check text (default: 4096 for causal LMs)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="dtype of the rest of the model (default auto: the source's, bf16 for a GGUF source)")
    p.add_argument("--side", default="auto", choices=SIDES,
                   help="auto: both sides (one module if tied) or the input when there is no head; input: the "
                        "paper's protocol (head stays dense)")
    p.add_argument("--gguf-type", choices=sorted(BLOCK_TYPES), metavar="TYPE",
                   help="OUT.gguf: llama.cpp block type of the token matrix (default: chosen by --bits, or the one "
                        "that holds --method's codes exactly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an earlier lmembed output in --out")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    progress_flag(p)
    p.set_defaults(func=run)


def _bits(text: str) -> float:
    try:
        return check_bits(float(text))
    except (ValueError, LmembedError) as e:
        raise argparse.ArgumentTypeError(str(e) if isinstance(e, LmembedError) else f"expected a number, not "
                                         f"{text!r}") from None


def run(args) -> int:
    if args.method is not None:
        as_pipeline(args.method)  # a typo or an impossible pipeline fails here, before the model loads
        if args.no_calib:
            raise LmembedError("--no-calib goes with --bits (a --method says itself whether it calibrates)")
    gguf = str(args.model).endswith(".gguf") or str(args.out).endswith(".gguf")
    with locked(args.out, "output"):  # one writer for the whole command
        return _run_gguf(args) if gguf else _run_save(args)


def _run_save(args) -> int:
    seed_everything(args.seed)
    check_out_dir(args.out, force=args.force, inputs=(args.model,))  # refuse early, before any heavy work
    steps = Steps(quiet=args.quiet, progress=args.progress)
    opened, sizes = open_source(args.model, steps)
    model, tok = opened.model, opened.tokenizer
    method, why = _method(args, model)
    steps.say(f"method: {method}" + (f" ({why})" if why else ""))
    check = None if args.no_eval else quality_check(opened, args.eval_text, args.max_tokens, steps)
    stats = _calibrate(args, model, tok, method, steps)
    with steps.step("fit") as s:
        report = compress(model, method, calib=stats if stats is not None else args.calib, side=args.side,
                          seed=args.seed, progress=steps.bars, log=steps.say, tokenizer=tok)
        s.note = f"{report['method']}, embedding {human_bytes(report['stored_bytes'])} ({report['ratio']:.2f}x smaller)"
    new_tok = report.pop("tokenizer", None)  # trim: the remapped tokenizer goes with the model
    tok = new_tok if new_tok is not None else tok
    if why:
        report["chosen"] = {"bits": args.bits, "method": method, "why": why}
    if check is not None:
        report["eval"] = check.after(model, new_tok, steps)
    sizes.set_body(model, args.dtype)
    with steps.step("save") as s:
        report["whole_model"] = sizes.report()  # what the tensors hold; the file size is added below
        table = summary_table(args.model, report, Quality.of(report))
        save(model, args.out, tokenizer=tok, force=args.force, report=report,
             extra_files={"report.json": json_bytes(report), "report.md": _markdown(args.model, table).encode()})
        s.note = f"{args.out} ({human_bytes(sizes.saved_bytes(Path(args.out)))} of weights)"
    print(table, end="")
    print(f"saved to {args.out}: lmembed.load({str(args.out)!r}), or AutoModel*.from_pretrained after `import lmembed`")
    return 0


def _method(args, model: Any) -> tuple[str, str]:
    """(method text, why it was chosen: empty for a --method the user gave)."""
    if args.method is not None:
        return args.method, ""
    sites = find_sites(model)
    v, d = sites.input_weight.shape
    c = choose(args.bits, num_embeddings=v, dim=d, has_head=sites.output_module is not None,
               calibrate=not args.no_calib)
    return c.method, c.why


def _calibrate(args, model: Any, tok: Any, method: str, steps: Steps) -> Any:
    """The calibration statistics a calibrated method needs (None: it needs none), as one step."""
    if not any(m.needs_calib for m in as_pipeline(method)) or as_pipeline(method)[0].vocabulary:
        return None  # a trimmed vocabulary calibrates inside compress, on the trimmed model
    with steps.step("calibrate") as s:
        stats = resolve_calibration(model, [method], args.calib, tokenizer=tok, tokens=args.calib_tokens,
                                    seed=args.seed, progress=steps.bars)
        s.cached = bool(getattr(stats, "from_cache", False))
        s.note = f"{stats.tokens:,} tokens of {stats.source}" + (", seed " + str(args.seed) if stats.source in (
            "model", "model+mix") else "")
    return stats


def _markdown(model_spec: str, table: str) -> str:
    return f"# lmembed compress {model_spec}\n\n{table}"


def _run_gguf(args) -> int:
    """MODEL.gguf -> OUT.gguf: the token matrix rewritten in a llama.cpp block type, the rest copied."""
    from ..models.pretrained import bundled_gguf

    model = bundled_gguf(args.model) if str(args.out).endswith(".gguf") else None
    model = model or str(args.model)
    if not (model.endswith(".gguf") and str(args.out).endswith(".gguf")):
        raise LmembedError(f"{args.model} -> {args.out}: a GGUF output needs a GGUF model (MODEL.gguf, or a bundled "
                           "model that ships as one, --out NEW.gguf)")
    if args.eval_text:
        raise LmembedError("--eval-text: not for GGUF files; evaluate NEW.gguf with `lmembed bench compress`")
    from ..export import compress_gguf

    compress_gguf(model, args.method, args.out, gguf_type=args.gguf_type, bits=args.bits, calib=args.calib,
                  calibrate=not args.no_calib, calib_tokens=args.calib_tokens, seed=args.seed, force=args.force)
    return 0
