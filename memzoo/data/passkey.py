"""Passkey rows mixed into training: ``data.passkey_fraction`` of the packed rows.

Each mixed-in row holds one or more passkey documents ``[BOS] prompt answer [EOS]`` built by
the NIAH generator (``memzoo.evals.niah``, task ``niah_single_1``: a 7-digit number in a
repeated-noise haystack, at a random depth), each a random length between a quarter of the
row and the whole row; the rest of the row is padding (loss-masked). Whether row ``n`` is a
passkey row and what it holds are functions of ``(seed, n)`` only, so the state is the text
pipeline's state plus ``n`` and resume stays exact.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import grain
import numpy as np

from memzoo.data.tokenizer import Tokenizer

PASSKEY_TASK = "niah_single_1"


def _rng(seed: int, n: int, what: str) -> random.Random:
    digest = hashlib.sha256(f"memzoo.passkey:{what}:{seed}:{n}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def passkey_document(tokenizer: Tokenizer, length: int, seed: int, index: int) -> list[int]:
    """``[BOS] prompt answer [EOS]`` of exactly ``length`` tokens (a random-depth passkey)."""
    from memzoo.evals import niah

    s = niah.Settings(task=PASSKEY_TASK, samples=1, seed=seed)
    cell = {"length": f"train{index}", "depth": "random"}
    enc = tokenizer.encode
    expected = niah.draw_needles(s, cell, 0)[3]
    answer = list(enc(niah.answer_text(expected)))
    prompt_tokens = length - len(answer) - 1
    sample = niah.make_sample(s, cell, 0, enc, tokenizer.bos_id, prompt_tokens)
    return sample.ids + answer + [tokenizer.eos_id]


def passkey_row(tokenizer: Tokenizer, seq_len: int, seed: int, n: int) -> dict[str, np.ndarray]:
    """Row ``n``'s passkey documents, in the pipeline's row layout."""
    from memzoo.evals import niah

    rng = _rng(seed, n, "row")
    width = seq_len + 1
    # the shortest document the generator can build at this tokenizer
    s = niah.Settings(task=PASSKEY_TASK, samples=1)
    shortest = (
        len(tokenizer.encode(niah.header_text("number")))
        + len(tokenizer.encode(niah.needle_text("quiet-lantern", "1234567", "number") + " "))
        + len(tokenizer.encode(niah.question_text("number", ["quiet-lantern"], 1)))
        + len(tokenizer.encode(niah.answer_text(["1234567"])))
        + 8
    )
    del s
    if shortest > width:
        raise ValueError(
            f"data.passkey_fraction: seq_len {seq_len} is too short for a passkey document "
            f"(needs about {shortest} tokens)"
        )
    row = np.full(width, tokenizer.pad_id, dtype=np.int32)
    seg = np.zeros(width, dtype=np.int32)
    filled, segment = 0, 0
    while width - filled >= shortest:
        length = rng.randint(max(shortest, width // 4), width - filled)
        doc = passkey_document(tokenizer, length, seed, n * 64 + segment)
        row[filled : filled + len(doc)] = doc
        segment += 1
        seg[filled : filled + len(doc)] = segment
        filled += len(doc)
    return {
        "inputs": row[:-1],
        "targets": row[1:],
        "segment_ids": seg[:-1],
        "loss_mask": ((seg[:-1] == seg[1:]) & (seg[:-1] > 0)).astype(np.float32),
    }


class _MixIterator(grain.DatasetIterator):
    def __init__(self, parent, fraction, tokenizer, seq_len, seed) -> None:
        super().__init__(parent)
        self._fraction = float(fraction)
        self._tok = tokenizer
        self._seq_len = seq_len
        self._seed = seed
        self._n = 0

    def __next__(self) -> dict[str, np.ndarray]:
        n = self._n
        if _rng(self._seed, n, "pick").random() < self._fraction:
            row = passkey_row(self._tok, self._seq_len, self._seed, n)
        else:
            row = next(self._parent)
        self._n = n + 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "n": self._n}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._n = int(state["n"])


class PasskeyMixIterDataset(grain.IterDataset):
    """Replaces a ``fraction`` of the rows of a packed-row dataset with passkey rows."""

    def __init__(self, parent, fraction: float, tokenizer: Tokenizer, seq_len: int, seed: int):
        super().__init__(parent)
        self._args = (fraction, tokenizer, seq_len, seed)

    def __iter__(self) -> _MixIterator:
        return _MixIterator(self._parent.__iter__(), *self._args)

    def __str__(self) -> str:
        return f"PasskeyMixIterDataset(fraction={self._args[0]})"
