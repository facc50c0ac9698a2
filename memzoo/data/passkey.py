"""Passkey and recall rows mixed into training (data.passkey_fraction, data.recall_fraction).

A passkey row holds one or more passkey documents ``[BOS] prompt answer [EOS]`` built by the
NIAH generator (``memzoo.evals.niah``, task ``niah_single_1``: a 7-digit number in a
repeated-noise haystack, at a random depth), each a random length between a quarter of the row
and the whole row; the rest of the row is padding (loss-masked).

A recall row is a key-value drill in the needles' wording: ``k1 is: v1. ... kP is: vP.``, then
the pairs again in order, then queries ``k is: v.`` of random keys until the row is full.
Every token of the repeat is predictable by copying and each queried value only by finding
its key earlier in the row: the copying and associative recall a passkey answer needs, on
about half the row's tokens instead of the ~3% a passkey document supervises (the MQAR
lesson: more recall targets per row is what gets the circuit to form).

Whether row ``n`` is a passkey, recall or text row and what it holds are functions of
``(seed, n)`` only, so the state is the text pipeline's state plus ``n`` and resume stays
exact.
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
    docs: list[list[int]] = []
    filled = 0
    while width - filled >= shortest:
        length = rng.randint(max(shortest, width // 4), width - filled)
        docs.append(passkey_document(tokenizer, length, seed, n * 64 + len(docs)))
        filled += len(docs[-1])
    return _row_layout(docs, width, tokenizer.pad_id)


def _row_layout(docs: list[list[int]], width: int, pad_id: int) -> dict[str, np.ndarray]:
    row = np.full(width, pad_id, dtype=np.int32)
    seg = np.zeros(width, dtype=np.int32)
    filled = 0
    for i, doc in enumerate(docs):
        row[filled : filled + len(doc)] = doc
        seg[filled : filled + len(doc)] = i + 1
        filled += len(doc)
    return {
        "inputs": row[:-1],
        "targets": row[1:],
        "segment_ids": seg[:-1],
        "loss_mask": ((seg[:-1] == seg[1:]) & (seg[:-1] > 0)).astype(np.float32),
    }


def recall_row(tokenizer: Tokenizer, seq_len: int, seed: int, n: int) -> dict[str, np.ndarray]:
    """Row ``n`` as one key-value recall document ``[BOS] pairs queries [EOS]``.

    Pairs ``k is: v.`` (2 to ``seq_len // 64`` of them, at least 2; adjective-noun keys and
    7-digit values as in the NIAH needles), a newline, then queries in the same form: first
    every pair in its order (a verbatim repeat, where every token is predictable by copying:
    the data that forms induction heads fastest), then uniformly drawn keys (where the value
    must be looked up by its key) until the next would not fit.
    """
    from memzoo.evals import niah

    rng = _rng(seed, n, "recall")
    enc = tokenizer.encode
    width = seq_len + 1
    n_pairs = rng.randint(2, max(2, seq_len // 64))
    keys = niah.draw_keys(rng, n_pairs)
    values = [niah.draw_value(rng, "number") for _ in keys]
    records = [list(enc(f"{k} is: {v}. ")) for k, v in zip(keys, values)]
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    doc = bos + [t for r in records for t in r] + list(enc("\n"))
    if len(doc) + max(map(len, records)) + len(eos) > width:
        raise ValueError(
            f"data.recall_fraction: seq_len {seq_len} is too short for a recall row "
            f"(needs about {len(doc) + 2 * max(map(len, records))} tokens)"
        )
    order = list(range(n_pairs))
    while True:
        q = records[order.pop(0) if order else rng.randrange(n_pairs)]
        if len(doc) + len(q) + len(eos) > width:
            break
        doc += q
    return _row_layout([doc + eos], width, tokenizer.pad_id)


class _MixIterator(grain.DatasetIterator):
    def __init__(self, parent, fraction, tokenizer, seq_len, seed, recall_fraction=0.0) -> None:
        super().__init__(parent)
        self._fraction = float(fraction)
        self._recall = float(recall_fraction)
        self._tok = tokenizer
        self._seq_len = seq_len
        self._seed = seed
        self._n = 0

    def __next__(self) -> dict[str, np.ndarray]:
        n = self._n
        u = _rng(self._seed, n, "pick").random()
        if u < self._fraction:
            row = passkey_row(self._tok, self._seq_len, self._seed, n)
        elif u < self._fraction + self._recall:
            row = recall_row(self._tok, self._seq_len, self._seed, n)
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
    """Replaces ``fraction`` of a packed-row dataset's rows with passkey rows and
    ``recall_fraction`` with recall rows."""

    def __init__(
        self,
        parent,
        fraction: float,
        tokenizer: Tokenizer,
        seq_len: int,
        seed: int,
        recall_fraction: float = 0.0,
    ):
        super().__init__(parent)
        self._args = (fraction, tokenizer, seq_len, seed, recall_fraction)

    def __iter__(self) -> _MixIterator:
        return _MixIterator(self._parent.__iter__(), *self._args)

    def __str__(self) -> str:
        return f"PasskeyMixIterDataset(fraction={self._args[0]}, recall={self._args[4]})"
