"""One registry of compression methods, and the method-string / pipeline parser.

A method is a typed object (``Int4(group=32)``, ``AutoEncoder(128, epochs=5)``) and has a text
form, ``name[:positional...][:key=value...]`` (``int4:g32``, ``ae:128:epochs=5``): the string
grammar is the objects' parser (``parse_method``) and printer (``str(method)``), and both check
values the same way, through each argument's parser. A pipeline is a list of methods, or their
texts joined with ``>``, applied left to right (``ae:256 > int8`` quantises the autoencoder's
codes). Every error names the offending part and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LmembedError
from .formats.base import CompressedEmbedding


def show_value(v: Any) -> str:
    """The text form of an argument value (the inverse of the usual parsers)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


@dataclass(frozen=True)
class Arg:
    """One argument of a method: parsed from text, printed back to text (`show`)."""

    name: str
    parse: Callable[[str], Any]
    default: Any = None
    help: str = ""
    required: bool = False
    show: Callable[[Any], str] | None = None  # default: the parser's own `.show`, else show_value

    def format(self, value: Any) -> str:
        text = (self.show or getattr(self.parse, "show", None) or show_value)(value)
        if any(c in text for c in ":>="):
            raise ValueError(f"{text!r} cannot be written in a method string (it holds ':', '>' or '=')")
        return text


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
    """Base class. Subclasses set `name`, `positional`, `options`, `summary` and implement fit().

    ``Method(*positional, **options)`` checks every value through its argument's parser, so a
    typed method and its text form accept exactly the same values."""

    name: str = ""
    summary: str = ""
    whole_module = False  # True: apply() takes containers whole instead of part by part
    needs_calib = False  # True: fit() reads ctx.calib (calibrated methods)
    positional: tuple[Arg, ...] = ()
    options: tuple[Arg, ...] = ()
    vocabulary: bool = False  # changes the vocabulary (trim): only allowed as the first stage
    # What a later pipeline stage may follow, checked before any model loads: the previous stage's
    # output is "plain" (a matrix), "factors" (codes x decoder), "tunable" (parameters or fp16
    # scales that kl can fine-tune) or "final" (nothing can follow it).
    follows: tuple[str, ...] = ("plain",)
    # What GGUF can hold of the stage's output, known before anything is fitted (export/gguf.py
    # refuses a method early on it): the gguf_form (formats/base.py) of the kind it stores a plain
    # matrix as ("codes": integer codes of code_widths() bits, grid `grid`, groups `group`;
    # "superblock": kq super-blocks of `bits`, groups `group`; None: no block type holds it).
    # keeps_form: the stage tunes what it is given in place, so its form stays (kl: codes stay codes).
    gguf_form: str | None = None
    keeps_form: bool = False
    # Non-empty: the method is experimental (docs/methods.md, retirement policy): still parsed, fitted
    # and loaded, but exported from lmembed.experimental only; the text names what superseded it.
    superseded_by: str = ""

    @classmethod
    def status(cls) -> str:
        """'first-class', or 'experimental (superseded by ...)'."""
        return f"experimental (superseded by {cls.superseded_by})" if cls.superseded_by else "first-class"

    def makes(self, given: str) -> str:
        """What this stage hands the next one, given what it was handed."""
        return "final"

    def code_widths(self) -> tuple[int, ...]:
        """The widths of the integer codes a gguf_form "codes" stage stores: its one width by default."""
        return (self.bits,)

    def __init__(self, *args: Any, **values: Any):
        text = values.pop("_text", None)
        if len(args) > len(self.positional):
            raise LmembedError(f"method {self.name}: takes {len(self.positional)} positional argument(s) "
                               f"({usage(type(self))}), got {len(args)}")
        given = {a.name: v for a, v in zip(self.positional, args, strict=False)}
        args_by_name = {a.name: a for a in (*self.positional, *self.options)}
        for k, v in values.items():
            if k not in args_by_name or k in given:
                raise LmembedError(f"method {self.name}: unknown or repeated argument {k!r} (usage: "
                                   f"{usage(type(self))})")
            given[k] = v
        for a in (*self.positional, *self.options):
            if a.name in given and text is None and given[a.name] != a.default:  # checked as the text would be
                given[a.name] = _checked(self.name, a, given[a.name])
            setattr(self, a.name, given.get(a.name, a.default))
        missing = [a.name for a in self.positional if a.required and getattr(self, a.name) is None]
        if missing:
            raise LmembedError(f"method {self.name}: missing {', '.join(missing)} (usage: {usage(type(self))})")
        self.text = text or str(self)
        self.check_args()

    def check_args(self) -> None:
        """Reject settings that cannot work for any matrix (checked when the method is made)."""

    def values(self) -> dict[str, Any]:
        return {a.name: getattr(self, a.name) for a in (*self.positional, *self.options)}

    def __str__(self) -> str:
        """The canonical text form: parse_method(str(m)) == m."""
        pos = [getattr(self, a.name) for a in self.positional]
        while pos and pos[-1] == self.positional[len(pos) - 1].default:
            pos.pop()  # trailing defaults are left out
        parts = [self.name, *(a.format(v) for a, v in zip(self.positional, pos, strict=False))]
        parts += [f"{a.name}={a.format(getattr(self, a.name))}" for a in self.options
                  if getattr(self, a.name) != a.default]
        return ":".join(parts)

    def __repr__(self) -> str:
        return f"<method {self}>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.values() == other.values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(str(self))

    def check(self, num_embeddings: int, dim: int) -> None:
        """Reject settings that cannot work for a V x d matrix, before any heavy work."""

    def check_model(self, model: nn.Module) -> None:
        """Reject a model this method cannot serve (kl: one without an output layer), once the
        model is open and before it is calibrated or fitted."""

    def fit(self, weight: torch.Tensor, ctx: FitContext) -> CompressedEmbedding:
        raise NotImplementedError

    def apply(self, module: CompressedEmbedding, ctx: FitContext) -> CompressedEmbedding:
        """Compress what the previous pipeline stage produced; plain matrices by default."""
        weight = module.plain_parameter()
        if weight is not None:
            return self.fit(weight.detach(), ctx)
        raise LmembedError(f"method {self.text!r} cannot be applied after a stage that produced a "
                           f"{module.kind} module (put it earlier in the pipeline)")

    def prepare(self, model: nn.Module, tokenizer: Any, log: Callable[[str], None]) -> Any:
        """Vocabulary stages only: change the model's vocabulary in place before anything is
        fitted; returns what the later stages need (lmembed.compression.methods.trim.VocabTrim)."""
        raise NotImplementedError(f"{type(self).__name__} is not a vocabulary stage")


