"""Tokenizers: byte-level (built in), HuggingFace ``tokenizers`` and SentencePiece."""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from memzoo.data.config import DataConfig, validate_data_config


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _as_int_list(ids: Any) -> list[int]:
    return [int(i) for i in np.asarray(ids).reshape(-1)]


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 = BOS, 257 = EOS, 258 = PAD."""

    vocab_size: int = 259
    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258

    def encode(self, text: str) -> list[int]:
        """Returns the UTF-8 bytes of ``text`` as ints (no specials added)."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path: UTF-8 bytes of ``text`` as an int32 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Drops special ids and decodes the bytes with ``errors="replace"``."""
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        arr = arr[(arr >= 0) & (arr < 256)].astype(np.uint8)
        return arr.tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes represented by each id (1 for bytes, 0 for specials)."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        lengths[:256] = 1
        return lengths


class _SpecialsMixin:
    """Shared handling of bos/eos/pad for wrapped tokenizers.

    Specials the tokenizer does not define get fresh ids appended after its vocabulary
    (``base_vocab_size``, ``base_vocab_size + 1``, ...) in the order bos, eos, pad; the
    reported ``vocab_size`` includes them. ``decode`` skips all three specials.
    """

    base_vocab_size: int
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    _lengths: np.ndarray | None
    _lock: threading.Lock

    def _set_specials(self, found: Mapping[str, int | None]) -> None:
        next_id = self.base_vocab_size
        ids: dict[str, int] = {}
        for name in ("bos", "eos", "pad"):
            value = found.get(name)
            if value is None or value < 0:
                value = next_id
                next_id += 1
            ids[name] = int(value)
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.vocab_size = next_id
        self._lengths = None
        self._lock = threading.Lock()

    def _regular(self, ids: Any) -> list[int]:
        specials = {self.bos_id, self.eos_id, self.pad_id}
        return [i for i in _as_int_list(ids) if i not in specials and 0 <= i < self.base_vocab_size]

    def _byte_length(self, token_id: int) -> int:
        raise NotImplementedError

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes represented by each id (computed once, by decoding every single id)."""
        with self._lock:
            if self._lengths is None:
                lengths = np.zeros(self.vocab_size, dtype=np.int64)
                specials = {self.bos_id, self.eos_id, self.pad_id}
                for i in range(self.base_vocab_size):
                    if i not in specials:
                        lengths[i] = self._byte_length(i)
                self._lengths = lengths
            return self._lengths

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state["_lengths"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


@functools.cache
def _byte_level_inverse() -> frozenset[str]:
    """Characters that the GPT-2 style ByteLevel pre-tokenizer uses for single bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in keep:
            chars.add(chr(256 + extra))
            extra += 1
    return frozenset(chars)


_HF_BOS = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "[CLS]")
_HF_EOS = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[EOS]", "[SEP]")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>")


class HFTokenizer(_SpecialsMixin):
    """Wraps ``tokenizers.Tokenizer.from_file(path)``.

    bos/eos/pad are looked up by common token strings (bos: ``<s>``, ``<bos>``,
    ``<|begin_of_text|>``, ``<|startoftext|>``, ``[BOS]``, ``[CLS]``; eos: ``</s>``,
    ``<eos>``, ``<|end_of_text|>``, ``<|endoftext|>``, ``[EOS]``, ``[SEP]``; pad: ``<pad>``,
    ``[PAD]``, ``<|pad|>``); missing ones get fresh ids after the vocabulary. ``encode``
    adds no special tokens (the packer adds BOS/EOS itself). Byte lengths for
    ``count_bytes``: exact for ByteLevel (GPT-2 style) decoders, via the byte<->unicode
    table; otherwise the length of each token decoded alone (approximate: e.g. spaces
    between WordLevel tokens are not counted).
    """

    def __init__(self, path: str):
        import tokenizers

        self.path = path
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.base_vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

        def find(cands: tuple[str, ...]) -> int | None:
            for c in cands:
                i = self._tok.token_to_id(c)
                if i is not None:
                    return int(i)
            return None

        self._set_specials({"bos": find(_HF_BOS), "eos": find(_HF_EOS), "pad": find(_HF_PAD)})
        self._byte_level = "ByteLevel" in json.dumps(
            json.loads(self._tok.to_str()).get("decoder") or {}
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ``ids``, skipping bos/eos/pad and out-of-vocabulary fallback ids."""
        return self._tok.decode(self._regular(ids), skip_special_tokens=False)

    def _byte_length(self, token_id: int) -> int:
        if self._byte_level:
            token = self._tok.id_to_token(token_id) or ""
            inv = _byte_level_inverse()
            return sum(1 if ch in inv else len(ch.encode("utf-8")) for ch in token)
        return len(self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8"))


class SentencePieceTokenizer(_SpecialsMixin):
    """Wraps ``sentencepiece.SentencePieceProcessor(model_file=path)``.

    bos/eos/pad come from the model (``bos_id()``, ``eos_id()``, ``pad_id()``); ids the
    model disables (-1) get fresh ids after the vocabulary.
    """

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.base_vocab_size = int(self._sp.get_piece_size())
        self._set_specials(
            {"bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos)."""
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ``ids``, skipping bos/eos/pad and fallback ids."""
        return self._sp.decode(self._regular(ids))

    def _byte_length(self, token_id: int) -> int:
        # Pieces rather than decode(): decode strips the leading "▁" of a lone piece.
        sp = self._sp
        if sp.is_control(token_id):
            return 0
        if sp.is_byte(token_id):
            return 1
        if sp.is_unknown(token_id):
            return len(sp.decode([token_id]).encode("utf-8"))
        return len(sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8"))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_sp"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import sentencepiece as spm

        super().__setstate__(state)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    """Builds the tokenizer named by ``cfg.tokenizer`` (validating the config first).

    ``source == "mqar"`` always gets ``MQARTokenizer(cfg.mqar_vocab_size)`` (ids are the
    model's tokens; ``cfg.tokenizer`` is ignored).
    """
    validate_data_config(cfg)
    if cfg.source == "mqar":
        from memzoo.data.mqar import MQARTokenizer

        return MQARTokenizer(cfg.mqar_vocab_size)
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(cfg.tokenizer_path)
    if cfg.tokenizer == "hf":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def count_bytes(batch: Mapping[str, Any], tokenizer: Tokenizer) -> float:
    """Number of UTF-8 bytes represented by the loss-masked targets of ``batch``.

    For bits per byte: ``bpb = sum_nll_nats / (ln 2 * count_bytes(batch, tok))``.
    Byte tokenizer: the number of masked targets that are bytes (specials count 0).
    hf / sentencepiece: each target token's own byte length (table built once per
    tokenizer by decoding every id; sentencepiece counts ``▁`` as one space byte, so a
    document's first word counts its dummy-prefix space). MQAR: every masked target (a
    queried value) counts as one byte, so bits per byte = bits per scored token.
    """
    targets = np.asarray(batch["targets"]).astype(np.int64)
    mask = np.asarray(batch["loss_mask"]) > 0
    lengths_fn = getattr(tokenizer, "token_byte_lengths", None)
    if lengths_fn is not None:
        lengths = lengths_fn()
        valid = mask & (targets >= 0) & (targets < len(lengths))
        return float(lengths[targets[valid]].sum())
    specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    total = 0
    for t in targets[mask].tolist():
        if t not in specials:
            total += len(tokenizer.decode([t]).encode("utf-8"))
    return float(total)
