"""What the trust tests share: the one-line error check, tiny saves, and tampering that keeps a save
consistent (a re-signed manifest), so the checks after the checksums are what is tested."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

import lmembed
from lmembed.cli import main
from lmembed.common.files import sha256_file
from lmembed.compression.integration.verify import manifest_digest
from tiny_models import build, word_tokenizer

WORDS = "the cat a dog bird my friend teacher child sees likes finds follows calls helps ball tree house .".split()


def one_line_error(argv: list, capsys) -> str:
    """Run the CLI: exit code 2 and exactly one `lmembed: error:` line on stderr; returns it."""
    capsys.readouterr()  # what setting up printed is not the command's
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmembed: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def model_folder(root: Path, arch: str = "gpt2") -> Path:
    """A transformers folder with a tokenizer, as a user has one."""
    build(arch).save_pretrained(root)
    word_tokenizer(WORDS).save_pretrained(root)
    return root


def tiny_save(root: Path, method: str = "int4:g16", arch: str = "llama-tied", **compress) -> Path:
    model = build(arch)
    lmembed.compress(model, method, **compress)
    return lmembed.save(model, root, tokenizer=word_tokenizer(WORDS))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def resign(folder: Path, edit=None) -> None:
    """Re-record every listed file's sha256 and size, apply `edit` to the manifest, re-sign it:
    what an attacker (or a buggy tool) who knows the format could write."""
    m = json.loads((folder / "lmembed.json").read_text())
    for name in list(m["files"]):
        if (folder / name).exists():
            m["files"][name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    if edit is not None:
        edit(m)
    m["manifest_sha256"] = manifest_digest(m)
    (folder / "lmembed.json").write_text(json.dumps(m))


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def flip_tensor_byte(path: Path, name: str) -> None:
    """Flip one byte inside tensor `name`'s data, in place (the file keeps its size)."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start, end = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
