"""lmembed's GGUF files in llama.cpp itself (skipped where llama.cpp is not built: `make llamacpp`):
llama-perplexity's log-probabilities of every scored position against the same model run by
transformers with lmembed's decoded token matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmembed.export import compress_gguf, llamacpp, read_token_embd
from tiny_gguf import SENTENCES
from tiny_gguf import write_gguf as write_tiny

pytestmark = pytest.mark.skipif(llamacpp.tool("llama-perplexity") is None,
                                reason="llama.cpp is not built (make llamacpp, or LMEMBED_LLAMACPP)")
CTX = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    (root / "text.txt").write_text(" ".join(SENTENCES[:40]) + "\n")
    return {"src": write_tiny(root / "tied.gguf", dim=256, embd_type="F32"), "root": root}


def transformers_logprobs(src, embd: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log-softmax at the positions llama-perplexity scores (n_ctx/2 .. n_ctx-2 of each chunk), the
    model loaded from `src` with its token matrix (tied) replaced by `embd`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.from_numpy(embd))
        logits = model(torch.from_numpy(tokens.astype(np.int64))).logits
    return torch.log_softmax(logits[:, CTX // 2: CTX - 1].double(), -1).numpy()


def run_llamacpp(model, root):
    return llamacpp.logprobs(model, root / "text.txt", ctx=CTX, chunks=4)


@pytest.mark.parametrize("kind", ["Q4_K", "Q3_K", "Q4_0", "IQ4_NL"])
def test_llamacpp_scores_lmembeds_blocks_as_lmembed_decodes_them(tiny, tmp_path, kind):
    dst = tmp_path / f"{kind}.gguf"
    compress_gguf(tiny["src"], None, dst, gguf_type=kind, calib_tokens=256, log=lambda s: None)
    tokens, theirs = run_llamacpp(dst, tiny["root"])
    ours = transformers_logprobs(tiny["src"], read_token_embd(dst)[0], tokens)
    assert len(tokens) >= 2 and theirs.shape == ours.shape
    top = theirs > theirs.max(-1, keepdims=True) - 15  # llama.cpp stores the top 16 nats in 16-bit steps
    gap = np.abs(theirs - ours)[top]  # llama.cpp rounds the hidden states to 8 bits for quantised matmuls
    _, before = run_llamacpp(tiny["src"], tiny["root"])
    assert gap.max() < 0.05 and gap.mean() < 5e-3, (gap.max(), gap.mean())
    targets = tokens[:, CTX // 2 + 1:, None]
    nll = [-np.take_along_axis(p, targets, -1).mean() for p in (ours, theirs)]
    assert abs(nll[0] - nll[1]) < 1e-3  # the same perplexity, to 0.1 %
    assert np.abs(before - theirs)[top].mean() > 10 * gap.mean()  # the rewritten matrix is what llama.cpp ran