def check_ceiling(method: Method, avg: float, ceiling: float, of: str) -> None:
    """Refuse a budget above what the method's format can store (the allocation would silently
    stop at its widest setting and spend less than asked)."""
    if avg > ceiling + 1e-9:
        raise LmembedError(f"method {method.text!r}: {avg} bits per value is more than {method.name} can store {of} "
                           f"(at most {ceiling:.3f} bits per value, everything counted)")


def _checked(method: str, arg: Arg, value: Any) -> Any:
    """A typed value, checked by printing it and parsing it back as the text grammar would."""
    try:
        text = arg.format(value)
        parsed = arg.parse(text)
    except (ValueError, TypeError) as e:
        raise LmembedError(f"method {method}: {arg.name} {value!r} is invalid ({e})") from None
    if parsed != value and not (isinstance(value, (int, float)) and not isinstance(value, bool) and parsed == value):
        raise LmembedError(f"method {method}: {arg.name} {value!r} is invalid (reads back as {parsed!r})")
    return parsed


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
    """Import every module of lmembed.compression.methods once: each registers its methods (a new
    method is one file there, no list to edit)."""
    import importlib
    import pkgutil

    methods = importlib.import_module(f"{__package__}.methods")
    for m in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{m.name}")


# --- argument parsers (a parser may carry its printer as `.show`) -------------------------------
MAX_INT_ARG = 1 << 31  # ranks, group sizes, epochs, counts: beyond this it is a typo


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise ValueError("must be a positive integer")
    if v > MAX_INT_ARG:
        raise ValueError(f"must be at most {MAX_INT_ARG}")
    return v


def non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise ValueError("must be an integer >= 0")
    if v > MAX_INT_ARG:
        raise ValueError(f"must be at most {MAX_INT_ARG}")
    return v


def group_size(s: str) -> int:
    """`g32`: columns per quantisation group. The `g` is required: a bare number in that place
    (`int4:32`) is refused, never read as a group size it may not mean."""
    if not s.startswith("g"):
        raise ValueError(f"write it as g{s}: G columns per scale" if s.isdigit()
                         else "expected gG, e.g. g32")
    return positive_int(s[1:])


group_size.show = lambda v: f"g{v}"  # type: ignore[attr-defined]


