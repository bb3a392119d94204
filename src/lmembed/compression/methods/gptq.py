"""GPTQ's column loop, shared by every calibrated rounding (gptq-intB, kq with gptq=1, GGUF blocks).

Columns are rounded one at a time; each rounding error, divided by u[c, c], is pushed onto the
columns not yet rounded through u, the upper Cholesky factor of the metric's inverse (Babai's
nearest plane in the metric's basis): at once within a block of columns, lazily (one matmul) onto
the columns after it. What a code is (its grid, scale, offset) is the caller's: `round_column`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gptq_columns(w: torch.Tensor, u: torch.Tensor, block: int,
                 round_column: Callable[[int, torch.Tensor, int], torch.Tensor]) -> None:
    """Round the columns of w (rows x d, updated in place). round_column(c, w1, j) stores the codes
    of column c (column j of the current block w1, whose later columns it may read) and returns the
    values they decode to."""
    d = w.shape[1]
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1 = w[:, i1:i2]
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            c = i1 + j
            e = (w1[:, j] - round_column(c, w1, j)) / u[c, c]
            w1[:, j:].addr_(e, u[c, c:i2], alpha=-1)  # in place: no rows x block temporary
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
