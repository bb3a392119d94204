"""`--bits B`: the method lmembed recommends for a model, a budget and whether it may calibrate.

B is stored bits per matrix value, everything counted (codes, scales, maps, decoders), so a
choice never stores more than B * V * d bits. The recommendations follow the measurements in
docs/ (the peers benchmark, text no calibration saw):

- a model with an output layer (a causal or masked LM), calibrated: ``tc:B``, transform coding in
  the model's sensitivity eigenbasis (best at every budget from 3 to 6 bits on SmolLM2);
- an encoder without an output layer (a sentence encoder), calibrated on the bundled mix:
  ``kmixed:B``, super-block widths per row (best from 3 to 5 bits on MiniLM);
- above 8.5 bits: ``int8`` (a scale per row), within 0.2 % of dense without calibration;
- calibration-free (``calibrate=False``): the widest super-block code ``kqW:gG`` that fits B, the
  smallest group that still fits (``kq4:g32`` at 4.5 bits on d = 576: 4.43 bits per value).

GGUF outputs choose a llama.cpp block type instead (lmembed.export.gguf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LmembedError
from .formats.superblock import BITS_RANGE, bits_per_value
from .registry import parse_method

GROUPS = (16, 32, 64, 128, 256)  # super-block group sizes the calibration-free choice considers
MAX_BITS = 16.0  # a budget at or above fp16's needs no compression
HIGH_BITS = 8.5  # from here on plain int8 rows (8 + 16/d bits) fit and cost nothing measurable


@dataclass(frozen=True)
class Choice:
    """A recommended method string and the one-line reason shown to the user."""

    method: str
    why: str


def check_bits(bits: float) -> float:
    """A budget is a finite number of bits per value in (0, 16)."""
    number = isinstance(bits, (int, float)) and not isinstance(bits, bool)
    if not number or not math.isfinite(bits) or not 0 < bits < MAX_BITS:
        raise LmembedError(f"bits = {bits!r}: expected stored bits per value between 0 and {MAX_BITS:g} "
                           "(e.g. 4.5; fp16 is 16, fp32 32)")
    return float(bits)


def choose(bits: float, *, num_embeddings: int, dim: int, has_head: bool, calibrate: bool = True) -> Choice:
    """The method for a V x d matrix at `bits` stored bits per value (see the module doc)."""
    bits = check_bits(bits)
    if calibrate:
        return _calibrated(bits, num_embeddings, dim, has_head)
    return _calibration_free(bits, dim)


def _calibrated(bits: float, v: int, d: int, has_head: bool) -> Choice:
    if bits >= HIGH_BITS and 8 + 16 / d <= bits:
        return Choice("int8", f"above {HIGH_BITS:g} bits per value, int8 codes with a scale per row ({8 + 16 / d:.3f} "
                              "bits) are within 0.2 % of the dense model; no calibration needed")
    if has_head:
        choice = Choice(f"tc:{bits:g}", "calibrated transform coding (tc): the lowest perplexity cost measured at "
                                        "every budget from 3 to 6 bits")
    else:
        choice = Choice(f"kmixed:{bits:g}", "calibrated per-row super-block widths (kmixed): the highest sentence "
                                            "cosine measured at 3 to 5 bits on an encoder")
    try:
        parse_method(choice.method).check(v, d)
    except LmembedError as e:
        raise LmembedError(f"--bits {bits:g}: {e}") from None
    return choice


def _calibration_free(bits: float, d: int) -> Choice:
    best: tuple[int, int] | None = None
    for width in range(BITS_RANGE[1], BITS_RANGE[0] - 1, -1):
        fits = [g for g in GROUPS if g <= d and bits_per_value(d, width, g) <= bits]
        if fits:
            best = (width, min(fits))
            break
    if best is None:
        lo = min(bits_per_value(d, BITS_RANGE[0], g) for g in GROUPS if g <= d) if d >= GROUPS[0] else float("nan")
        raise LmembedError(f"--bits {bits:g}: below the narrowest calibration-free code on d = {d} "
                           f"({lo:.3f} bits per value); calibrated methods go lower (drop --no-calib)")
    width, group = best
    return Choice(f"kq{width}:g{group}", f"calibration-free super-block codes (kq{width}:g{group}, "
                                         f"{bits_per_value(d, width, group):.3f} bits per value): the widest code "
                                         "and smallest group within the budget")
