"""Data configuration and validation."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

SOURCES = ("stdlib", "text", "jsonl", "parquet", "arrayrecord", "mqar")
FILE_SOURCES = ("text", "jsonl", "parquet", "arrayrecord")
TOKENIZERS = ("byte", "hf", "sentencepiece")


@dataclass
class DataConfig:
    """Configuration of the data pipeline (the ``data:`` section of the global config).

    Attributes:
      source: ``"stdlib"`` (the running interpreter's standard library ``.py`` files),
        ``"text"`` (each file one document), ``"jsonl"`` (one JSON object per line),
        ``"parquet"`` (column ``text_key``) or ``"arrayrecord"`` (each record one UTF-8
        document, or a JSON object holding ``text_key``), or ``"mqar"`` (generated
        multi-query associative recall rows, ``memzoo.data.mqar``; ``paths``, ``tokenizer``,
        ``heldout_fraction``, ``max_docs``, ``shuffle`` and ``num_workers`` are ignored and
        the tokenizer is the MQAR id tokenizer).
      paths: comma-separated glob(s) for the file sources (``**`` is recursive).
      text_key: field holding the document text for jsonl / parquet / arrayrecord(json).
      tokenizer: ``"byte"``, ``"hf"`` (``tokenizers`` JSON file) or ``"sentencepiece"``.
      tokenizer_path: path of ``tokenizer.json`` (hf) or ``.model`` (sentencepiece).
      heldout_fraction: fraction of files held out (by a stable hash of the relative path).
      max_docs: 0 = all documents; otherwise a cap on documents per split.
      shuffle: shuffle documents (per epoch, deterministically from the seed).
      num_workers: grain worker processes (0 = in-process).
      mqar_vocab_size: MQAR: regular ids (even; keys the lower half, values the upper);
        the tokenizer adds 4 specials (filler, BOS, EOS, PAD).
      mqar_num_pairs: MQAR: key-value pairs per sequence.
      mqar_passes: MQAR: queries per key (each key is queried this many times).
      mqar_gap_power: MQAR: query slot ``j`` (two tokens each, counted from the end of the
        pairs) is drawn with probability ``~ (j + 1) ** (gap_power - 1)`` (Zoology: 0.01).
      passkey_fraction: fraction of training rows replaced by passkey rows (NIAH-style
        documents: a 7-digit number hidden in filler text, then asked for; see
        ``memzoo.data.passkey``); 0 = off. Held-out batches are never mixed.
      recall_fraction: fraction of training rows replaced by key-value recall drills in the
        needles' wording (``k is: v.`` pairs, then queries of them); 0 = off. With
        ``passkey_fraction`` it must leave some text rows (sum < 1).
    """

    source: str = "stdlib"
    paths: str = ""
    text_key: str = "text"
    tokenizer: str = "byte"
    tokenizer_path: str = ""
    heldout_fraction: float = 0.05
    max_docs: int = 0
    shuffle: bool = True
    num_workers: int = 0
    mqar_vocab_size: int = 512
    mqar_num_pairs: int = 4
    mqar_passes: int = 1
    mqar_gap_power: float = 0.01
    passkey_fraction: float = 0.0
    recall_fraction: float = 0.0


def split_globs(paths: str) -> list[str]:
    """Splits the comma-separated ``paths`` string into non-empty, stripped globs."""
    return [p.strip() for p in paths.split(",") if p.strip()]


def expand_paths(paths: str) -> list[str]:
    """Expands comma-separated globs into a sorted, de-duplicated list of absolute files.

    Raises:
      ValueError: if a glob matches no file.
    """
    files: set[str] = set()
    for pattern in split_globs(paths):
        matched = [
            os.path.abspath(p)
            for p in glob.glob(os.path.expanduser(pattern), recursive=True)
            if os.path.isfile(p)
        ]
        if not matched:
            raise ValueError(f"data.paths: glob {pattern!r} matched no files")
        files.update(matched)
    return sorted(files)


def validate_data_config(cfg: DataConfig) -> None:
    """Checks ``cfg`` and raises ``ValueError("data.<key>: ...")`` on the first problem.

    Checked: known source and tokenizer, ``paths`` present for file sources and every glob
    matching at least one file, ``tokenizer_path`` present and existing for hf /
    sentencepiece, ``heldout_fraction`` in [0, 1), ``max_docs >= 0``, ``num_workers >= 0``,
    ``text_key`` non-empty for keyed sources, and that a held-out split is possible (a
    ``text`` source with a single file is a single document and cannot be split). For
    ``mqar`` only the ``mqar_*`` keys are checked (the sequence length against the number
    of pairs and passes is checked when the iterator is built).
    """
    if cfg.source not in SOURCES:
        raise ValueError(
            f"data.source: unknown source {cfg.source!r} (expected one of {', '.join(SOURCES)})"
        )
    if cfg.source == "mqar":
        from memzoo.data.mqar import MQARSpec

        n, p = cfg.mqar_num_pairs, cfg.mqar_passes
        seq_len = 2 * n * (1 + p) if isinstance(n, int) and isinstance(p, int) else 0
        MQARSpec(cfg.mqar_vocab_size, seq_len, n, p, cfg.mqar_gap_power).check()
        return
    if cfg.tokenizer not in TOKENIZERS:
        raise ValueError(
            f"data.tokenizer: unknown tokenizer {cfg.tokenizer!r} "
            f"(expected one of {', '.join(TOKENIZERS)})"
        )
    if cfg.tokenizer != "byte":
        if not cfg.tokenizer_path:
            raise ValueError(f"data.tokenizer_path: required for tokenizer {cfg.tokenizer!r}")
        if not os.path.isfile(os.path.expanduser(cfg.tokenizer_path)):
            raise ValueError(f"data.tokenizer_path: file {cfg.tokenizer_path!r} does not exist")
    hf = cfg.heldout_fraction
    if not isinstance(hf, int | float) or not (0.0 <= float(hf) < 1.0):
        raise ValueError(f"data.heldout_fraction: must be in [0, 1), got {hf!r}")
    if not isinstance(cfg.max_docs, int) or cfg.max_docs < 0:
        raise ValueError(f"data.max_docs: must be an integer >= 0, got {cfg.max_docs!r}")
    if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
        raise ValueError(f"data.num_workers: must be an integer >= 0, got {cfg.num_workers!r}")
    pf = cfg.passkey_fraction
    if not isinstance(pf, int | float) or not (0.0 <= float(pf) < 1.0):
        raise ValueError(f"data.passkey_fraction: must be in [0, 1), got {pf!r}")
    rf = cfg.recall_fraction
    if not isinstance(rf, int | float) or not (0.0 <= float(rf) < 1.0):
        raise ValueError(f"data.recall_fraction: must be in [0, 1), got {rf!r}")
    if pf + rf >= 1.0:
        raise ValueError(
            f"data.passkey_fraction + data.recall_fraction must be < 1 (some text rows), "
            f"got {pf} + {rf}"
        )
    if cfg.source in FILE_SOURCES:
        if not split_globs(cfg.paths):
            raise ValueError(f"data.paths: required for source {cfg.source!r}")
        files = expand_paths(cfg.paths)
        if cfg.source == "text" and len(files) == 1 and hf > 0:
            raise ValueError(
                "data.heldout_fraction: source 'text' with a single file is one document and "
                "cannot be split; add files or set heldout_fraction to 0"
            )
    if cfg.source in ("jsonl", "parquet", "arrayrecord") and not cfg.text_key:
        raise ValueError(f"data.text_key: required for source {cfg.source!r}")
