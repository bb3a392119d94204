"""Flags shared by several subcommands, and run-config flags generated from the config dataclasses
(one declaration per field in lmembed.config: name, type, choices, bounds and help)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from ..config import FinetuneConfig, RunConfig, Seq2SeqConfig, make_config, make_seq2seq_config
from ..config.base import field_kind, flag_name

GROUP_TITLES = {"data": "data", "model": "model and optimisation", "run": "run"}


def _group(p: argparse.ArgumentParser, key: str, note: str) -> Any:
    """The parser's argument group for `key`, made once per parser."""
    groups = p.__dict__.setdefault("_lmembed_groups", {})
    if key not in groups:
        groups[key] = p.add_argument_group(GROUP_TITLES.get(key, key) + note)
    return groups[key]


def add_config_flags(p: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                     from_preset: bool = True) -> None:
    """One flag per field of `cls` (those declared with flag=True), in argument groups.

    from_preset: the flags default to None and the preset's value applies (train, bench tying);
    otherwise the field's own default is the flag's (finetune). A flag the parser already has
    (a field two configs share, e.g. --lr) is not added twice: its value serves both."""
    note = " (defaults come from --preset)" if from_preset else ""
    for f in fields(cls):
        flag = flag_name(f.name)
        if not f.metadata.get("flag", True) or f.name in skip or flag in p._option_string_actions:
            continue
        kind, _ = field_kind(f)
        help_text = f.metadata.get("help", "")
        kw: dict[str, Any] = {"dest": f.name, "default": None if from_preset else f.default}
        if not from_preset and f.default is not None:
            help_text += f" (default: {f.default})"
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            elif kind is not str:
                kw["metavar"] = "N" if kind is int else "X"
        _group(p, f.metadata.get("group", "model"), note).add_argument(flag, help=help_text, **kw)


def config_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Every flag-backed field of `cls` as given on the command line (None: not given)."""
    return {f.name: getattr(args, f.name, None) for f in fields(cls) if f.metadata.get("flag", True)}


def lm_config_from_args(args: argparse.Namespace, **fixed: Any) -> RunConfig:
    """RunConfig from the preset plus every flag the user gave."""
    values = {**config_values(args, RunConfig), **fixed}
    arch, preset = values.pop("arch", None) or "lstm", values.pop("preset", None) or "small"
    return make_config(arch, preset, **values)


def seq2seq_config_from_args(args: argparse.Namespace, **fixed: Any) -> Seq2SeqConfig:
    values = {**config_values(args, Seq2SeqConfig), **fixed}
    return make_seq2seq_config(values.pop("preset", None) or "small", **values)


def finetune_config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    values = config_values(args, FinetuneConfig)
    if getattr(args, "freeze_embeddings", False):
        values["embeddings"] = "freeze"
    values["max_train"] = getattr(args, "max_train", None)
    return FinetuneConfig.from_values({}, values)


def progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when writing to a terminal)")


def add_run_dir_args(p: argparse.ArgumentParser) -> None:
    """--out/--force/--resume/--progress of the training commands."""
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    progress_flag(p)


def calib_flags(p: argparse.ArgumentParser, *, apart_from: str) -> None:
    """--calib and --calib-tokens, as every command with calibrated methods takes them."""
    from ..compression.calibration.calibrate import DEFAULT_TOKENS, SOURCES
    from ..compression.registry import REGISTRY, method_names

    calibrated = ", ".join(n for n in method_names() if REGISTRY[n].needs_calib and not REGISTRY[n].superseded_by)
    p.add_argument("--calib", help=f"calibration for calibrated methods ({calibrated}; --bits chooses one): "
                                   f"a text (file, folder or corpus[:split]; keep it apart from {apart_from}), "
                                   "'model' (text sampled from the model: the default), 'mix' (the bundled "
                                   "corpora: the default for a model that cannot generate) or 'model+mix'")
    p.add_argument("--calib-tokens", type=positive_tokens, default=None, metavar="N",
                   help=f"calibration budget in tokens (default: {DEFAULT_TOKENS} of a text, {SOURCES['model']} "
                        f"sampled for 'model', {SOURCES['mix']} for 'mix')")


def positive_tokens(text: str) -> int:
    """A token budget, checked when the command line is read (before any model loads)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens, not {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens, not {n}")
    return n
