"""Low rank with a rank per row (`wsvd:RANK:alloc=rows`): bytes, error, the module's two roles, storage."""

from __future__ import annotations

import pytest
import torch

import lmembed
from lmembed.compression import RowRankEmbedding, build_module
from lmembed.compression.calibration.sensitivity import sensitivity
from lmembed.compression.methods.allocation import allocate
from lmembed.errors import LmembedError
from tiny_models import D, V, build


def _weighted_error(orig, model, stats) -> float:
    """wsvd's objective: rows weighted by the calibration (floored at the mean), columns by H + G."""
    diff = orig.get_input_embeddings().weight.detach().double() - model.get_input_embeddings().dense().double()
    w = stats.row_weights("tied", mix=1.0, floor=1.0).double()
    return (w * ((diff @ sensitivity(stats, "tied")) * diff).sum(1)).sum().item()


def test_the_allocation_spends_the_budget_without_passing_it():
    """Many close choices (ranks 0, 9, ..., 576) and convex decreasing costs: the total lands within
    a step per row of the budget, never above it, and costlier rows get higher ranks."""
    g = torch.Generator().manual_seed(0)
    ranks = torch.arange(0, 577, 9).double()
    scale = torch.rand(500, 1, generator=g) * 100
    costs = scale * torch.exp(-ranks / 100)[None, :]
    for avg in (50, 300, 430):
        pick = allocate(costs, ranks, avg * 500)
        total = ranks[pick].sum().item()
        assert avg * 500 - 9 * 500 <= total <= avg * 500
    chosen = ranks[allocate(costs, ranks, 300 * 500)]
    top, bottom = scale[:, 0].argsort()[-50:], scale[:, 0].argsort()[:50]
    assert chosen[top].min() >= chosen[bottom].max()


def _uneven() -> torch.nn.Module:
    """The tiny tied Llama with row norms spread as a real vocabulary's are (log-normal): a random
    init's rows all need the same rank, so per-row ranks would have nothing to win."""
    model = build("llama-tied")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(torch.randn(V, 1, generator=torch.Generator().manual_seed(0)).exp())
    return model


def _rows_model(stats, spec="wsvd:8:alloc=rows"):
    model = _uneven()
    rep = lmembed.compress(model, spec, calib=stats)
    return model, rep


@pytest.mark.parametrize("rank", [8, 16])
def test_row_ranks_cost_at_most_rank_k_bytes_and_beat_it(stats, rank):
    """Exact bytes (codes + decoder in fp32, int16 ranks), within the uniform rank's, and a lower
    error on the objective both minimise."""
    orig, uniform = _uneven(), _uneven()
    ru = lmembed.compress(uniform, f"wsvd:{rank}", calib=stats)
    model, rr = _rows_model(stats, f"wsvd:{rank}:alloc=rows")
    m = model.get_input_embeddings()
    assert isinstance(m, RowRankEmbedding) and model.get_output_embeddings().embedding is m  # still tied
    assert rr["stored_bytes"] == 4 * int(m.ranks.long().sum()) + 4 * m.rank * D + 2 * V <= ru["stored_bytes"]
    assert _weighted_error(orig, model, stats) < 0.8 * _weighted_error(orig, uniform, stats)


def test_rows_that_cost_more_keep_more_codes(stats):
    """The rows with the most to lose (calibration weight times squared norm) get the higher ranks."""
    model, _ = _rows_model(stats)
    ranks = model.get_input_embeddings().ranks.double()
    stake = stats.row_weights("tied", mix=1.0, floor=1.0) * _uneven().get_input_embeddings().weight.pow(2).sum(1)
    order = stake.argsort(descending=True)
    assert ranks[order[: V // 10]].mean() > ranks[order[V // 2:]].mean() + 4
    assert len(ranks.unique()) > 2


def test_lookup_and_logits_follow_the_stored_codes(stats):
    """Row v is its k_v codes times the decoder's first k_v rows; logits are h times those rows."""
    model, _ = _rows_model(stats)
    m = model.get_input_embeddings()
    rows, first = [], 0
    start = {}
    for v in torch.sort(m.ranks.long(), stable=True).indices.tolist():  # the stored order: by rank, then row
        start[v] = first
        first += int(m.ranks[v])
    for v in range(V):
        k, s = int(m.ranks[v]), start[v]
        rows.append(m.codes[s:s + k] @ m.decoder[:k] if k else torch.zeros(D))
    expected = torch.stack(rows).detach()
    torch.testing.assert_close(m.dense(), expected)
    ids = torch.tensor([[5, 0, V - 1, 5]])
    torch.testing.assert_close(model.get_input_embeddings()(ids)[0], expected[ids[0]])
    h = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.logits(h), h @ expected.t(), atol=1e-5, rtol=1e-5)


def test_rows_of_rank_zero_and_any_order_of_ranks():
    """Built by hand: rows of rank 0 are zero rows, the others their own codes; the stored order
    (by rank, then row) is undone in both roles, with and without autograd."""
    ranks = torch.tensor([2, 0, 3, 1, 0, 2])
    decoder = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    rows = {0: [1.0, 2.0], 3: [3.0], 2: [4.0, 5.0, 6.0], 5: [7.0, 8.0]}  # stored: rank 1, then 2 (rows 0, 5), then 3
    codes = torch.tensor([3.0, 1.0, 2.0, 7.0, 8.0, 4.0, 5.0, 6.0])
    m = RowRankEmbedding(codes, ranks, decoder)
    expected = torch.zeros(6, 4)
    for v, c in rows.items():
        expected[v] = torch.tensor(c) @ decoder[:len(c)]
    torch.testing.assert_close(m.dense(), expected)
    h = torch.randn(300, 4, generator=torch.Generator().manual_seed(2))  # more positions than one chunk
    with torch.no_grad():  # the inference path (scratch blocks) and the differentiable one agree
        torch.testing.assert_close(m.logits(h), h @ expected.t())
    torch.testing.assert_close(m.logits(h), h @ expected.t())
    m.logits(h).sum().backward()
    assert m.codes.grad is not None and m.codes.grad.abs().sum() > 0


def test_fit_is_deterministic_and_saves_bit_identically(stats, tmp_path):
    a, _ = _rows_model(stats)
    b, _ = _rows_model(stats)
    assert torch.equal(a.get_input_embeddings().dense(), b.get_input_embeddings().dense())
    folder = lmembed.save(a, tmp_path / "m")
    loaded = lmembed.load(folder)
    assert isinstance(loaded.get_input_embeddings(), RowRankEmbedding)
    assert torch.equal(loaded.get_input_embeddings().dense(), a.get_input_embeddings().dense())


def test_ranks_that_disagree_with_the_codes_are_refused(stats):
    model, _ = _rows_model(stats)
    m = model.get_input_embeddings()
    state = {k: t.clone() for k, t in m.state_dict().items()}
    state["ranks"][0] += 8
    fresh = build_module(m.spec())
    with pytest.raises(LmembedError, match="do not add up"):
        fresh.load_state_dict(state)
    with pytest.raises(LmembedError, match="malformed"):
        build_module({**m.spec(), "codes": V * m.rank + 1})


def test_a_later_stage_cannot_requantise_per_row_codes(stats):
    with pytest.raises(LmembedError, match="int8.*takes a plain matrix or a factorisation.*alloc=rows"):
        lmembed.compress(_uneven(), "wsvd:8:alloc=rows > int8", calib=stats)
