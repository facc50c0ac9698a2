"""Document sources: random-access lists of documents with a deterministic train/held-out split.

A source is a grain-compatible random-access data source (``__len__`` / ``__getitem__``)
whose items are document strings. Files are read lazily on access; only small per-file
indexes (line offsets for jsonl, row counts for parquet, record counts for ArrayRecord)
are built up front.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import sysconfig
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from memzoo.data.config import DataConfig, expand_paths, validate_data_config

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> str:
    """Directory of the running interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> tuple[str, list[str]]:
    """Returns ``(root, relative paths)`` of all stdlib ``**/*.py`` files, sorted.

    ``site-packages`` / ``dist-packages`` (and ``__pycache__``) are excluded.
    """
    root = stdlib_root()
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                rels.append(rel.replace(os.sep, "/"))
    rels.sort()
    return root, rels


def stable_fraction(key: str) -> float:
    """Maps ``key`` to [0, 1) via md5 (identical on every machine)."""
    return int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) / float(1 << 128)


def _split_keys(keys: list[str], fraction: float) -> tuple[list[int], list[int]]:
    """Splits indices of ``keys`` into (train, heldout) by ``stable_fraction(key) < fraction``.

    With ``fraction > 0`` and at least two keys both sides are made non-empty: if no key
    falls below the threshold the one with the smallest hash is held out; if all do, the
    one with the largest hash goes to train.
    """
    h = [stable_fraction(k) for k in keys]
    held = [i for i in range(len(keys)) if h[i] < fraction]
    if fraction > 0 and len(keys) >= 2:
        if not held:
            held = [min(range(len(keys)), key=h.__getitem__)]
        elif len(held) == len(keys):
            held.remove(max(range(len(keys)), key=h.__getitem__))
    held_set = set(held)
    train = [i for i in range(len(keys)) if i not in held_set]
    return train, sorted(held_set)


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _jsonl_line_spans(path: str) -> list[tuple[int, int]]:
    """(start, end) byte spans of the non-empty lines of a jsonl file."""
    size = os.path.getsize(path)
    if size == 0:
        return []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = np.frombuffer(mm, dtype=np.uint8)
        newlines = np.flatnonzero(buf == 10)
        del buf
    ends = np.append(newlines, size)
    starts = np.concatenate([[0], newlines + 1])
    keep = (ends - starts) > 0
    return [(int(s), int(e)) for s, e in zip(starts[keep], ends[keep])]


def _doc_from_obj(obj: Any, text_key: str, where: str) -> str:
    if not isinstance(obj, dict) or text_key not in obj:
        raise KeyError(f"{where}: record has no field {text_key!r}")
    value = obj[text_key]
    return "" if value is None else str(value)


@dataclass(frozen=True)
class DocRef:
    """One document: file index and record index within the file (-1 = whole file)."""

    file: int
    record: int


