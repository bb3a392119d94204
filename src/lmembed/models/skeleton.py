"""Models built without memory for their parameters, to be filled from a file.

`lmembed.load` builds the architecture, then assigns the saved tensors (memory-mapped from the
safetensors file) to the parameters. Building it the usual way would first allocate and
randomly initialise every parameter, the dense embedding included: the peak would be the dense
model plus the loaded one. Here parameters are created on the meta device (no memory, no
init); buffers stay real, because modules compute some at construction (rotary frequencies)
and never save them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import LmembedError


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Within the block, every new nn.Parameter lives on the meta device."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def check_materialised(model: nn.Module, mismatch: str) -> None:
    """Every parameter and buffer has real memory after loading (none left on meta)."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise LmembedError(f"{mismatch}: no saved tensor for {', '.join(sorted(left)[:4])}")


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], mismatch: str) -> None:
    """Load `state` strictly by assignment: parameters take the given tensors (no copies).
    `mismatch` starts every error ("X does not match the tensors in Y")."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise LmembedError(f"{mismatch}: {detail}") from None
    if missing or unexpected:
        raise LmembedError(f"{mismatch}: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    check_materialised(model, mismatch)