def bool_flag(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 0/1, true/false")


def finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


def non_negative_float(s: str) -> float:
    v = finite_float(s)
    if v < 0:
        raise ValueError("must be >= 0")
    return v


def positive_float(s: str) -> float:
    v = finite_float(s)
    if v <= 0:
        raise ValueError("must be > 0")
    return v


def fraction(s: str) -> float:
    v = finite_float(s)
    if not 0 <= v <= 1:
        raise ValueError("must be in [0, 1]")
    return v


def choice(*allowed: str) -> Callable[[str], str]:
    """A parser that accepts one of `allowed`."""
    def parse(s: str) -> str:
        if s not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return s

    parse.allowed = allowed  # type: ignore[attr-defined]  # what a grammar fuzzer may draw from
    return parse


def parse_method(text: str) -> Method:
    """One method string -> a configured Method (no pipeline)."""
    _load_builtin()
    if not isinstance(text, str):
        raise LmembedError(f"method: expected a string, not {type(text).__name__}")
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
                                   f"({name} takes {usage(cls)})")
            arg, raw = pos.pop(0), part
        try:
            values[arg.name] = arg.parse(raw.strip())
        except ValueError as e:
            raise LmembedError(f"method {text.strip()!r}: {arg.name} {raw.strip()!r} is invalid ({e})") from None
    missing = [a.name for a in pos if a.required]
    if missing:
        raise LmembedError(f"method {text.strip()!r}: missing {', '.join(missing)} (usage: {usage(cls)})")
    return cls(**values, _text=text.strip())


def usage(cls: type[Method]) -> str:
    pos = "".join(f":{a.name.upper()}" for a in cls.positional)
    opts = "".join(f"[:{a.name}=...]" for a in cls.options)
    return f"{cls.name}{pos}{opts}"


def parse_pipeline(text: str) -> list[Method]:
    """'a > b > c' -> methods; errors say which part is wrong."""
    if not isinstance(text, str):
        raise LmembedError(f"method: expected a method string, a Method or a list of them, not {type(text).__name__}")
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
    return check_pipeline(methods, text)


def as_pipeline(method: str | Method | Sequence[str | Method]) -> list[Method]:
    """A method string, a Method, or a list of either -> the checked list of stages."""
    if isinstance(method, Method):
        return check_pipeline([method], str(method))
    if isinstance(method, (list, tuple)):
        stages = [m if isinstance(m, Method) else parse_method(m) if isinstance(m, str) else None for m in method]
        if not stages or any(m is None for m in stages):
            raise LmembedError(f"method {method!r}: expected a non-empty list of Method objects or method strings")
        return check_pipeline(stages, pipeline_text(stages))  # type: ignore[arg-type]
    return parse_pipeline(method)


OUTPUT_NAMES = {"plain": "a plain matrix", "factors": "a factorisation", "tunable": "fine-tunable codes",
                "final": "a finished format"}


def check_pipeline(methods: list[Method], text: str) -> list[Method]:
    """Stage order and compatibility, from the methods' declarations alone (no fitting)."""
    if "plain" not in methods[0].follows:
        raise LmembedError(f"method {methods[0].text!r} takes {OUTPUT_NAMES[methods[0].follows[0]]}: put it after "
                           "another stage (e.g. 'mixed:3.5 > kl:100')")
    given = methods[0].makes("plain")
    for i, m in enumerate(methods[1:], 2):
        if m.vocabulary:
            raise LmembedError(f"pipeline {text!r}, stage {i} ({m.text!r}): changes the vocabulary, so it must be "
                               "the first stage")
        if given not in m.follows:
            takes = " or ".join(OUTPUT_NAMES[f] for f in m.follows)
            raise LmembedError(f"pipeline {text!r}, stage {i} ({m.text!r}): takes {takes}, but stage {i - 1} "
                               f"({methods[i - 2].text!r}) gives {OUTPUT_NAMES[given]}")
        given = m.makes(given)
    return methods


def pipeline_text(methods: Sequence[Method]) -> str:
    """The text form of a pipeline ('a > b'), as given for parsed stages."""
    return " > ".join(m.text for m in methods)


def describe_methods() -> str:
    """One line per method, for --help."""
    _load_builtin()
    lines = [f"  {usage(REGISTRY[n])}: {REGISTRY[n].summary}" for n in sorted(REGISTRY)
             if not REGISTRY[n].superseded_by]
    old = [f"  {usage(REGISTRY[n])}: {REGISTRY[n].summary} (superseded by {REGISTRY[n].superseded_by})"
           for n in sorted(REGISTRY) if REGISTRY[n].superseded_by]
    return "\n".join(lines + ["Experimental (still fitted and loaded; see docs/methods.md):"] + old)