class DocumentSource:
    """Random-access list of documents (grain data source); items are strings.

    Picklable: per-process reader handles and caches are dropped and reopened lazily.
    """

    def __init__(
        self, kind: str, files: list[str], refs: list[DocRef], text_key: str = "text"
    ) -> None:
        self.kind = kind
        self.files = files
        self.refs = refs
        self.text_key = text_key
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._spans: dict[int, list[tuple[int, int]]] = {}
        self._readers: dict[int, Any] = {}
        self._ar_json: dict[int, bool] = {}
        self._pq_offsets: dict[int, list[int]] = {}
        self._pq_cache: OrderedDict[tuple[int, int], list[Any]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"kind": self.kind, "files": self.files, "refs": self.refs, "key": self.text_key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.kind, self.files = state["kind"], state["files"]
        self.refs, self.text_key = state["refs"], state["key"]
        self._init_runtime()

    def __len__(self) -> int:
        return len(self.refs)

    def __repr__(self) -> str:
        return f"DocumentSource(kind={self.kind!r}, files={len(self.files)}, docs={len(self)})"

    def __getitem__(self, index: int) -> str:
        ref = self.refs[index % len(self.refs)]
        path = self.files[ref.file]
        if self.kind in ("stdlib", "text"):
            return _read_text(path)
        if self.kind == "jsonl":
            return self._jsonl(ref, path)
        if self.kind == "parquet":
            return self._parquet(ref, path)
        if self.kind == "arrayrecord":
            return self._arrayrecord(ref, path)
        raise ValueError(f"data.source: unknown source {self.kind!r}")

    # -- jsonl ---------------------------------------------------------------------------
    def _jsonl(self, ref: DocRef, path: str) -> str:
        with self._lock:
            spans = self._spans.get(ref.file)
            if spans is None:
                spans = self._spans[ref.file] = _jsonl_line_spans(path)
        start, end = spans[ref.record]
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        line = raw.decode("utf-8", errors="replace").strip()
        if not line:
            return ""
        return _doc_from_obj(json.loads(line), self.text_key, f"{path}:{ref.record + 1}")

    # -- parquet -------------------------------------------------------------------------
    def _parquet(self, ref: DocRef, path: str) -> str:
        import pyarrow.parquet as pq

        with self._lock:
            offsets = self._pq_offsets.get(ref.file)
            if offsets is None:
                md = pq.ParquetFile(path).metadata
                offsets = [0]
                for g in range(md.num_row_groups):
                    offsets.append(offsets[-1] + md.row_group(g).num_rows)
                self._pq_offsets[ref.file] = offsets
            group = bisect.bisect_right(offsets, ref.record) - 1
            key = (ref.file, group)
            rows = self._pq_cache.get(key)
            if rows is not None:
                self._pq_cache.move_to_end(key)
        if rows is None:
            table = pq.ParquetFile(path).read_row_group(group, columns=[self.text_key])
            rows = table.column(self.text_key).to_pylist()
            with self._lock:
                self._pq_cache[key] = rows
                while len(self._pq_cache) > 4:
                    self._pq_cache.popitem(last=False)
        value = rows[ref.record - offsets[group]]
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        return "" if value is None else str(value)

    # -- arrayrecord ---------------------------------------------------------------------
    def _ar_reader(self, file: int) -> tuple[Any, bool]:
        with self._lock:
            reader = self._readers.get(file)
            if reader is None:
                reader = self._readers[file] = _open_arrayrecord(self.files[file])
                self._ar_json[file] = _arrayrecord_is_json(reader, self.text_key)
            return reader, self._ar_json[file]

    def _arrayrecord(self, ref: DocRef, path: str) -> str:
        reader, is_json = self._ar_reader(ref.file)
        raw = reader.read([ref.record])[0]
        if is_json:
            return _doc_from_obj(json.loads(raw), self.text_key, f"{path}[{ref.record}]")
        return raw.decode("utf-8", errors="replace")


def _open_arrayrecord(path: str) -> Any:
    from array_record.python.array_record_module import ArrayRecordReader

    return ArrayRecordReader(path, "readahead_buffer_size:0")


def _arrayrecord_is_json(reader: Any, text_key: str) -> bool:
    """A file is JSON if its first record parses as a JSON object containing ``text_key``."""
    if reader.num_records() == 0:
        return False
    first = reader.read([0])[0]
    if not first.lstrip().startswith(b"{"):
        return False
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and text_key in obj


def _num_records(kind: str, path: str) -> int:
    if kind == "jsonl":
        return len(_jsonl_line_spans(path))
    if kind == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    if kind == "arrayrecord":
        return int(_open_arrayrecord(path).num_records())
    return 1


def build_sources(cfg: DataConfig) -> tuple[DocumentSource, DocumentSource]:
    """Returns ``(train, heldout)`` document sources for ``cfg``.

    Split rule: each file goes to held-out iff ``md5(relative path) / 2**128 <
    heldout_fraction`` (relative to the stdlib directory for ``stdlib``, to the common
    directory of the matched files otherwise); with ``heldout_fraction > 0`` and >= 2 files
    neither side is left empty (see ``_split_keys``). If exactly one file matches (jsonl,
    parquet, arrayrecord), documents are split instead by ``md5("<file>#<index>")``.
    ``max_docs`` caps each split after splitting (first documents in file order).
    """
    validate_data_config(cfg)
    if cfg.source == "mqar":
        raise ValueError(
            "data.source: 'mqar' is generated, not a document source "
            "(use memzoo.data.mqar.MQARSource or make_train_iterator)"
        )
    frac = float(cfg.heldout_fraction)
    if cfg.source == "stdlib":
        root, rels = stdlib_files()
        files = [os.path.join(root, r) for r in rels]
    else:
        files = expand_paths(cfg.paths)
        root = os.path.commonpath([os.path.dirname(f) for f in files])
        rels = [os.path.relpath(f, root).replace(os.sep, "/") for f in files]

    train_refs: list[DocRef] = []
    held_refs: list[DocRef] = []
    if len(files) == 1 and cfg.source != "text" and cfg.source != "stdlib":
        n = _num_records(cfg.source, files[0])
        tr, he = _split_keys([f"{rels[0]}#{i}" for i in range(n)], frac)
        train_refs = [DocRef(0, i) for i in tr]
        held_refs = [DocRef(0, i) for i in he]
    else:
        tr, he = _split_keys(rels, frac)
        for dest, idxs in ((train_refs, tr), (held_refs, he)):
            for fi in idxs:
                if cfg.source in ("stdlib", "text"):
                    dest.append(DocRef(fi, -1))
                else:
                    dest.extend(DocRef(fi, r) for r in range(_num_records(cfg.source, files[fi])))
    if cfg.max_docs:
        train_refs = train_refs[: cfg.max_docs]
        held_refs = held_refs[: cfg.max_docs]
    return (
        DocumentSource(cfg.source, files, train_refs, cfg.text_key),
        DocumentSource(cfg.source, files, held_refs, cfg.text_key),
    )
