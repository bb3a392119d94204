"""`lmembed export DIR --format hf`: an lmembed save as a standard transformers folder, for users
who want the smaller vocabulary, or the reconstructed weights, without lmembed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..common.files import EXPORT_RECORD, build_and_publish, check_out_dir, owned_names, real_path
from ..common.locks import holds_lock
from ..compression.integration.io import open_save
from ..compression.integration.plain import plain_modules
from ..compression.integration.verify import read_manifest
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
    check_out_dir(out, force=force, inputs=[src])
    saved = open_save(src)  # model and tokenizer from one verified snapshot of the save
    model = saved.model
    if dtype is not None:
        model.to(getattr(torch, dtype))

    def build(tmp: Path) -> None:
        with plain_modules(model, weight=lambda m: m.dense().to(next(model.parameters()).dtype)) as plain:
            plain.config.quantization_config = None
            del plain.config.quantization_config
            plain.save_pretrained(tmp, safe_serialization=True)
        if saved.tokenizer is not None:
            saved.tokenizer.save_pretrained(tmp)
        files = sorted(f.name for f in tmp.iterdir())
        (tmp / EXPORT_MARK).write_text(json.dumps({"exported_from": str(src), "dtype": dtype, "files": files}) + "\n")

    target = real_path(out)
    build_and_publish(target, owned_names(target) or set(), build, "export")
    return {"source": str(src), "out": str(out), "dtype": dtype or manifest.get("dtype"),
            "bytes": sum(f.stat().st_size for f in target.iterdir() if f.is_file())}


EXPORT_MARK = EXPORT_RECORD  # names the source; its presence marks a folder lmembed exported


