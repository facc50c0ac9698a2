"""Recall drills and the passkey/recall/text mix (memzoo.data.passkey)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from memzoo.data import ByteTokenizer, DataConfig, make_train_iterator
from memzoo.data.config import validate_data_config
from memzoo.data.passkey import passkey_row, recall_row

TOK = ByteTokenizer()
RECORD = re.compile(r"([a-z]+-[a-z]+) is: (\d{7})\. ")


@pytest.mark.parametrize("seq_len", [256, 777])
def test_recall_row_queries_repeat_their_pairs(seq_len):
    row = recall_row(TOK, seq_len, 0, 3)
    assert row["inputs"].shape == (seq_len,)
    np.testing.assert_array_equal(row["inputs"][1:], row["targets"][:-1])
    text = TOK.decode(row["inputs"])
    pairs_text, queries_text = text.split("\n")
    pairs = RECORD.findall(pairs_text)
    assert 2 <= len(pairs) <= max(2, seq_len // 64)
    assert len({k for k, _ in pairs}) == len(pairs)
    table = dict(pairs)
    queries = RECORD.findall(queries_text)
    assert len(queries) > len(pairs)
    assert queries[: len(pairs)] == pairs  # first a verbatim repeat, then lookups
    assert all(table[k] == v for k, v in queries)
    # one document: every token before the last is trained on, padding is not
    doc_len = int((row["segment_ids"] > 0).sum())
    assert doc_len > seq_len - 30
    assert row["loss_mask"][: doc_len - 1].all() and not row["loss_mask"][doc_len:].any()


def test_recall_row_is_a_function_of_seed_and_index():
    a, b = recall_row(TOK, 256, 1, 7), recall_row(TOK, 256, 1, 7)
    assert (a["inputs"] == b["inputs"]).all()
    assert not (a["inputs"] == recall_row(TOK, 256, 1, 8)["inputs"]).all()
    assert not (a["inputs"] == recall_row(TOK, 256, 2, 7)["inputs"]).all()


def test_recall_row_too_short_is_a_clear_error():
    with pytest.raises(ValueError, match="data.recall_fraction: seq_len 40 is too short"):
        recall_row(TOK, 40, 0, 0)


def _mixed_rows_resume_exactly(cfg: DataConfig, batch_size: int, before: int) -> list[str]:
    """Decoded rows of ``before`` + 2 batches; asserts that the 2 after a saved state come
    again, identical, from a new iterator restored to it."""
    it = make_train_iterator(cfg, TOK, batch_size=batch_size, seq_len=256, seed=0)
    first = [next(it) for _ in range(before)]
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    again = make_train_iterator(cfg, TOK, batch_size=batch_size, seq_len=256, seed=0)
    again.set_state(state)
    for b in rest:
        assert (next(again)["inputs"] == b["inputs"]).all()
    return [TOK.decode(r) for b in first + rest for r in b["inputs"]]


def test_passkey_rows_mix_and_resume():
    row = passkey_row(TOK, 256, 0, 3)
    text = TOK.decode(row["inputs"])
    assert "One of the secret numbers for " in text and "The secret number for" in text
    assert row["inputs"].shape == (256,) and row["loss_mask"].sum() > 100
    rows = _mixed_rows_resume_exactly(DataConfig(max_docs=20, passkey_fraction=0.5), 4, 2)
    n_pass = sum("secret numbers for" in r for r in rows)
    assert 2 <= n_pass <= 14


def test_mix_has_all_three_kinds_and_resumes_exactly():
    cfg = DataConfig(max_docs=20, passkey_fraction=0.25, recall_fraction=0.5)
    rows = _mixed_rows_resume_exactly(cfg, 8, 3)
    n_pass = sum("secret numbers for" in r for r in rows)
    n_recall = sum(bool(RECORD.match(r)) for r in rows)
    assert 3 <= n_pass <= 18 and 10 <= n_recall <= 30 and n_pass + n_recall < len(rows)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(recall_fraction=1.0), "data.recall_fraction: must be in"),
        (dict(recall_fraction=-0.1), "data.recall_fraction: must be in"),
        (dict(passkey_fraction=0.5, recall_fraction=0.5), "must be < 1"),
    ],
)
def test_bad_fractions_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        validate_data_config(DataConfig(**kw))
