"""Contiguous language-model batches over a (memory-mapped) token stream.

The Mikolov/Zaremba layout: the stream is cut into `batch_size` equal rows that are read in
parallel, `bptt` tokens at a time, so a recurrent state carries from one batch to the next.
Only the slice for the current batch is copied out of the memmap.

Sharding for data-parallel training takes whole rows: with world size W, rank r reads rows
[r*B/W, (r+1)*B/W) of the same global layout, so W processes see exactly the batches of one
process with the global batch size B.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..errors import LmembedError


class StreamBatches:
    def __init__(self, ids: np.ndarray, batch_size: int, bptt: int, *, rank: int = 0, world: int = 1):
        if batch_size <= 0 or bptt <= 0:
            raise LmembedError(f"batch size ({batch_size}) and bptt ({bptt}) must be positive")
        if batch_size % world:
            raise LmembedError(f"batch size {batch_size} is not divisible by the world size {world}")
        self.row_len = len(ids) // batch_size
        if self.row_len < 2:
            raise LmembedError(
                f"{len(ids)} tokens are too few for batch size {batch_size}: each row needs at least 2 tokens"
            )
        rows = ids[: batch_size * self.row_len].reshape(batch_size, self.row_len)  # a view, also of a memmap
        per = batch_size // world
        self.rows = rows[rank * per : (rank + 1) * per]
        self.bptt = bptt
        self.batch_size = per

    def __len__(self) -> int:
        return (self.row_len - 1 + self.bptt - 1) // self.bptt

    @property
    def tokens(self) -> int:
        """Target tokens per epoch on this rank."""
        return (self.row_len - 1) * self.batch_size

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.bptt
        end = min(start + self.bptt, self.row_len - 1)
        chunk = torch.from_numpy(np.array(self.rows[:, start : end + 1], dtype=np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            yield self.get(i)
