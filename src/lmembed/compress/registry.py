"""One registry of compression methods, and the method-string / pipeline parser.

A method string is ``name[:positional...][:key=value...]``, e.g. ``svd:128``, ``int4:g32``,
``ae:128:epochs=5:lr=3e-3``. A pipeline joins methods with ``>`` and applies them left to right
(``ae:256 > int8`` quantises the autoencoder's codes). Every parse error names the offending
part and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LmembedError
from .modules import CompressedEmbedding, DenseEmbedding


@dataclass(frozen=True)
class Arg:
    name: str
    parse: Callable[[str], Any]
    default: Any = None
    help: str = ""
    required: bool = False


@dataclass
class FitContext:
    """What a method may use besides the matrix itself."""

    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool | None = None
    log: Callable[[str], None] = lambda s: None
    freqs: torch.Tensor | None = None  # (V,) token counts from a corpus, when known
    calib: Any = None  # calibration statistics (lmembed.compress.calibrate), when given
    side: str = "input"  # which role the matrix plays: input | output | tied
    tokenizer: Any = None  # the model's tokenizer when given (after a trim stage: the remapped one)
    weight: torch.Tensor | None = None  # the matrix the pipeline started from (stages after the first need it)


class Method:
    """Base class. Subclasses set `name`, `positional`, `options`, `summary` and implement fit()."""

    name: str = ""
    summary: str = ""
    whole_module = False  # True: apply() takes containers whole instead of part by part
    needs_calib = False  # True: fit() reads ctx.calib (calibrated methods)
    positional: tuple[Arg, ...] = ()
    options: tuple[Arg, ...] = ()
    vocabulary: bool = False  # changes the vocabulary (trim): only allowed as the first stage

    def __init__(self, **values: Any):
        for a in (*self.positional, *self.options):
            setattr(self, a.name, values.get(a.name, a.default))
        self.text = values.get("_text", self.name)

    def __repr__(self) -> str:
        return f"<method {self.text}>"

    def check(self, num_embeddings: int, dim: int) -> None:
        """Reject settings that cannot work for a V x d matrix, before any heavy work."""

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        raise NotImplementedError

    def apply(self, module: CompressedEmbedding, ctx: FitContext) -> CompressedEmbedding:
        """Compress what the previous pipeline stage produced; plain matrices by default."""
        if isinstance(module, DenseEmbedding):
            return self.fit(module.weight.detach(), ctx)
        raise LmembedError(f"method {self.text!r} cannot be applied after a stage that produced a "
                           f"{module.kind} module (put it earlier in the pipeline)")


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    _load_builtin()
    return sorted(REGISTRY)


def _load_builtin() -> None:
    """Import every module of this package once: each registers its methods (no list to edit)."""
    import importlib
    import pkgutil
    import sys

    for m in pkgutil.iter_modules(sys.modules[__package__].__path__):
        importlib.import_module(f"{__package__}.{m.name}")


# --- argument parsers --------------------------------------------------------------------------
def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise ValueError("must be a positive integer")
    return v


def non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise ValueError("must be an integer >= 0")
    return v


def group_size(s: str) -> int:
    """`g32` (or `32`): columns per quantisation group."""
    return positive_int(s[1:] if s.startswith("g") else s)


def bool_flag(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 0/1, true/false")


def non_negative_float(s: str) -> float:
    v = float(s)
    if v < 0:
        raise ValueError("must be >= 0")
    return v


def parse_method(text: str) -> Method:
    """One method string -> a configured Method (no pipeline)."""
    _load_builtin()
    parts = [p.strip() for p in text.strip().split(":")]
    name = parts[0]
    if name not in REGISTRY:
        raise LmembedError(f"method {text.strip()!r}: unknown method {name!r}; expected one of "
                           f"{', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    values: dict[str, Any] = {}
    pos = list(cls.positional)
    opts = {a.name: a for a in cls.options}
    for part in parts[1:]:
        if "=" in part:
            key, _, raw = part.partition("=")
            arg = opts.get(key.strip())
            if arg is None:
                known = ", ".join(opts) or "none"
                raise LmembedError(f"method {text.strip()!r}: unknown option {key.strip()!r} for {name} "
                                   f"(options: {known})")
        else:
            if not pos:
                raise LmembedError(f"method {text.strip()!r}: unexpected argument {part!r} "
                                   f"({name} takes {_usage(cls)})")
            arg, raw = pos.pop(0), part
        try:
            values[arg.name] = arg.parse(raw.strip())
        except ValueError as e:
            raise LmembedError(f"method {text.strip()!r}: {arg.name} {raw.strip()!r} is invalid ({e})") from None
    missing = [a.name for a in pos if a.required]
    if missing:
        raise LmembedError(f"method {text.strip()!r}: missing {', '.join(missing)} (usage: {_usage(cls)})")
    return cls(**values, _text=text.strip())


def _usage(cls: type[Method]) -> str:
    pos = "".join(f":{a.name.upper()}" for a in cls.positional)
    opts = "".join(f"[:{a.name}=...]" for a in cls.options)
    return f"{cls.name}{pos}{opts}"


def parse_pipeline(text: str) -> list[Method]:
    """'a > b > c' -> methods; errors say which part is wrong."""
    parts = [p.strip() for p in text.split(">")]
    if not text.strip() or any(not p for p in parts):
        raise LmembedError(f"pipeline {text!r}: empty stage (expected 'method[:args] > method[:args] ...')")
    methods = []
    for i, part in enumerate(parts, 1):
        try:
            methods.append(parse_method(part))
        except LmembedError as e:
            if len(parts) == 1:
                raise
            raise LmembedError(f"pipeline {text!r}, stage {i} ({part!r}): {e}") from None
    for i, m in enumerate(methods[1:], 2):
        if m.vocabulary:
            raise LmembedError(f"pipeline {text!r}, stage {i} ({m.text!r}): changes the vocabulary, so it must be "
                               "the first stage")
    return methods


def describe_methods() -> str:
    """One line per method, for --help."""
    _load_builtin()
    return "\n".join(f"  {_usage(REGISTRY[n])}: {REGISTRY[n].summary}" for n in sorted(REGISTRY))
