"""lmembed eval: perplexity of a trained run on a split."""

from __future__ import annotations

from pathlib import Path

from ..common.files import write_json
from ..common.report import markdown_table, write_text
from ..errors import LmembedError
from ..training.lm import evaluate_run
from .args import progress_flag


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a trained run", description="Evaluate a run's best weights.")
    p.add_argument("run", help="run directory written by `lmembed train`")
    p.add_argument("--data", help="corpus (default: the run's own); must be readable with the run's vocabulary")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON file for the result (default: RUN/eval-SPLIT.json, plus .md)")
    p.add_argument("--seed", type=int, default=0, help="unused by evaluation itself; accepted for uniformity")
    progress_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if (Path(args.run) / "lmembed.json").is_file():  # a compressed save has a manifest, a run has none
        raise LmembedError(f"{args.run}: a compressed model saved by lmembed, not a run of `lmembed train`; "
                           "`lmembed compress` measures its cost as it writes it (--eval-text for another text), "
                           "and lmembed.open_model(folder) opens it for any other evaluation")
    res = evaluate_run(args.run, data=args.data, split=args.split, device=args.device, progress=bool(args.progress))
    out = Path(args.out) if args.out else Path(args.run) / f"eval-{args.split}.json"
    write_json(out, res)
    table = markdown_table([res], ["data", "split", "tokens", "ppl", "unk_rate"])
    write_text(out.with_suffix(".md"), f"# lmembed eval: {args.run}\n\n{table}")
    print(table, end="")
    return 0
