"""Corpora, tokenizers and batching."""

from .bundled import REGISTRY as BUNDLED
from .bundled import TextOptions
from .corpus import Corpus, load_corpus
from .vocab import BPETokenizer, WordTokenizer, load_tokenizer

__all__ = ["BUNDLED", "TextOptions", "Corpus", "load_corpus", "BPETokenizer", "WordTokenizer", "load_tokenizer"]
