"""The docs cannot drift from the code: generated pages match, and the README's commands parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lmembed.cli import build_parser
from lmembed.cli.docgen import pages

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["methods.md", "cli.md"])
def test_generated_reference_pages_match_the_code(name):
    committed = (ROOT / "docs" / name).read_text()
    assert committed == pages()[name], f"docs/{name} is stale: run `python -m lmembed.cli.docgen docs/`"


def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    cmds = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("lmembed "):
                cmds.append(shlex.split(line)[1:])
    return cmds


def test_every_lmembed_command_in_the_readme_parses():
    cmds = _readme_commands()
    assert len(cmds) >= 6
    parser = build_parser()
    for argv in cmds:
        args = parser.parse_args(argv)  # a renamed flag or command fails here (argparse exits)
        assert callable(args.func)


def test_every_doc_page_the_readme_links_exists():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert links and all((ROOT / link).is_file() for link in links), links
