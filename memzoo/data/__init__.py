"""Data pipeline for memzoo: sources, tokenizers, packing and grain iterators.

Public API: ``DataConfig``, ``validate_data_config``, ``Tokenizer``, ``build_tokenizer``,
``make_train_iterator``, ``heldout_batches``, ``count_bytes`` (plus helpers
``ByteTokenizer``, ``pack_documents``, ``TrainIterator``, ``build_sources``).
"""

from memzoo.data.config import DataConfig, validate_data_config
from memzoo.data.pipeline import TrainIterator, heldout_batches, make_train_iterator, pack_documents
from memzoo.data.sources import build_sources
from memzoo.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    count_bytes,
)

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TrainIterator",
    "build_sources",
    "build_tokenizer",
    "count_bytes",
    "heldout_batches",
    "make_train_iterator",
    "pack_documents",
    "validate_data_config",
]
