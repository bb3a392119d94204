"""What every lmembed config shares: one declaration per field, checked the same way everywhere.

A field is declared once with ``setting(default, help, ...)``: its type comes from the annotation,
its bounds and choices from the arguments. That one declaration gives

- the check of every value, whether it came from a flag, the Python API or a config.json read
  back from disk (wrong type, NaN, out of range and unknown fields are one clear error each);
- the command-line flag (``--name-with-dashes``, its type, choices and help; lmembed.cli.args);
- the JSON round trip (``to_dict`` / ``from_dict``) and presets (``from_values``).
"""

from __future__ import annotations

import math
from dataclasses import Field, asdict, field, fields
from typing import Any, ClassVar

from ..errors import LmembedError

KINDS = {"int": int, "float": float, "str": str, "bool": bool}


def setting(default: Any, help: str = "", *, choices: tuple | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None, flag: bool = True,
            group: str = "model") -> Any:
    """A config field: default, help text, allowed values; `flag=False` keeps it off the CLI."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "flag": flag, "group": group}
    return field(default=default, metadata=meta)


def field_kind(f: Field) -> tuple[type, bool]:
    """(value type, None allowed) from an annotation such as 'int | None'."""
    parts = [p.strip() for p in str(f.type).split("|")]
    names = [p for p in parts if p != "None"]
    if len(names) != 1 or names[0] not in KINDS:
        raise TypeError(f"config field {f.name}: unsupported annotation {f.type!r}")
    return KINDS[names[0]], "None" in parts


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(f: Field, value: Any) -> str | None:
    """Why `value` is not allowed for field `f`, or None when it is."""
    kind, optional = field_kind(f)
    m = f.metadata
    if value is None:
        return None if optional else "must be set"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        return f"must be {'a number' if kind is float else 'an integer' if kind is int else kind.__name__}"
    if kind is float and not math.isfinite(value):
        return "must be a finite number"
    if m.get("choices") and value not in m["choices"]:
        return f"expected one of {', '.join(map(str, m['choices']))}"
    for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = m.get(key)
        if bound is not None and not ok(value, bound):
            return f"must be {word} {bound:g}"
    return None


class ConfigBase:
    """Base of the run configs (dataclasses): checks, JSON round trip, presets."""

    what: ClassVar[str] = "config"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Any, where: str = "config"):
        """A config read back from disk: every field checked, unknown ones refused."""
        if not isinstance(d, dict):
            raise LmembedError(f"{where}: expected a JSON object of {cls.what} fields, got {type(d).__name__}")
        try:
            return cls.from_values({}, d)
        except LmembedError as e:
            raise LmembedError(f"{where}: {e}") from None

    @classmethod
    def from_values(cls, base: dict[str, Any], overrides: dict[str, Any]):
        """`base` (a preset) updated with every override that is not None; checked."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        bad = sorted(set(base) - known | set(overrides) - known)
        if bad:
            raise LmembedError(f"unknown {cls.what} field(s): {', '.join(map(str, bad))}")
        values = {**base, **{k: v for k, v in overrides.items() if v is not None}}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every field against its declaration, then the rules that tie fields together."""
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            problem = check_value(f, value)
            if problem:
                raise LmembedError(f"{flag_name(f.name)} {value}: {problem}")
            if field_kind(f)[0] is float and isinstance(value, int):
                setattr(self, f.name, float(value))  # JSON may write 20 for 20.0
        self.check()

    def check(self) -> None:
        """Cross-field rules (override)."""
