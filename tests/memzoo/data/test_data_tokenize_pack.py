"""Byte tokenizer, packing layout, count_bytes and config validation."""

from __future__ import annotations

import numpy as np
import pytest

from memzoo.data import (
    ByteTokenizer,
    DataConfig,
    build_tokenizer,
    count_bytes,
    pack_documents,
    validate_data_config,
)

B, E, P = 10, 11, 12


def test_byte_tokenizer_round_trip_non_ascii() -> None:
    tok = build_tokenizer(DataConfig(tokenizer="byte"))
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    text = "héllo wörld — 日本語 🎉\n\ttab"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([256, *ids, 257, 258, 258]) == text  # specials skipped
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == text
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # truncated UTF-8 -> replacement char
    assert list(tok.encode_array(text)) == ids


def test_pack_two_docs_exact() -> None:
    rows = pack_documents([[1, 2], [3]], seq_len=4, bos_id=B, eos_id=E, pad_id=P)
    # stream: B 1 2 E B 3 E ; rows of 5 tokens with stride 4, last one padded
    assert len(rows) == 2
    r0, r1 = rows
    np.testing.assert_array_equal(r0["inputs"], [B, 1, 2, E])
    np.testing.assert_array_equal(r0["targets"], [1, 2, E, B])
    np.testing.assert_array_equal(r0["segment_ids"], [1, 1, 1, 1])
    np.testing.assert_array_equal(r0["loss_mask"], [1, 1, 1, 0])
    np.testing.assert_array_equal(r1["inputs"], [B, 3, E, P])
    np.testing.assert_array_equal(r1["targets"], [3, E, P, P])
    np.testing.assert_array_equal(r1["segment_ids"], [1, 1, 1, 0])
    np.testing.assert_array_equal(r1["loss_mask"], [1, 1, 0, 0])
    for r in rows:
        assert r["inputs"].dtype == np.int32 and r["segment_ids"].dtype == np.int32
        assert r["loss_mask"].dtype == np.float32


def test_pack_doc_split_across_rows_and_many_docs_in_row() -> None:
    rows = pack_documents([[1, 2, 3, 4, 5]], seq_len=3, bos_id=B, eos_id=E, pad_id=P)
    # stream: B 1 2 3 4 5 E (7 tokens) -> rows [B 1 2 3], [3 4 5 E]; nothing left to predict
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[0]["inputs"], [B, 1, 2])
    np.testing.assert_array_equal(rows[0]["targets"], [1, 2, 3])
    np.testing.assert_array_equal(rows[1]["inputs"], [3, 4, 5])
    np.testing.assert_array_equal(rows[1]["targets"], [4, 5, E])
    for r in rows:
        np.testing.assert_array_equal(r["segment_ids"], [1, 1, 1])
        np.testing.assert_array_equal(r["loss_mask"], [1, 1, 1])

    rows = pack_documents([[7], [], [8, 9]], seq_len=8, bos_id=B, eos_id=E, pad_id=P)
    # stream: B 7 E B E B 8 9 E (9 tokens) -> exactly one full row
    assert len(rows) == 1
    r = rows[0]
    np.testing.assert_array_equal(r["inputs"], [B, 7, E, B, E, B, 8, 9])
    np.testing.assert_array_equal(r["targets"], [7, E, B, E, B, 8, 9, E])
    np.testing.assert_array_equal(r["segment_ids"], [1, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(r["loss_mask"], [1, 1, 0, 1, 0, 1, 1, 1])


def test_pack_every_transition_once() -> None:
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, 10, size=int(n))) for n in rng.integers(0, 30, size=40)]
    rows = pack_documents(docs, seq_len=16, bos_id=B, eos_id=E, pad_id=P)
    pairs = [
        (int(i), int(t))
        for r in rows
        for i, t, m in zip(r["inputs"], r["targets"], r["loss_mask"])
        if m > 0
    ]
    expected = [(a, b) for d in docs for a, b in zip([B, *d], [*d, E])]
    assert pairs == expected


def test_count_bytes_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    texts = ["héllo", "", "日本", "abc def"]
    rows = pack_documents(
        [tok.encode(t) for t in texts], seq_len=5, bos_id=256, eos_id=257, pad_id=258
    )
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    assert count_bytes(batch, tok) == float(sum(len(t.encode()) for t in texts))


def _cfg(**kw: object) -> DataConfig:
    return DataConfig(**kw)  # type: ignore[arg-type]


def test_validation_errors(tmp_path) -> None:
    validate_data_config(DataConfig())
    with pytest.raises(ValueError, match=r"^data\.source: unknown source 'nope'"):
        validate_data_config(_cfg(source="nope"))
    with pytest.raises(ValueError, match=r"^data\.paths: required for source 'jsonl'"):
        validate_data_config(_cfg(source="jsonl"))
    with pytest.raises(ValueError, match=r"^data\.paths: glob .* matched no files"):
        validate_data_config(_cfg(source="text", paths=str(tmp_path / "*.txt")))
    with pytest.raises(ValueError, match=r"^data\.tokenizer: unknown tokenizer"):
        validate_data_config(_cfg(tokenizer="wordpiece"))
    with pytest.raises(ValueError, match=r"^data\.tokenizer_path: required"):
        validate_data_config(_cfg(tokenizer="hf"))
    with pytest.raises(ValueError, match=r"^data\.tokenizer_path: file .* does not exist"):
        validate_data_config(_cfg(tokenizer="sentencepiece", tokenizer_path="/no/such.model"))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"^data\.heldout_fraction: must be in \[0, 1\)"):
            validate_data_config(_cfg(heldout_fraction=bad))
    with pytest.raises(ValueError, match=r"^data\.max_docs"):
        validate_data_config(_cfg(max_docs=-1))
    with pytest.raises(ValueError, match=r"^data\.num_workers"):
        validate_data_config(_cfg(num_workers=-2))
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(ValueError, match=r"^data\.heldout_fraction: source 'text' with a single"):
        validate_data_config(_cfg(source="text", paths=str(tmp_path / "one.txt")))
    validate_data_config(_cfg(source="text", paths=str(tmp_path / "one.txt"), heldout_fraction=0.0))
    with pytest.raises(ValueError, match=r"^data\.paths"):
        build_tokenizer(_cfg(source="parquet", paths=str(tmp_path / "*.parquet")))
