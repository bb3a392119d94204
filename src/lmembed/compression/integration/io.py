"""`lmembed.save(model, dir)` / `lmembed.load(dir)`: a compressed model as a folder.

    config.json         the model's own config (transformers; with a `quantization_config` naming
                        lmembed), or RunConfig for lmembed runs
    model.safetensors   every tensor once: compressed tensors as stored (packed int codes,
                        fp16 scales, factors), shared tensors written a single time
    lmembed.json        the manifest: which modules are compressed, where they sit, their specs,
                        the aliases of shared tensors, and the sha256 of every file written
    tokenizer files     when a tokenizer is given

Two layouts. *compressed*: ``load`` builds the architecture without allocating its parameters,
installs empty compressed modules at the recorded paths (one object at every path of a tied
matrix) and assigns the memory-mapped tensors, so the logits are bit-identical to the saved
model's and nothing dense is ever allocated. Where the dense weights would sit, the file holds
one-byte sentinels: a process without lmembed that loads the folder with plain transformers
fails on their shape instead of initialising the embedding at random. *plain*: a model whose
compression only changed the vocabulary (trim) is a standard transformers folder (lmembed.json
adds the kept token ids), which plain ``from_pretrained`` loads with the same logits.

A save is built in a sibling folder and switched in at once (lmembed.common.files.publish_dir):
the old save or the new one, never half of one; a user's other files in the folder stay. A load
reads one verified snapshot of the folder (lmembed.compression.integration.verify): the listed files only,
checksums, then the dtypes, shapes, finiteness and index maps of the compressed tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..._version import __version__
from ...common.faults import fault_raise
from ...common.files import (
    FORMAT1_FILES,
    build_and_publish,
    check_out_dir,
    owned_names,
    read_json,
    real_path,
    sha256_file,
    write_json,
)
from ...common.locks import holds_lock
from ...errors import LmembedError
from ...models.skeleton import assign_state, empty_parameters
from ..formats.base import CompressedEmbedding, CompressedHead, build_module
from ..formats.dense import DenseEmbedding
from ..formats.trimmed import TrimmedEmbedding
from .sites import compressed_modules, drop_hf_ties, find_sites, install, set_module
from .verify import (
    FORMAT,
    MANIFEST,
    READABLE_FORMATS,
    WEIGHTS,
    check_tensors,
    check_values,
    manifest_digest,
    read_manifest,
    shown_as,
    snapshot,
    verify_files,
)

QUANT_METHOD = "lmembed"  # config.json quantization_config.quant_method (lmembed.compression.integration.quantizer)
# A one-byte tensor whose name transformers prints, as an unexpected key, in the load report of a
# process that never imported lmembed (beside the size mismatches that stop that load).
NOTICE = "lmembed.import_lmembed_before_from_pretrained"


def dedupe_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def model_dtype(model: nn.Module) -> str:
    """dtype of the model's own (uncompressed) floating-point parameters."""
    skip = {id(p) for m in model.modules() if isinstance(m, CompressedEmbedding) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in skip and p.dtype.is_floating_point:
            return str(p.dtype).removeprefix("torch.")
    return "float32"


# --- save -----------------------------------------------------------------------------------------
@holds_lock("save folder")
def save(model: nn.Module, out: str | Path, *, tokenizer: Any = None, force: bool = False,
         report: dict | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a (compressed) model folder. A non-empty folder needs `force`, and must be an lmembed
    output: only what lmembed wrote there is replaced, once the new folder is complete (a link
    is followed: its target gets the save). `extra_files` (name -> bytes, e.g. a report) are
    written, and checksummed, with it."""
    from .plain import vocabulary_only

    check_tokenizer(model, tokenizer)  # a trimmed model with the original tokenizer would mis-map ids
    out = Path(out)
    check_out_dir(out, force=force)
    if not compressed_modules(model):
        raise LmembedError(f"{type(model).__name__} has no compressed embeddings to save (run lmembed.compress first)")
    plain = vocabulary_only(model) and _transformers_config(model) is not None

    def build(tmp: Path) -> None:
        manifest = _write_plain(model, tmp) if plain else _write_compressed(model, tmp)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        write_manifest(tmp, {**manifest, "report": report}, sorted(f.name for f in tmp.iterdir() if f.is_file()))

    target = real_path(out)
    build_and_publish(target, owned_names(target) or set(), build, "save")
    return out


def write_manifest(folder: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """lmembed.json: `manifest` plus the sha256 and size of the files `names`, and its own digest."""
    files = {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size} for n in names
             if n != MANIFEST}
    manifest = {**manifest, "files": files}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    write_json(folder / MANIFEST, manifest)


def write_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file (its own error for a full disk is turned into one line by
    build_and_publish); the fault point stands in for that disk in tests."""
    fault_raise("save:disk-full", SafetensorError("Error while serializing: I/O error: No space left on device "
                                                  "(os error 28)"))
    save_file(tensors, str(path), metadata=metadata)


def _transformers_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None and hasattr(cfg, "save_pretrained") else None


def _write_compressed(model: nn.Module, tmp: Path) -> dict[str, Any]:
    found = compressed_modules(model)
    modules = [{"spec": m.spec(), "input_paths": ins, "head_paths": heads, "stored_bytes": m.stored_bytes()}
               for m, ins, heads in found.values()]
    unique, aliases = dedupe_tensors(model.state_dict())
    kind = "transformers" if _transformers_config(model) is not None else "lmembed"
    sentinels = sorted({f"{p}.weight" for m in modules for p in m["input_paths"] + m["head_paths"]} - set(unique))
    if kind == "transformers":
        sentinels.append(NOTICE)  # what transformers' load report shows a process that never imported lmembed
        unique.update({k: torch.zeros(1, dtype=torch.uint8) for k in sentinels})  # one byte each
    write_tensors(unique, tmp / WEIGHTS, {"format": "pt", "lmembed": str(FORMAT)})
    manifest = {"format": FORMAT, "lmembed_version": __version__, "layout": "compressed", "model_kind": kind,
                "model_class": type(model).__name__, "dtype": model_dtype(model), "modules": modules,
                "aliases": aliases, "sentinels": sentinels if kind == "transformers" else [],
                "tensors": len(unique), "embedding_bytes": sum(m["stored_bytes"] for m in modules)}
    _save_config(model, tmp, manifest)
    return manifest


def _write_plain(model: nn.Module, tmp: Path) -> dict[str, Any]:
    """A trimmed-only model as a standard transformers folder, plus the kept ids in the manifest."""
    from .plain import plain_modules

    (module, _, _), *_ = compressed_modules(model).values()
    with plain_modules(model) as plain:
        plain.save_pretrained(tmp, safe_serialization=True)
    return {"format": FORMAT, "lmembed_version": __version__, "layout": "plain", "model_kind": "transformers",
            "model_class": type(model).__name__, "dtype": model_dtype(model),
            "vocab": {"kept": module.kept.long().tolist(), "original_vocab": module.original_vocab},
            "modules": [], "embedding_bytes": module.stored_bytes()}


def _save_config(model: nn.Module, tmp: Path, manifest: dict[str, Any]) -> None:
    cfg = _transformers_config(model)
    if cfg is None:
        run_cfg = getattr(model, "run_config", None)
        if run_cfg is None:
            raise LmembedError(f"{type(model).__name__}: neither a transformers model (no .config) nor an lmembed LM "
                               "(no .run_config); cannot save its architecture")
        write_json(tmp / "config.json", run_cfg.to_dict())
        return
    cfg.save_pretrained(tmp)
    saved = read_json(tmp / "config.json", "model config")
    saved["architectures"] = saved.get("architectures") or [type(model).__name__]  # what AutoModel* builds
    saved.setdefault("dtype", manifest["dtype"])  # else from_pretrained guesses it from a tensor (fp16 scales)
    saved["quantization_config"] = {"quant_method": QUANT_METHOD, "format": FORMAT, "modules": manifest["modules"],
                                    "aliases": manifest["aliases"], "sentinels": manifest["sentinels"]}
    write_json(tmp / "config.json", saved)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        try:
            gen.save_pretrained(tmp)
        except Exception:  # noqa: BLE001 - an invalid generation config must not block saving weights
            pass


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    else:
        from ...data.vocab import save_tokenizer

        save_tokenizer(tokenizer, out / "tokenizer.json")


# --- load -----------------------------------------------------------------------------------------
def _config_class(folder: Path, manifest: dict) -> tuple[type, Any]:
    import transformers

    from ...models.pretrained import read_config

    read_config(folder / "config.json")  # types and sizes checked before anything is built
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LmembedError(f"{folder / 'config.json'}: not a usable transformers config "
                           f"({' '.join(str(e).split())[:200]})") from None
    arch = (getattr(config, "architectures", None) or [manifest.get("model_class")])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        raise LmembedError(f"{folder / 'config.json'}: unknown model class {arch!r} for this transformers version")
    return cls, config


def _skeleton(manifest: dict, folder: Path) -> nn.Module:
    """The architecture with parameters on the meta device (lmembed.models.skeleton)."""
    kind = manifest.get("model_kind")
    if kind == "transformers":
        import transformers

        cls, config = _config_class(folder, manifest)
        with empty_parameters():
            model = cls(config)
        if (folder / "generation_config.json").exists() and hasattr(model, "generation_config"):
            model.generation_config = transformers.GenerationConfig.from_pretrained(folder, trust_remote_code=False)
        return model
    if kind == "lmembed":
        from ...config import RunConfig
        from ...data.vocab import load_tokenizer
        from ...models import build_model

        cfg = RunConfig.from_dict(read_json(folder / "config.json", "run config"), str(folder / "config.json"))
        with empty_parameters():
            model = build_model(cfg, load_tokenizer(folder / "tokenizer.json").vocab_size)
        model.run_config = cfg
        return model
    raise LmembedError(f"{folder / MANIFEST}: model_kind {kind!r} is not 'transformers' or 'lmembed'")


MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def _site(model: nn.Module, path: Any, where: str) -> nn.Module:
    """The module a manifest path names: a plain dotted name of an embedding or linear layer of
    this architecture (never an arbitrary attribute)."""
    if not isinstance(path, str) or not MODULE_PATH.fullmatch(path):
        raise LmembedError(f"{where}: module path {path!r} is not a dotted module name")
    try:
        site = model.get_submodule(path)
    except AttributeError:
        raise LmembedError(f"{where}: {type(model).__name__} has no module {path!r}") from None
    if not isinstance(site, (nn.Embedding, nn.Linear, CompressedEmbedding, CompressedHead)) and not hasattr(
            site, "weight"):
        raise LmembedError(f"{where}: {path!r} is a {type(site).__name__}, not an embedding or output layer")
    return site


def install_saved_modules(model: nn.Module, entries: list[dict], where: str) -> None:
    """Empty compressed modules at the recorded paths: one object per matrix, at all its paths."""
    replaced = []
    for i, entry in enumerate(entries):
        try:
            spec, in_paths, head_paths = entry["spec"], entry["input_paths"], entry["head_paths"]
            if not isinstance(in_paths, list) or not isinstance(head_paths, list) or not in_paths + head_paths:
                raise LmembedError("input_paths and head_paths must be lists of module paths")
            for p in in_paths + head_paths:
                _site(model, p, where)
            with torch.device("meta"):  # nothing allocated, whatever sizes the spec claims
                module = build_module(spec)
            for p in in_paths:
                set_module(model, p, module)
            for p in head_paths:
                old = model.get_submodule(p)
                set_module(model, p, CompressedHead(module, getattr(old, "bias", None)))
        except LmembedError as e:
            raise LmembedError(f"{where}: module entry {i}: {e}") from None
        except (KeyError, AttributeError, TypeError) as e:
            raise LmembedError(f"{where}: module entry {i} does not fit this model ({type(e).__name__}: {e})") from None
        replaced += in_paths + head_paths
    drop_hf_ties(model, replaced)


def compressed_state(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The saved tensors (memory-mapped, copy-on-write), aliases filled in, sentinels left out."""
    state = _read_tensors(path)
    for k in manifest.get("sentinels") or []:
        state.pop(k, None)
    for k, src in (manifest.get("aliases") or {}).items():
        if src not in state:
            raise LmembedError(f"{path.parent / MANIFEST}: alias {k!r} points at {src!r}, which is not in {path.name}")
        state[k] = state[src]
    return state


def load(folder: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """The saved model, rebuilt and loaded strictly (eval mode), from one verified snapshot."""
    return open_save(folder, device=device, tokenizer=False).model


@dataclass
class Saved:
    """A save as one snapshot: the model, its tokenizer (None when saved without one, or not
    asked for), the run config of an lmembed run, the manifest."""

    model: nn.Module
    tokenizer: Any
    run_config: Any
    manifest: dict[str, Any]


def open_save(folder: str | Path, *, device: str | torch.device = "cpu", tokenizer: bool = True) -> Saved:
    """Model, tokenizer and config of a save, all read from the same verified files: only what
    the manifest lists is read, and a concurrent re-save gives the old save or the new one."""
    folder = Path(folder)
    with snapshot(folder) as (view, manifest), shown_as(view, folder):
        model = _load_plain(view, manifest) if manifest.get("layout") == "plain" else _load_compressed(view, manifest)
        run_config = getattr(model, "run_config", None)
        tok = _saved_tokenizer(view, manifest) if tokenizer else None
    return Saved(model.to(device).eval(), tok, run_config, manifest)


def _load_compressed(folder: Path, manifest: dict[str, Any]) -> nn.Module:
    model = _skeleton(manifest, folder)
    model.to(getattr(torch, manifest.get("dtype", "float32")))
    install_saved_modules(model, manifest["modules"], str(folder / MANIFEST))
    state = compressed_state(folder / WEIGHTS, manifest)
    assign_checked(model, state, f"{folder / MANIFEST} does not match the tensors in {WEIGHTS}")
    if hasattr(model, "tie_weights") and manifest.get("model_kind") == "transformers":
        model.tie_weights()  # ties among the uncompressed parameters (the compressed ones are one object)
    return model


def assign_checked(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """The tensors assigned once their dtypes and shapes are the ones each module kind stores;
    then their values checked (finite, index maps in range)."""
    check_tensors(model, {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}, where)
    assign_state(model, state, where)
    check_values(model, where)


def _saved_tokenizer(folder: Path, manifest: dict[str, Any]) -> Any:
    """The save's tokenizer from its listed files, or None when it was saved without one."""
    if manifest.get("model_kind") == "lmembed":
        from ...data.vocab import load_tokenizer

        return load_tokenizer(folder / "tokenizer.json")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as e:
        if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
            raise LmembedError(f"{folder}: tokenizer files cannot be read ({str(e).splitlines()[0][:160]})") from None
        return None


def _load_plain(folder: Path, manifest: dict) -> nn.Module:
    """A standard transformers folder; the trimmed matrix goes back into a TrimmedEmbedding that
    shares its Parameter, so the model is the one that was saved (kept ids included)."""
    cls, _ = _config_class(folder, manifest)
    model = cls.from_pretrained(folder, dtype=getattr(torch, manifest.get("dtype", "float32")),
                                trust_remote_code=False)
    vocab = manifest.get("vocab") or {}
    sites = find_sites(model)
    kept = torch.tensor(vocab.get("kept", []), dtype=torch.long)
    if kept.shape != (sites.input_weight.shape[0],):
        raise LmembedError(f"{folder / MANIFEST}: {len(kept)} kept ids for a vocabulary of "
                           f"{sites.input_weight.shape[0]} rows")
    tied = sites.tied
    inp = TrimmedEmbedding(DenseEmbedding.wrap(sites.input_module.weight), kept, int(vocab["original_vocab"]))
    out = inp if tied or sites.output_module is None else TrimmedEmbedding(
        DenseEmbedding.wrap(sites.output_weight), kept, int(vocab["original_vocab"]))
    install(model, sites, "both" if sites.output_module is not None else "input", inp,
            out if sites.output_module is not None else None)
    check_values(model, str(folder / MANIFEST))
    return model


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise LmembedError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        detail = " ".join(str(e).split())[:160]
        raise LmembedError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {detail})") from None


__all__ = ["save", "load", "open_save", "Saved", "read_manifest", "verify_files", "manifest_digest", "write_manifest",
           "MANIFEST", "WEIGHTS", "FORMAT", "READABLE_FORMATS", "FORMAT1_FILES"]


def check_tokenizer(model: nn.Module, tokenizer: Any) -> None:
    """Saving a trimmed model with the original tokenizer would silently mis-map every id."""
    for m in model.modules():
        trimmed = isinstance(m, CompressedEmbedding) and m.split_vocabulary()[1] is not None
        if trimmed and tokenizer is not None and hasattr(tokenizer, "__len__"):
            if len(tokenizer) != m.num_embeddings:
                raise LmembedError(f"the model's vocabulary was trimmed to {m.num_embeddings} tokens but the tokenizer "
                                   f"has {len(tokenizer)}: save the remapped one (report['tokenizer'] from "
                                   "lmembed.compress)")
            return
