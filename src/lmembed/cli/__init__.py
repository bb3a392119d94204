"""`lmembed` command line: the top layer, a thin one over the Python API and lmembed.bench.

Each subcommand is a module of this package with ``add_parser(subparsers)``; COMMANDS lists them
in the order ``--help`` shows. Flags of run configs are generated from the config dataclasses
(lmembed.cli.args). Every LmembedError becomes one ``lmembed: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .._version import __version__
from ..errors import LmembedError

COMMANDS = ("train", "eval", "compress", "export", "analyze", "finetune", "train_seq2seq", "bench", "info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmembed",
        description="Tie, compress and measure the token embeddings of language models.",
    )
    parser.add_argument("--version", action="version", version=f"lmembed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LmembedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (the last finished epoch's checkpoint is kept; continue with --resume)", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, missing files outside our own checks
        if os.environ.get("LMEMBED_DEBUG"):
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
