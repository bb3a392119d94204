"""`lmembed.save(model, dir)` / `lmembed.load(dir)`: a compressed model as a folder.

    config.json         the model's own config (transformers), or RunConfig for lmembed runs
    model.safetensors   every tensor once: compressed tensors as stored (packed int codes,
                        fp16 scales, factors), shared tensors written a single time
    lmembed.json        which modules are compressed, where they sit, their specs, the aliases
                        of shared tensors, and the bytes of the stored embedding tensors
    tokenizer files     when a tokenizer is given

``load`` rebuilds the architecture from the config, installs empty compressed modules at the
recorded paths (the same object at every path of a tied matrix) and loads the tensors strictly,
so the logits are bit-identical to the model that was saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..common.files import atomic_write_with, prepare_out_dir, read_json, write_json
from ..errors import LmembedError
from .hf import compressed_modules, drop_hf_ties, set_module
from .modules import CompressedEmbedding, CompressedHead, build_module

MANIFEST, WEIGHTS = "lmembed.json", "model.safetensors"
FORMAT = 1


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that are the same view of the same storage are written once; the rest alias them."""
    first: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
               t.device) if t.numel() else None
        if key is not None and key in first:
            aliases[k] = first[key]
        else:
            if key is not None:
                first[key] = k
            unique[k] = t.detach().contiguous().cpu()
    return unique, aliases


def _model_dtype(model: nn.Module) -> str:
    """dtype of the model's own (uncompressed) floating-point parameters."""
    skip = {id(p) for m in model.modules() if isinstance(m, CompressedEmbedding) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in skip and p.dtype.is_floating_point:
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def save(model: nn.Module, out: str | Path, *, tokenizer: Any = None, force: bool = False,
         report: dict | None = None) -> Path:
    """Write a (compressed) model folder; refuses a non-empty folder unless force."""
    from .trim import check_tokenizer

    check_tokenizer(model, tokenizer)  # a trimmed model with the original tokenizer would mis-map ids
    out = prepare_out_dir(out, force=force)
    found = compressed_modules(model)
    if not found:
        raise LmembedError(f"{type(model).__name__} has no compressed embeddings to save (run lmembed.compress first)")
    modules = []
    for module, in_paths, head_paths in found.values():
        modules.append({"spec": module.spec(), "input_paths": in_paths, "head_paths": head_paths,
                        "stored_bytes": module.stored_bytes()})
    unique, aliases = _dedupe(model.state_dict())
    atomic_write_with(out / WEIGHTS, lambda tmp: save_file(unique, tmp, metadata={"format": "pt",
                                                                                 "lmembed": str(FORMAT)}))
    kind = _save_config(model, out)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out)
    write_json(out / MANIFEST, {
        "format": FORMAT, "lmembed_version": __version__, "model_kind": kind, "model_class": type(model).__name__,
        "dtype": _model_dtype(model), "modules": modules, "aliases": aliases, "tensors": len(unique),
        "embedding_bytes": sum(m["stored_bytes"] for m in modules), "report": report,
    })
    return out


def _save_config(model: nn.Module, out: Path) -> str:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "save_pretrained"):
        cfg.save_pretrained(out)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            try:
                gen.save_pretrained(out)
            except Exception:  # noqa: BLE001 - an invalid generation config must not block saving weights
                pass
        return "transformers"
    run_cfg = getattr(model, "run_config", None)
    if run_cfg is None:
        raise LmembedError(f"{type(model).__name__}: neither a transformers model (no .config) nor an lmembed LM "
                           "(no .run_config); cannot save its architecture")
    write_json(out / "config.json", run_cfg.to_dict())
    return "lmembed"


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    else:
        from ..data.vocab import save_tokenizer

        save_tokenizer(tokenizer, out / "tokenizer.json")


def _build(manifest: dict, folder: Path) -> nn.Module:
    kind = manifest.get("model_kind")
    if kind == "transformers":
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        arch = (getattr(config, "architectures", None) or [manifest.get("model_class")])[0]
        cls = getattr(transformers, arch or "", None)
        if cls is None:
            raise LmembedError(f"{folder / 'config.json'}: unknown model class {arch!r} for this transformers version")
        model = cls(config)
        gen_path = folder / "generation_config.json"
        if gen_path.exists() and hasattr(model, "generation_config"):
            model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
        return model
    if kind == "lmembed":
        from ..config import RunConfig
        from ..data.vocab import load_tokenizer
        from ..models import build_model

        cfg = RunConfig.from_dict(read_json(folder / "config.json", "run config"), str(folder / "config.json"))
        model = build_model(cfg, load_tokenizer(folder / "tokenizer.json").vocab_size)
        model.run_config = cfg
        return model
    raise LmembedError(f"{folder / MANIFEST}: model_kind {kind!r} is not 'transformers' or 'lmembed'")


def load(folder: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """The saved model, rebuilt and loaded strictly (eval mode)."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, f"lmembed manifest (is {folder} a folder written by lmembed.save?)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("modules"), list):
        raise LmembedError(f"{folder / MANIFEST}: not an lmembed manifest of format {FORMAT}")
    model = _build(manifest, folder)
    model.to(getattr(torch, manifest.get("dtype", "float32")))
    replaced = []
    for i, entry in enumerate(manifest["modules"]):
        try:
            spec, in_paths, head_paths = entry["spec"], entry["input_paths"], entry["head_paths"]
            module = build_module(spec)
            for p in in_paths:
                set_module(model, p, module)
            for p in head_paths:
                old = model.get_submodule(p)
                set_module(model, p, CompressedHead(module, getattr(old, "bias", None)))
        except LmembedError as e:
            raise LmembedError(f"{folder / MANIFEST}: module entry {i}: {e}") from None
        except (KeyError, AttributeError, TypeError) as e:
            raise LmembedError(f"{folder / MANIFEST}: module entry {i} does not fit this model "
                               f"({type(e).__name__}: {e})") from None
        replaced += in_paths + head_paths
    drop_hf_ties(model, replaced)
    state = _read_tensors(folder / WEIGHTS)
    aliases = manifest.get("aliases") or {}
    for k, src in aliases.items():
        if src not in state:
            raise LmembedError(f"{folder / MANIFEST}: alias {k!r} points at {src!r}, which is not in {WEIGHTS}")
        state[k] = state[src]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise LmembedError(f"{folder / MANIFEST} does not match the tensors in {WEIGHTS}: {detail}") from None
    if missing or unexpected:
        raise LmembedError(f"{folder / MANIFEST} does not match the tensors in {WEIGHTS}: missing "
                           f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    return model.to(device).eval()


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise LmembedError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        detail = " ".join(str(e).split())[:160]
        raise LmembedError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {detail})") from None
