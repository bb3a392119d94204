"""The evaluation path both flows share: `open_model` opens whatever training or compression
wrote (or any transformers model), and one implementation of each metric measures it:
perplexity (causal, masked, translation), sentence fidelity, word similarity and analogies,
effective rank, classification scores, and the embedding analysis that combines them."""

from ..compression.integration.open import Opened, open_model
from .perplexity import lm_nll, ppl, window_nll

__all__ = ["lm_nll", "ppl", "window_nll", "open_model", "Opened"]
