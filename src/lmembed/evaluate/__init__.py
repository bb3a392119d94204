"""Metrics: one implementation each, shared by tests, benchmarks and the CLI."""

from .perplexity import lm_nll, ppl, window_nll

__all__ = ["lm_nll", "ppl", "window_nll"]
