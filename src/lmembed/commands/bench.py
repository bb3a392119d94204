"""lmembed bench NAME: benchmarks that reproduce the papers' tables (one module each in lmembed.bench)."""

from __future__ import annotations

import importlib

BENCHES = ["tying"]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="reproduce a paper table: tying, ...",
                       description="Benchmarks: each prints a table and writes JSON, Markdown and a PNG.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCHES:
        importlib.import_module(f"lmembed.bench.{name}").add_parser(bsub)
    p.set_defaults(func=lambda args: p.print_help() or 2)
