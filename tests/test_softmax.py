from __future__ import annotations

import pytest
import torch

from lmembed.config import make_config
from lmembed.models import build_model
from lmembed.models.softmax import chunked_cross_entropy


@pytest.mark.parametrize("bias", [True, False])
def test_chunked_ce_gradcheck(bias):
    torch.manual_seed(0)
    h = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(41, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(41, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 41, (23,))
    inputs = (h, w, b) if bias else (h, w)
    assert torch.autograd.gradcheck(lambda *a: chunked_cross_entropy(a[0], a[1], a[2] if bias else None, y, 5), inputs)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
@pytest.mark.parametrize("tie", ["none", "tied"])
def test_model_loss_chunked_equals_full(arch, tie):
    cfg = make_config(arch, "tiny", tie=tie, proj_reg=0.01)
    torch.manual_seed(0)
    m = build_model(cfg, 300)
    x, y = torch.randint(0, 300, (4, 12)), torch.randint(0, 300, (4, 12))
    full, _ = m(x, targets=y)
    full.backward()
    g_full = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    chunked, _ = m(x, targets=y, ce_chunk=7)
    chunked.backward()
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, g_full[n], atol=1e-5, rtol=1e-4), n
