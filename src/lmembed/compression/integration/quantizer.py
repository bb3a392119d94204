"""lmembed's saves through transformers' own door: a registered quantization method.

A compressed save's config.json carries ``quantization_config = {"quant_method": "lmembed", ...}``
with the modules' specs and paths (lmembed.compression.integration.io). Once lmembed is imported, transformers
knows that method: ``AutoModelForCausalLM.from_pretrained(folder)`` (with ``dtype``, ``device_map``)
builds the compressed modules on its meta skeleton before loading the weights, ``save_pretrained``
writes the same folder layout again, and a tied model stays one module at both sites. Without
lmembed, transformers names the unknown method and then stops at the one-byte sentinels where
it expects dense matrices, instead of initialising them at random.

The door checks what ``lmembed.load`` checks (lmembed.compression.integration.verify): the folder's
lmembed.json (a folder without one is refused), the sha256 of every listed file (so an edited
``quantization_config`` in config.json is caught), that the weights transformers reads are
listed, the dtype and shape of every tensor against the modules built from the manifest before
transformers reads any, then finite values and index maps; and that no file changed between the
checks and the end of loading. ``save_pretrained`` of a model loaded through it writes the
manifest too, so its folder loads through either door.

Registration needs ``transformers.quantizers``, a few seconds to import: it happens when
transformers imports it anyway (an import hook), or at once when it is already loaded.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import Any

import torch

QUANT_METHOD = "lmembed"
TRIGGER = "transformers.quantizers.auto"  # registering needs this module; importing it is the cue
_registered = False


def register() -> None:
    """Register the config and quantizer classes with transformers (once)."""
    global _registered
    if _registered:
        return
    _registered = True
    from transformers.quantizers.auto import register_quantization_config, register_quantizer
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LmembedQuantizationConfig(QuantizationConfigMixin):
        """What config.json says about the compressed modules (written by lmembed.save)."""

        def __init__(self, quant_method: str = QUANT_METHOD, format: int = 2, modules: list | None = None,
                     aliases: dict | None = None, sentinels: list | None = None, **kwargs: Any):
            self.quant_method = QUANT_METHOD
            self.format, self.modules = format, modules or []
            self.aliases, self.sentinels = aliases or {}, sentinels or []
            for k, v in kwargs.items():
                setattr(self, k, v)

    class LmembedHfQuantizer(HfQuantizer):
        requires_calibration = True  # a save of lmembed's, never a dense checkpoint to quantise

        def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
            if isinstance(device_map, dict) and {"disk", "meta"} & set(map(str, device_map.values())):
                raise ValueError("lmembed: compressed embeddings cannot be offloaded to disk")

        def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
            return dtype

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            return before_loading(self, model, checkpoint_files)

        def _process_model_after_weight_loading(self, model, **kwargs):
            return after_loading(self, model)

        def get_state_dict_and_metadata(self, model):
            return state_for_saving(model, self.quantization_config), {}

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    register_quantization_config(QUANT_METHOD)(LmembedQuantizationConfig)
    register_quantizer(QUANT_METHOD)(LmembedHfQuantizer)


def before_loading(quantizer: Any, model: Any, checkpoint_files: Any) -> Any:
    """Verify the save (manifest, checksums, listed files, tensor dtypes and shapes), then install
    the compressed modules on transformers' meta skeleton; keys the loader must not report."""
    from ...errors import LmembedError
    from .io import install_saved_modules
    from .verify import MANIFEST, check_shapes, check_tensors, header_shapes, read_manifest, verify_files

    files = [Path(checkpoint_files)] if isinstance(checkpoint_files, (str, Path)) else [
        Path(f) for f in checkpoint_files or []]
    weights = next((f for f in files if f.name.endswith(".safetensors")), None)
    if weights is None:
        raise LmembedError("lmembed save: transformers found no .safetensors weights to load")
    folder = weights.parent
    manifest = read_manifest(folder)
    ids = verify_files(folder, manifest)
    unlisted = [f.name for f in files if f.name not in (manifest.get("files") or {})]
    if unlisted or manifest.get("layout", "compressed") != "compressed":
        raise LmembedError(f"{folder / MANIFEST}: does not list {', '.join(unlisted) or 'compressed weights'}, which "
                           "transformers would load")
    cfg = quantizer.quantization_config
    for key in ("modules", "aliases", "sentinels"):
        if getattr(cfg, key) != (manifest.get(key) or type(getattr(cfg, key))()):
            raise LmembedError(f"{folder}: config.json quantization_config {key} differ from {MANIFEST}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the modules as lmembed.load builds them, whatever dtype= says
    try:
        install_saved_modules(model, manifest["modules"], f"{folder / MANIFEST}")
    finally:
        torch.set_default_dtype(previous)
    shapes = header_shapes(weights)
    check_tensors(model, shapes, str(weights))
    check_shapes(model, shapes, str(weights))
    pats = {f"^{re.escape(k)}$" for k in cfg.sentinels}
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | pats
    aliases = {f"^{re.escape(k)}$" for k in cfg.aliases}
    model._keys_to_ignore_on_load_missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ()) | aliases
    _guard_init(model)
    quantizer.lmembed_weights, quantizer.lmembed_files = weights, ids
    return model


