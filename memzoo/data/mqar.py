"""MQAR: multi-query associative recall (Zoology-style), as a grain source and iterators.

Vocabulary (``V = vocab_size``, even): keys are ids ``[0, V/2)``, values ids ``[V/2, V)``;
four specials follow: ``FILL = V`` (filler between queries), ``BOS = V+1``, ``EOS = V+2``,
``PAD = V+3`` (``MQARTokenizer.vocab_size = V + 4``).

One sample is a row of ``seq_len + 1`` tokens::

    BOS k1 v1 k2 v2 ... kN vN | query region: FILL ... kq vq FILL ... kq' vq' FILL ...

``N = num_pairs`` distinct keys, each with a value drawn independently (values may repeat).
The query region (``seq_len + 1 - (2N + 1)`` tokens) is cut into ``S = len // 2`` two-token
slots; ``N * passes`` slots are drawn without replacement with probability proportional to
``(j + 1) ** (gap_power - 1)`` (slot ``j`` = distance from the end of the pairs, so short
gaps are the most likely: a power law, as in Zoology with its default ``power_a = 0.01``).
Every key is queried exactly ``passes`` times, in a random order; a queried slot holds the
key followed by its value. ``inputs = row[:-1]``, ``targets = row[1:]``; the loss mask is 1
exactly at the query-key positions (the target there is the key's value), 0 elsewhere; one
segment (segment ids all 1).

Determinism: sample ``i`` of stream ``s`` depends only on ``(seed, s, i)`` (numpy
``default_rng`` on a ``SeedSequence``). Streams: 0 = training, 1 = held-out, 2 = evaluation
(``memzoo.evals.mqar``). The training iterator's resume state is its batch counter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]
_STATE_VERSION = 1
TRAIN_STREAM, HELDOUT_STREAM, EVAL_STREAM = 0, 1, 2
_SEED_TAG = 0x6D716172  # "mqar": separates these seeds from other uses of the run seed
NUM_SPECIALS = 4


class MQARTokenizer:
    """Identity tokenizer for MQAR: token ids are the model's tokens.

    ``encode`` reads whitespace-separated integers (``_`` for the filler token);
    ``decode`` writes regular ids as space-separated numbers and the filler as ``_``,
    dropping BOS/EOS/PAD. For bits per byte every regular id (keys and values, ``< V``)
    counts as one byte and the specials as zero, so ``count_bytes`` of an MQAR batch is the
    number of scored query positions.
    """

    def __init__(self, vocab_size: int = 512) -> None:
        self.base_vocab_size = int(vocab_size)
        self.fill_id = self.base_vocab_size
        self.bos_id = self.base_vocab_size + 1
        self.eos_id = self.base_vocab_size + 2
        self.pad_id = self.base_vocab_size + 3
        self.vocab_size = self.base_vocab_size + NUM_SPECIALS

    def encode(self, text: str) -> list[int]:
        """Whitespace-separated ids (``_`` = filler); raises ``ValueError`` on other words."""
        out: list[int] = []
        for word in text.split():
            if word == "_":
                out.append(self.fill_id)
                continue
            if not word.isdigit() or int(word) >= self.base_vocab_size:
                raise ValueError(
                    f"mqar tokenizer: cannot encode {word!r} "
                    f"(expected integers in [0, {self.base_vocab_size}) or '_')"
                )
            out.append(int(word))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Space-separated ids; filler as ``_``; BOS/EOS/PAD and out-of-range ids dropped."""
        words = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1):
            i = int(i)
            if 0 <= i < self.base_vocab_size:
                words.append(str(i))
            elif i == self.fill_id:
                words.append("_")
        return " ".join(words)

    def token_byte_lengths(self) -> np.ndarray:
        """1 for regular ids (keys and values), 0 for the specials."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        lengths[: self.base_vocab_size] = 1
        return lengths


@dataclass(frozen=True)
class MQARSpec:
    """Shape of MQAR samples (see the module docstring)."""

    vocab_size: int = 512
    seq_len: int = 64
    num_pairs: int = 4
    passes: int = 1
    gap_power: float = 0.01

    def check(self) -> None:
        """Raises ``ValueError("data.mqar_...: ...")`` if samples cannot be built."""
        v, n, p = self.vocab_size, self.num_pairs, self.passes
        if not isinstance(v, int) or v < 4 or v % 2:
            raise ValueError(f"data.mqar_vocab_size: must be an even integer >= 4, got {v!r}")
        if not isinstance(n, int) or not (1 <= n <= v // 2):
            raise ValueError(
                f"data.mqar_num_pairs: must be in [1, vocab_size/2 = {v // 2}], got {n!r}"
            )
        if not isinstance(p, int) or p < 1:
            raise ValueError(f"data.mqar_passes: must be an integer >= 1, got {p!r}")
        if not isinstance(self.gap_power, int | float) or not self.gap_power > 0:
            raise ValueError(f"data.mqar_gap_power: must be > 0, got {self.gap_power!r}")
        if self.num_slots < n * p:
            need = 2 * n * (1 + p)
            raise ValueError(
                f"data.mqar_num_pairs: {n} pairs x {p} passes need seq_len >= {need}, "
                f"got seq_len={self.seq_len}"
            )

    @property
    def num_slots(self) -> int:
        """Two-token query slots after BOS and the pairs."""
        return max(self.seq_len + 1 - (2 * self.num_pairs + 1), 0) // 2

    @property
    def chance(self) -> float:
        """Accuracy of guessing a uniformly random value."""
        return 2.0 / self.vocab_size


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence([_SEED_TAG, int(seed) & (2**63 - 1), stream, index])
    )


def make_sample(spec: MQARSpec, seed: int, stream: int, index: int) -> Batch:
    """Sample ``index`` of ``stream``: dict of ``[seq_len]`` arrays plus metadata.

    Keys ``inputs``, ``targets``, ``segment_ids`` (int32), ``loss_mask`` (float32) as in a
    training row, and ``distances`` (int32, ``-1`` off the queries): for each query position,
    how many tokens back its key-value pair starts.
    """
    rng = _rng(seed, stream, index)
    v, n, p = spec.vocab_size, spec.num_pairs, spec.passes
    half = v // 2
    fill, bos = v, v + 1
    keys = rng.choice(half, size=n, replace=False)
    values = rng.integers(half, v, size=n)
    row = np.full(spec.seq_len + 1, fill, dtype=np.int32)
    row[0] = bos
    row[1 : 2 * n + 1 : 2] = keys
    row[2 : 2 * n + 2 : 2] = values
    s = spec.num_slots
    weights = np.arange(1, s + 1, dtype=np.float64) ** (spec.gap_power - 1.0)
    slots = rng.choice(s, size=n * p, replace=False, p=weights / weights.sum())
    which = rng.permutation(np.repeat(np.arange(n), p))
    qpos = 2 * n + 1 + 2 * slots  # row index of each query key
    row[qpos] = keys[which]
    row[qpos + 1] = values[which]
    mask = np.zeros(spec.seq_len, dtype=np.float32)
    mask[qpos] = 1.0
    dist = np.full(spec.seq_len, -1, dtype=np.int32)
    dist[qpos] = qpos - (1 + 2 * which)
    return {
        "inputs": row[:-1].copy(),
        "targets": row[1:].copy(),
        "segment_ids": np.ones(spec.seq_len, dtype=np.int32),
        "loss_mask": mask,
        "distances": dist,
    }


ROW_KEYS = ("inputs", "targets", "segment_ids", "loss_mask")


class MQARSource:
    """grain random-access data source of MQAR rows (``__len__`` / ``__getitem__``).

    Item ``i`` is ``make_sample(spec, seed, stream, i)`` restricted to the training row
    keys (``with_distances=True`` keeps ``distances``). ``length`` is nominal: any index
    is valid, and ``__getitem__`` does not wrap.
    """

    def __init__(
        self,
        spec: MQARSpec,
        *,
        seed: int = 0,
        stream: int = TRAIN_STREAM,
        length: int = 2**31 - 1,
        with_distances: bool = False,
    ) -> None:
        spec.check()
        self.spec, self.seed, self.stream = spec, int(seed), int(stream)
        self.length = int(length)
        self.with_distances = with_distances

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Batch:
        sample = make_sample(self.spec, self.seed, self.stream, int(index))
        if not self.with_distances:
            sample.pop("distances")
        return sample

    def batch(self, start: int, batch_size: int) -> Batch:
        """Rows ``start .. start + batch_size - 1`` stacked into ``[batch_size, seq_len]``."""
        rows = [self[start + i] for i in range(batch_size)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def __repr__(self) -> str:
        return f"MQARSource({self.spec}, seed={self.seed}, stream={self.stream})"


def spec_from_config(cfg: Any, seq_len: int) -> MQARSpec:
    """The ``MQARSpec`` of a ``DataConfig`` (``data.mqar_*``) at ``seq_len``."""
    return MQARSpec(
        vocab_size=cfg.mqar_vocab_size,
        seq_len=int(seq_len),
        num_pairs=cfg.mqar_num_pairs,
        passes=cfg.mqar_passes,
        gap_power=float(cfg.mqar_gap_power),
    )


class MQARTrainIterator:
    """Infinite iterator of MQAR training batches with exact ``get_state`` / ``set_state``.

    Batch ``b`` holds samples ``b * batch_size ...`` of the training stream; the state is
    the batch counter plus the settings it depends on (checked on restore).
    """

    def __init__(
        self,
        cfg: Any,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        spec = spec_from_config(cfg, seq_len)
        self.source = MQARSource(spec, seed=seed, stream=TRAIN_STREAM)
        self.batch_size = int(batch_size)
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self._next = 0
        self._meta = {
            "version": _STATE_VERSION,
            "source": "mqar",
            "batch_size": self.batch_size,
            "seq_len": int(seq_len),
            "seed": int(seed),
            "vocab_size": spec.vocab_size + NUM_SPECIALS,
            "num_pairs": spec.num_pairs,
            "passes": spec.passes,
            "gap_power": spec.gap_power,
        }
        if self.shard_count > 1:
            self._meta["shard"] = [self.shard_index, self.shard_count]

    def __iter__(self) -> MQARTrainIterator:
        return self

    def __next__(self) -> Batch:
        start = (self._next * self.shard_count + self.shard_index) * self.batch_size
        batch = self.source.batch(start, self.batch_size)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable resume state (position after the last returned batch)."""
        return {**self._meta, "batch": self._next}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores ``state`` from ``get_state``; the next batch is the one that followed."""
        for key, value in self._meta.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data state mismatch: {key}={state.get(key)!r} in state, "
                    f"{value!r} in this iterator"
                )
        self._next = int(state["batch"])

    def close(self) -> None:
        """Nothing to release."""


def mqar_heldout_batches(
    cfg: Any, *, batch_size: int, seq_len: int, max_batches: int
) -> list[Batch]:
    """``max_batches`` full batches from the held-out stream (seed 0, stream 1)."""
    src = MQARSource(spec_from_config(cfg, seq_len), seed=0, stream=HELDOUT_STREAM)
    return [src.batch(b * batch_size, batch_size) for b in range(max_batches)]
