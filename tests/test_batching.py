from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmembed.data.batching import StreamBatches


def test_targets_are_inputs_shifted_and_rows_contiguous():
    ids = np.arange(103, dtype=np.int32)
    b = StreamBatches(ids, batch_size=4, bptt=5)
    xs, ys = zip(*b, strict=True)
    x, y = torch.cat(xs, 1), torch.cat(ys, 1)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 0], torch.tensor([0, 25, 50, 75]))
    assert x.shape == (4, 24) and b.tokens == 4 * 24


@settings(max_examples=40, deadline=None)
@given(n=st.integers(40, 400), world=st.sampled_from([1, 2, 4]), per=st.integers(1, 4), bptt=st.integers(1, 9))
def test_shards_union_equals_global_batches(n, world, per, bptt):
    ids = np.arange(n, dtype=np.int32)
    batch = world * per
    if n // batch < 2:
        return
    glob = StreamBatches(ids, batch, bptt)
    shards = [StreamBatches(ids, batch, bptt, rank=r, world=world) for r in range(world)]
    assert all(len(s) == len(glob) for s in shards)
    for i in range(len(glob)):
        gx, gy = glob.get(i)
        assert torch.equal(torch.cat([s.get(i)[0] for s in shards]), gx)
        assert torch.equal(torch.cat([s.get(i)[1] for s in shards]), gy)
