"""lmembed export: an lmembed save in a format other runtimes load without lmembed."""

from __future__ import annotations

from pathlib import Path

from ..errors import LmembedError
from ..export.hf import EXPORT_DTYPES, export_hf

FORMATS = ("hf",)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="a compressed save as a plain transformers folder (dense reconstruction)",
                       description="Write DIR (a folder of lmembed.save / `lmembed compress`) as a standard "
                                   "transformers folder: every compressed matrix replaced by its dense "
                                   "reconstruction, the smaller vocabulary of a trim kept. llama.cpp users: "
                                   "`lmembed compress FILE.gguf --method ... --out NEW.gguf` writes GGUF directly.")
    p.add_argument("folder", metavar="DIR", help="a folder written by lmembed.save or `lmembed compress`")
    p.add_argument("--format", default="hf", choices=FORMATS, help="hf: transformers folder (default)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, help="weights' dtype (default: the model's own)")
    p.add_argument("--force", action="store_true", help="replace a previous export in --out (other files stay)")
    p.add_argument("--seed", type=int, default=0, help="unused (export is deterministic); accepted for uniformity")
    p.set_defaults(func=run)


def run(args) -> int:
    _check_folder(args.folder)
    rep = export_hf(args.folder, args.out, dtype=args.dtype, force=args.force)
    print(f"wrote {rep['out']} ({rep['bytes']:,} bytes, {rep['dtype']}): load it with "
          f"transformers' from_pretrained; lmembed is not needed")
    return 0


def _check_folder(folder: str) -> None:
    """A file given where a save folder is expected: say what it is and what to run instead."""
    p = Path(folder).expanduser()
    if not p.is_file():
        return
    with open(p, "rb") as f:
        gguf = f.read(4) == b"GGUF"
    if gguf:
        raise LmembedError(f"{folder}: a GGUF file, not an lmembed save; llama.cpp runs it as it is, `lmembed compress "
                           f"{folder} --bits B --out NEW.gguf` writes a copy with compressed token embeddings, and "
                           "transformers makes a plain folder of it: AutoModelForCausalLM.from_pretrained(its folder, "
                           "gguf_file=its name).save_pretrained(OUT)")
    raise LmembedError(f"{folder}: a file, not a folder written by lmembed.save or `lmembed compress`")
