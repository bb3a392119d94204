"""`lmembed export DIR --format hf`: an lmembed save as a standard transformers folder, for users
who want the smaller vocabulary, or the reconstructed weights, without lmembed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..common.files import check_out_dir, publish_dir, staging_dir
from ..common.locks import holds_lock
from ..compression.io import load, read_manifest
from ..compression.plain import plain_modules
from ..errors import LmembedError

EXPORT_DTYPES = ("float32", "float16", "bfloat16")


@holds_lock("export folder")
def export_hf(src: str | Path, out: str | Path, *, dtype: str | None = None, force: bool = False) -> dict:
    """A plain transformers folder (config, safetensors, tokenizer) of an lmembed save: every
    compressed matrix replaced by its dense reconstruction, in `dtype` (default: the model's).
    For users who want the smaller vocabulary, or the reconstructed weights, without lmembed."""
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise LmembedError(f"--dtype {dtype}: expected one of {', '.join(EXPORT_DTYPES)}")
    src, out = Path(src), Path(out)
    manifest = read_manifest(src)
    if manifest.get("model_kind") != "transformers":
        raise LmembedError(f"{src}: an lmembed run, not a transformers model; --format hf exports transformers models")
    check_out_dir(out, force=force)
    owned = _exported_names(out)
    model = load(src)
    if dtype is not None:
        model.to(getattr(torch, dtype))
    tmp = staging_dir(out)
    try:
        with plain_modules(model, weight=lambda m: m.dense().to(next(model.parameters()).dtype)) as plain:
            plain.config.quantization_config = None
            del plain.config.quantization_config
            plain.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(src, tmp)
        files = sorted(f.name for f in tmp.iterdir())
        (tmp / EXPORT_MARK).write_text(json.dumps({"exported_from": str(src), "dtype": dtype, "files": files}) + "\n")
        publish_dir(tmp, out, owned=owned | {f.name for f in tmp.iterdir()})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"source": str(src), "out": str(out), "dtype": dtype or manifest.get("dtype"),
            "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}


EXPORT_MARK = "lmembed_export.json"  # names the source; its presence marks a folder lmembed exported


def _exported_names(out: Path) -> set[str]:
    """What a previous export to `out` wrote (replaced by --force); a user's other files stay."""
    try:
        files = json.loads((out / EXPORT_MARK).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    return {str(f) for f in files if isinstance(f, str)} | {EXPORT_MARK} if isinstance(files, list) else set()


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(src, trust_remote_code=False).save_pretrained(dst)
    except (OSError, ValueError):
        pass  # saved without a tokenizer: the export has none either