def _guard_init(model: Any) -> None:
    """Some models' weight init reads `.weight` of their embedding sites (T5: shared.weight); where
    those are compressed modules there is nothing to initialise, so that AttributeError is skipped."""
    from ..formats.base import CompressedEmbedding, CompressedHead

    init = model._init_weights

    def guarded(module: Any) -> None:
        try:
            init(module)
        except AttributeError:
            if not any(isinstance(m, (CompressedEmbedding, CompressedHead)) for m in module.children()):
                raise

    model._init_weights = guarded


def after_loading(quantizer: Any, model: Any) -> Any:
    """The compressed tensors exactly as saved (the loader fills shared ones once, by one name),
    checked, and lookups in the dtype the model was loaded in; save_pretrained writes a manifest."""
    from ...models.skeleton import check_materialised
    from .io import compressed_state, model_dtype
    from .sites import compressed_modules
    from .verify import check_values, unchanged

    cfg = quantizer.quantization_config
    path = quantizer.lmembed_weights
    state = compressed_state(path, {"sentinels": cfg.sentinels, "aliases": cfg.aliases})
    prefixes = tuple(f"{p}." for e in cfg.modules for p in e["input_paths"] + e["head_paths"])
    model.load_state_dict({k: v for k, v in state.items() if k.startswith(prefixes)}, strict=False, assign=True)
    dtype = getattr(torch, model_dtype(model))
    for module, _, _ in compressed_modules(model).values():
        module.out_dtype = dtype  # lookups in the dtype the rest of the model was loaded in
    check_materialised(model, f"{path}: the lmembed save does not match the model")
    check_values(model, str(path))
    unchanged(path.parent, quantizer.lmembed_files)  # nothing was replaced while transformers read it
    model.save_pretrained = types.MethodType(save_with_manifest, model)
    return model


def save_with_manifest(model: Any, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
    """transformers' save_pretrained, then lmembed.json over what it wrote (and over the files a
    previous manifest there listed that are still as it recorded them), so the folder loads
    through either door with its checksums."""
    from ..._version import __version__
    from .io import model_dtype, write_manifest
    from .verify import FORMAT, MANIFEST, still_listed

    folder = Path(save_directory)
    before, kept = _identities(folder), still_listed(folder)
    result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    written = {n for n, ident in _identities(folder).items() if before.get(n) != ident and n != MANIFEST}
    cfg = model.hf_quantizer.quantization_config
    manifest = {"format": FORMAT, "lmembed_version": __version__, "layout": "compressed", "model_kind": "transformers",
                "model_class": type(model).__name__, "dtype": model_dtype(model), "modules": cfg.modules,
                "aliases": cfg.aliases, "sentinels": cfg.sentinels, "report": None,
                "embedding_bytes": sum(int(m.get("stored_bytes", 0)) for m in cfg.modules)}
    write_manifest(folder, manifest, sorted(written | (kept - written)))
    return result


def _identities(folder: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, mtime, size) of the regular files in `folder`."""
    if not folder.is_dir():
        return {}
    out = {}
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink():
            st = entry.stat()
            out[entry.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def state_for_saving(model: Any, cfg: Any) -> dict[str, torch.Tensor]:
    """save_pretrained's tensors: each shared tensor once (its other names are aliases in the
    config), plus the sentinels that stop a plain load."""
    from .io import dedupe_tensors

    unique, _ = dedupe_tensors(model.state_dict())
    return {**unique, **{k: torch.zeros(1, dtype=torch.uint8) for k in cfg.sentinels}}


class _Hook(importlib.abc.MetaPathFinder):
    """Registers the quantizer right after transformers imports its quantizer registry."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TRIGGER:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            register()

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def install_hook() -> None:
    """Register now if transformers' registry is loaded, else as soon as it is."""
    if TRIGGER in sys.modules:
        register()
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
