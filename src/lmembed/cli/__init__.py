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
from typing import NoReturn

from .._version import __version__
from ..common.files import Terminated, terminate_as_interrupt
from ..common.runtime import tune_allocator
from ..errors import LmembedError

COMMANDS = ("train", "eval", "compress", "export", "analyze", "finetune", "train_seq2seq", "bench", "info")


class Parser(argparse.ArgumentParser):
    """argparse with lmembed's error format: one line, no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lmembed: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmembed", description="Tie, compress and measure the token embeddings of language models.")
    parser.add_argument("--version", action="version", version=f"lmembed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    tune_allocator()
    if not sys.stderr.isatty():  # logs and pipes get lmembed's lines, not transformers' progress bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # imported already: its switch was read at import
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line usage error (Parser.error)
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_common(args)
        with terminate_as_interrupt(die=False):
            return int(args.func(args) or 0)
    except LmembedError as e:
        print(f"lmembed: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {interrupt_note(args)}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:  # disk full, permissions, missing files outside our own checks
        if os.environ.get("LMEMBED_DEBUG"):
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"lmembed: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


MAX_SEED = 2**32 - 1  # what numpy's generator takes, and so what every seed of a run must fit


def check_common(args: argparse.Namespace) -> None:
    """Bounds of the flags several commands share, before any work (argparse checks only types)."""
    seed = getattr(args, "seed", None)
    if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
        raise LmembedError(f"--seed {seed}: must be in 0..{MAX_SEED}")
    tokens = getattr(args, "max_tokens", None)
    if isinstance(tokens, int) and tokens < 1:
        raise LmembedError(f"--max-tokens {tokens}: must be a positive number of tokens")


# What an interrupted command leaves, by command: each says what is kept and how to go on.
INTERRUPTED = {
    "train": "the last finished epoch's checkpoint is kept; continue with --resume",
    "train-seq2seq": "the last finished epoch's checkpoint is kept; continue with --resume",
    "finetune": "finished seeds are kept; the same command continues",
    "bench": "finished rows are kept; the same command resumes",
    "compress": "nothing was written to --out (what was there is unchanged); run the command again",
    "export": "nothing was written to --out (what was there is unchanged); run the command again",
    "analyze": "nothing was written to --out; run the command again",
}


def interrupt_note(args: argparse.Namespace) -> str:
    return INTERRUPTED.get(str(getattr(args, "command", "")), "nothing was written")


if __name__ == "__main__":
    sys.exit(main())
