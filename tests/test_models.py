from __future__ import annotations

import pytest
import torch

from lmembed.common.runtime import count_params
from lmembed.config import make_config
from lmembed.errors import LmembedError
from lmembed.models import build_model

V = 500


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_tied_shares_one_parameter_and_saves_exactly_v_times_d(arch):
    untied = build_model(make_config(arch, "tiny", tie="none"), V)
    tied = build_model(make_config(arch, "tiny", tie="tied"), V)
    d = tied.embedding.weight.shape[1]
    assert tied.head.out.weight is tied.embedding.weight
    assert tied.head.out.weight.data_ptr() == tied.embedding.weight.data_ptr()
    assert count_params(untied) - count_params(tied) == V * d
    assert untied.embedding_params() - tied.embedding_params() == V * d


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_projection_adds_d_by_d_and_penalty(arch):
    base = build_model(make_config(arch, "tiny", tie="tied"), V)
    pr = build_model(make_config(arch, "tiny", tie="tied", proj_reg=0.1, proj_bias=False), V)
    d = pr.embedding.weight.shape[1]
    assert count_params(pr) - count_params(base) == d * d
    biased = build_model(make_config(arch, "tiny", tie="tied", proj_reg=0.1), V)  # the default, as the authors' code
    assert count_params(biased) - count_params(base) == d * d + d
    assert pr.penalty().item() == pytest.approx(pr.head.proj.weight.pow(2).sum().item())
    assert base.penalty() is None


def test_tied_gradient_flows_from_both_sides():
    m = build_model(make_config("lstm", "tiny", tie="tied"), V)
    x = torch.randint(0, V, (2, 5))
    logits, _ = m(x)
    logits.sum().backward()
    g = m.embedding.weight.grad
    # every row gets output-side gradient; input rows of used tokens get more
    assert (g.abs().sum(1) > 0).all()


def test_paper_small_parameter_counts():
    """Press & Wolf Table 6: 4.65M untied, 2.65M tied: exactly the TF model's 2*(400*800 + 800) LSTM
    weights + embeddings + softmax bias, since PyTorch's second LSTM bias is frozen at zero."""
    untied = build_model(make_config("lstm", "small", tie="none"), 10000)
    tied = build_model(make_config("lstm", "small", tie="tied"), 10000)
    assert count_params(untied) == 2 * (400 * 800 + 800) + 2 * 10000 * 200 + 10000 == 4_651_600
    assert count_params(tied) == 2_651_600
    for name, p in tied.rnn.named_parameters():
        if name.startswith("bias_hh"):
            assert not p.requires_grad and p.abs().sum() == 0
        elif name.startswith("bias_ih"):
            assert p.requires_grad and p.abs().sum() == 0  # TF's zero bias init


def test_lstm_bias_hh_stays_zero_through_training():
    """The frozen second bias must not move (the effective bias learns at TF's rate, not twice it)."""
    from lmembed.training import loop

    cfg = make_config("lstm", "tiny", tie="tied")
    m = build_model(cfg, V)
    opt = loop.make_optimizer(cfg, m, torch.device("cpu"))
    x = torch.randint(0, V, (4, 6))
    loss, _ = m(x[:, :-1], None, targets=x[:, 1:])
    loop.optimizer_step(m, opt, loss, cfg.clip)
    assert m.rnn.bias_hh_l0.abs().sum() == 0
    assert m.rnn.bias_ih_l0.abs().sum() > 0


def test_transformer_is_causal():
    m = build_model(make_config("transformer", "tiny"), V).eval()
    x = torch.randint(0, V, (1, 10))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % V
    a, b = m(x)[0], m(y)[0]
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6)
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_tie_needs_equal_sizes_without_projection():
    with pytest.raises(LmembedError, match="emb_dim == hidden"):
        make_config("lstm", "tiny", tie="tied", emb_dim=16, hidden=32)
    m = build_model(make_config("lstm", "tiny", tie="tied", emb_dim=16, hidden=32, proj_reg=0.01), V)
    assert m.head.out.weight is m.embedding.weight


def test_unknown_preset_and_tie_mode():
    with pytest.raises(LmembedError, match="--preset huge: unknown for lstm; expected one of tiny, demo, small"):
        make_config("lstm", "huge")
    with pytest.raises(LmembedError, match="--tie both"):
        make_config("lstm", "tiny", tie="both")
