"""lmembed's saves through transformers' own door: a registered quantization method.

A compressed save's config.json carries ``quantization_config = {"quant_method": "lmembed", ...}``
with the modules' specs and paths (lmembed.compression.io). Once lmembed is imported, transformers
knows that method: ``AutoModelForCausalLM.from_pretrained(folder)`` (with ``dtype``, ``device_map``)
builds the compressed modules on its meta skeleton before loading the weights, ``save_pretrained``
writes the same folder layout again, and a tied model stays one module at both sites. Without
lmembed, transformers names the unknown method and then stops at the one-byte sentinels where
it expects dense matrices, instead of initialising them at random.

Registration needs ``transformers.quantizers``, a few seconds to import: it happens when
transformers imports it anyway (an import hook), or at once when it is already loaded.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import re
import sys
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
    """The compressed modules on transformers' meta skeleton; keys the loader must not report."""
    from .io import install_saved_modules

    cfg = quantizer.quantization_config
    install_saved_modules(model, cfg.modules, "config.json quantization_config")
    pats = {f"^{re.escape(k)}$" for k in cfg.sentinels}
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | pats
    aliases = {f"^{re.escape(k)}$" for k in cfg.aliases}
    model._keys_to_ignore_on_load_missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ()) | aliases
    _guard_init(model)
    files = [checkpoint_files] if isinstance(checkpoint_files, (str, Path)) else list(checkpoint_files or [])
    quantizer.lmembed_weights = next((Path(f) for f in files if str(f).endswith(".safetensors")), None)
    return model


def _guard_init(model: Any) -> None:
    """Some models' weight init reads `.weight` of their embedding sites (T5: shared.weight); where
    those are compressed modules there is nothing to initialise, so that AttributeError is skipped."""
    from .modules import CompressedEmbedding, CompressedHead

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
    and lookups in the dtype the model was loaded in."""
    from ..models.skeleton import check_materialised
    from .hf import compressed_modules
    from .io import _model_dtype, compressed_state

    cfg = quantizer.quantization_config
    path = getattr(quantizer, "lmembed_weights", None)
    if path is not None:
        state = compressed_state(path, {"sentinels": cfg.sentinels, "aliases": cfg.aliases})
        prefixes = tuple(f"{p}." for e in cfg.modules for p in e["input_paths"] + e["head_paths"])
        model.load_state_dict({k: v for k, v in state.items() if k.startswith(prefixes)}, strict=False, assign=True)
    dtype = getattr(torch, _model_dtype(model))
    for module, _, _ in compressed_modules(model).values():
        module.out_dtype = dtype  # lookups in the dtype the rest of the model was loaded in
    check_materialised(model, f"{path}: the lmembed save does not match the model")
    return model


def state_for_saving(model: Any, cfg: Any) -> dict[str, torch.Tensor]:
    """save_pretrained's tensors: each shared tensor once (its other names are aliases in the
    config), plus the sentinels that stop a plain load."""
    from .io import _dedupe

    unique, _ = _dedupe(model.state_dict())
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
