"""grain pipeline: documents -> shuffle(seed, per epoch) -> tokenize -> pack -> batch.

Packing: every document becomes ``[BOS] + tokens + [EOS]``; documents are concatenated
into one stream that is cut into rows of ``seq_len + 1`` tokens with stride ``seq_len``
(consecutive rows share one token, so every next-token transition of the stream is
predicted exactly once). ``inputs = row[:-1]``, ``targets = row[1:]``. Segment ids number
the documents inside a row 1, 2, 3, ... (a document continued from the previous row gets a
fresh id); 0 marks padding, which only the final row of a finite (held-out) stream has.
``loss_mask[t] = 1`` iff ``inputs[t]`` and ``targets[t]`` belong to the same document.

Exact resume: the packer's state is the grain state of its parent *before* the document
the next row starts in, plus the token offset into that document; restoring refetches and
re-tokenizes that document (deterministic) and skips the offset.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from memzoo.data.config import DataConfig
from memzoo.data.mqar import MQARTrainIterator, mqar_heldout_batches
from memzoo.data.sources import build_sources
from memzoo.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
_STATE_VERSION = 1


class _Tokenize:
    """Picklable map function: document string -> int32 ``[BOS] + tokens + [EOS]``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> np.ndarray:
        tok = self.tokenizer
        fast = getattr(tok, "encode_array", None)
        body = fast(text) if fast is not None else np.asarray(tok.encode(text), dtype=np.int32)
        out = np.empty(body.shape[0] + 2, dtype=np.int32)
        out[0] = tok.bos_id
        out[1:-1] = body
        out[-1] = tok.eos_id
        return out


class RowPacker:
    """Cuts a stream of token arrays into rows; see the module docstring for the layout.

    ``fetch()`` returns ``(state_before, tokens)`` for the next document or raises
    ``StopIteration``; ``state_before`` is whatever restores the source to just before it.
    """

    def __init__(self, seq_len: int, pad_id: int, fetch: Callable[[], tuple[Any, np.ndarray]]):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.pad_id = pad_id
        self._fetch = fetch
        self._docs: deque[tuple[Any, np.ndarray]] = deque()
        self._pos = 0

    def state(self, current_source_state: Callable[[], Any]) -> dict[str, Any]:
        """Resume point: source state before the current document, and offset into it."""
        if self._docs:
            return {"source": self._docs[0][0], "offset": self._pos}
        return {"source": current_source_state(), "offset": 0}

    def reset(self, offset: int) -> None:
        """Forgets buffered documents; the next document fetched is entered at ``offset``."""
        self._docs.clear()
        self._pos = offset

    def _ensure(self, i: int) -> bool:
        while len(self._docs) <= i:
            try:
                self._docs.append(self._fetch())
            except StopIteration:
                return False
        return True

    def next_row(self) -> Batch:
        """Returns the next row dict (inputs, targets, segment_ids, loss_mask)."""
        width = self.seq_len + 1
        row = np.full(width, self.pad_id, dtype=np.int32)
        seg = np.zeros(width, dtype=np.int32)
        if self._docs and self._pos >= len(self._docs[0][1]):
            # Only after a restore with an offset past the end (should not happen).
            self._docs.popleft()
            self._pos = 0
        filled, segment, i, pos = 0, 0, 0, self._pos
        while filled < width:
            if not self._ensure(i):
                break
            arr = self._docs[i][1]
            n = min(arr.shape[0] - pos, width - filled)
            row[filled : filled + n] = arr[pos : pos + n]
            segment += 1
            seg[filled : filled + n] = segment
            filled += n
            i += 1
            pos = 0
        if filled < width:  # source exhausted: final, padded row
            self._docs.clear()
            self._pos = 0
            if filled < 2:
                raise StopIteration
        else:
            advance, pos = self.seq_len, self._pos
            while True:
                remaining = self._docs[0][1].shape[0] - pos
                if advance < remaining:
                    pos += advance
                    break
                advance -= remaining
                self._docs.popleft()
                pos = 0
            self._pos = pos
        return {
            "inputs": row[:-1],
            "targets": row[1:],
            "segment_ids": seg[:-1],
            "loss_mask": ((seg[:-1] == seg[1:]) & (seg[:-1] > 0)).astype(np.float32),
        }


