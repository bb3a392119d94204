"""Experimental methods: still parsed, fitted, saved and loaded, no longer recommended.

A method stays first-class while some budget or runtime has it on top in a bench; once its
successor has a kernel and a GGUF path it moves here (docs/methods.md, "Retirement"). Each class
names its successor in ``superseded_by``; method strings (``"mixed:4.5"``) keep working, and every
model saved with one of these still loads.

    from lmembed.experimental import Mixed
    lmembed.compress(model, Mixed(4.5))
"""

from .compression.methods.calibrated import GPTQ, GPTQInt2, GPTQInt3, GPTQInt4, GPTQInt8, WeightedAutoEncoder
from .compression.methods.mixed import Mixed
from .compression.methods.quantize import Int2
from .compression.methods.superblock import KQ7

__all__ = ["GPTQ", "GPTQInt8", "GPTQInt4", "GPTQInt3", "GPTQInt2", "WeightedAutoEncoder", "Mixed", "Int2", "KQ7"]