def pack_documents(
    docs: Sequence[Sequence[int]], *, seq_len: int, bos_id: int, eos_id: int, pad_id: int
) -> list[Batch]:
    """Packs already-tokenized documents (without specials) into rows (reference helper).

    Same layout as the pipeline; the last row is padded. Useful for tests and inspection.
    """
    it = iter(docs)

    def fetch() -> tuple[Any, np.ndarray]:
        body = np.asarray(next(it), dtype=np.int32).reshape(-1)
        return None, np.concatenate([[bos_id], body, [eos_id]]).astype(np.int32)

    packer = RowPacker(seq_len, pad_id, fetch)
    rows: list[Batch] = []
    while True:
        try:
            rows.append(packer.next_row())
        except StopIteration:
            return rows


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int) -> None:
        super().__init__(parent)
        self._packer = RowPacker(seq_len, pad_id, self._fetch)

    def _fetch(self) -> tuple[Any, np.ndarray]:
        state = self._parent.get_state()
        return state, next(self._parent)

    def __next__(self) -> Batch:
        return self._packer.next_row()

    def get_state(self) -> dict[str, Any]:
        return self._packer.state(self._parent.get_state)

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["source"])
        self._packer.reset(int(state["offset"]))


class PackIterDataset(grain.IterDataset):
    """grain ``IterDataset`` packing token arrays into rows with exact get/set_state."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int) -> None:
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"


def _shuffle_seed(seed: int) -> int:
    """Mixes the run seed so that runs with seeds s and s+1 do not share epoch orders.

    (grain seeds epoch e with ``base + e``; a plain ``base = seed`` would make epoch 1 of
    seed 0 equal to epoch 0 of seed 1.)
    """
    digest = hashlib.md5(f"memzoo.data.shuffle:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _doc_dataset(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    split: str,
    seed: int,
    infinite: bool,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    train_src, held_src = build_sources(cfg)
    src = train_src if split == "train" else held_src
    if len(src) == 0:
        raise ValueError(
            f"data.paths: the {split} split has no documents "
            f"(source {cfg.source!r}, heldout_fraction {cfg.heldout_fraction})"
        )
    ds = grain.MapDataset.source(src)
    if shard_count > 1:  # per-host reading: documents shard_index, shard_index + count, ...
        if len(src) < shard_count:
            raise ValueError(
                f"{len(src)} {split} documents cannot be split into {shard_count} data shards"
            )
        ds = ds[shard_index::shard_count]
    if cfg.shuffle and split == "train":
        ds = ds.shuffle(seed=_shuffle_seed(seed))
    if infinite:
        ds = ds.repeat(None)  # reseeds the shuffle per epoch: seed + epoch
    ds = ds.map(_Tokenize(tokenizer))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))


def _ensure_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags; mark them parsed if no absl app did."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainIterator:
    """Infinite iterator of training batches with exact ``get_state`` / ``set_state``.

    Batches are dicts of numpy arrays: ``inputs``, ``targets``, ``segment_ids`` (int32
    ``[batch_size, seq_len]``) and ``loss_mask`` (float32). The state is a JSON-serialisable
    dict; restoring it into an iterator built with the same config, tokenizer, shapes and
    seed continues with exactly the next batch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        self._meta = {
            "version": _STATE_VERSION,
            "source": cfg.source,
            "batch_size": int(batch_size),
            "seq_len": int(seq_len),
            "seed": int(seed),
            "vocab_size": int(tokenizer.vocab_size),
        }
        if shard_count > 1:
            self._meta["shard"] = [int(shard_index), int(shard_count)]
        docs = _doc_dataset(
            cfg, tokenizer, "train", seed, True, shard_index=shard_index, shard_count=shard_count
        )
        ds = PackIterDataset(docs, seq_len, tokenizer.pad_id)
        if cfg.passkey_fraction > 0 or cfg.recall_fraction > 0:
            from memzoo.data.passkey import PasskeyMixIterDataset

            self._meta["passkey_fraction"] = float(cfg.passkey_fraction)
            if cfg.recall_fraction > 0:
                self._meta["recall_fraction"] = float(cfg.recall_fraction)
            ds = PasskeyMixIterDataset(
                ds, cfg.passkey_fraction, tokenizer, seq_len, seed, cfg.recall_fraction
            )
        ds = ds.batch(batch_size, drop_remainder=True)
        if cfg.num_workers > 0:
            _ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
        self._it = iter(ds)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable resume state (position after the last returned batch)."""
        state = json.loads(json.dumps(self._it.get_state()))
        return {**self._meta, "grain": state}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores ``state`` from ``get_state``; the next batch is the one that followed."""
        for key, value in self._meta.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data state mismatch: {key}={state.get(key)!r} in state, "
                    f"{value!r} in this iterator"
                )
        self._it.set_state(state["grain"])

    def close(self) -> None:
        """Stops worker processes / threads, if any."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def make_train_iterator(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> TrainIterator | MQARTrainIterator:
    """Infinite, deterministic iterator of packed training batches.

    ``source == "mqar"``: generated MQAR batches (``memzoo.data.mqar.MQARTrainIterator``,
    same batch format and state protocol; the tokenizer is not used).

    Epochs repeat; with ``cfg.shuffle`` each epoch's document order is a fresh permutation
    (grain ``index_shuffle`` seeded by ``hash(seed) + epoch``).
    See ``TrainIterator`` for the batch format and state.

    Per-host reading (``shard_count > 1``): shard ``shard_index`` reads documents
    ``shard_index::shard_count`` (grain slicing, before the shuffle) and packs its own rows;
    for MQAR, shard ``s`` of ``S`` yields rows ``s*batch_size ...`` of each block of
    ``S * batch_size`` samples, so the shards' batches side by side are the unsharded stream.
    """
    if cfg.source == "mqar":
        return MQARTrainIterator(
            cfg,
            batch_size=batch_size,
            seq_len=seq_len,
            seed=seed,
            shard_index=shard_index,
            shard_count=shard_count,
        )
    return TrainIterator(cfg, tokenizer, batch_size, seq_len, seed, shard_index, shard_count)


def heldout_batches(
    cfg: DataConfig, tokenizer: Tokenizer, *, batch_size: int, seq_len: int, max_batches: int
) -> list[Batch]:
    """Up to ``max_batches`` batches from the held-out split, in file order (no shuffle).

    Same format as training batches. The last row is padded (segment 0, loss_mask 0), and a
    last incomplete batch is filled with all-padding rows so every batch has the full shape.
    Raises ``ValueError`` if the held-out split is empty. ``source == "mqar"``: exactly
    ``max_batches`` batches from the MQAR held-out stream (no padding).
    """
    if cfg.source == "mqar":
        return mqar_heldout_batches(
            cfg, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches
        )
    docs = _doc_dataset(cfg, tokenizer, "heldout", 0, infinite=False)
    it = iter(PackIterDataset(docs, seq_len, tokenizer.pad_id))
    empty = {
        "inputs": np.full(seq_len, tokenizer.pad_id, np.int32),
        "targets": np.full(seq_len, tokenizer.pad_id, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
    }
    batches: list[Batch] = []
    done = False
    while len(batches) < max_batches and not done:
        rows: list[Batch] = []
        for _ in range(batch_size):
            try:
                rows.append(next(it))
            except StopIteration:
                done = True
                break
        if not rows:
            break
        rows += [empty] * (batch_size - len(rows))
        batches.append({k: np.stack([r[k] for r in rows]) for k in empty})
    return batches
