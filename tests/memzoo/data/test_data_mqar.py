"""MQAR generator, grain source, training iterator state, tokenizer and config validation."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from memzoo.data import (
    DataConfig,
    build_sources,
    build_tokenizer,
    count_bytes,
    heldout_batches,
    make_train_iterator,
    validate_data_config,
)
from memzoo.data.mqar import (
    EVAL_STREAM,
    HELDOUT_STREAM,
    TRAIN_STREAM,
    MQARSource,
    MQARSpec,
    MQARTokenizer,
    make_sample,
)

KEYS = ("inputs", "targets", "segment_ids", "loss_mask")
SPEC = MQARSpec(vocab_size=512, seq_len=64, num_pairs=4, passes=1)


def _cfg(**kw) -> DataConfig:
    return DataConfig(source="mqar", **kw)


def _same(a: dict, b: dict) -> bool:
    return all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in KEYS)


def test_deterministic_given_seed_stream_and_index():
    a = make_sample(SPEC, 7, TRAIN_STREAM, 3)
    b = make_sample(SPEC, 7, TRAIN_STREAM, 3)
    assert _same(a, b) and np.array_equal(a["distances"], b["distances"])
    others = [
        make_sample(SPEC, 8, TRAIN_STREAM, 3),
        make_sample(SPEC, 7, HELDOUT_STREAM, 3),
        make_sample(SPEC, 7, EVAL_STREAM, 3),
        make_sample(SPEC, 7, TRAIN_STREAM, 4),
    ]
    assert all(not np.array_equal(a["inputs"], o["inputs"]) for o in others)


@pytest.mark.parametrize("passes", [1, 3])
def test_structure(passes):
    spec = MQARSpec(vocab_size=64, seq_len=96, num_pairs=6, passes=passes)
    v, n, half = 64, 6, 32
    fill, bos = v, v + 1
    for i in range(50):
        s = make_sample(spec, 0, TRAIN_STREAM, i)
        x, y, m = s["inputs"], s["targets"], s["loss_mask"]
        assert x.dtype == np.int32 and y.dtype == np.int32 and m.dtype == np.float32
        assert x.shape == y.shape == m.shape == (96,)
        assert np.array_equal(x[1:], y[:-1])  # targets are inputs shifted by one
        assert (s["segment_ids"] == 1).all()
        assert x[0] == bos
        keys, values = x[1 : 2 * n + 1 : 2], x[2 : 2 * n + 2 : 2]
        assert len(set(keys.tolist())) == n
        assert ((keys >= 0) & (keys < half)).all()
        assert ((values >= half) & (values < v)).all()
        kv = dict(zip(keys.tolist(), values.tolist()))
        q = np.flatnonzero(m)
        assert len(q) == n * passes
        assert (q > 2 * n).all()
        # every key queried `passes` times; the target at a query is the key's value
        assert sorted(x[q].tolist()) == sorted(keys.tolist() * passes)
        assert all(y[t] == kv[int(x[t])] for t in q)
        # a query key is followed by its value in the input too
        assert all(x[t + 1] == kv[int(x[t])] for t in q if t + 1 < len(x))
        # everything in the query region off the queries is filler
        region = np.ones(96, bool)
        region[: 2 * n + 1] = False
        region[q] = False
        region[np.minimum(q + 1, 95)] = False
        assert (x[region] == fill).all()
        # distances point back at the key's pair
        d = s["distances"]
        assert (d[m == 0] == -1).all()
        assert all(x[t - d[t]] == x[t] for t in q)


def test_power_law_gaps_vary_and_prefer_short():
    spec = MQARSpec(vocab_size=512, seq_len=256, num_pairs=4, passes=1)
    slots = []
    for i in range(400):
        s = make_sample(spec, 1, TRAIN_STREAM, i)
        q = np.flatnonzero(s["loss_mask"])
        slots += ((q - (2 * 4 + 1)) // 2).tolist()
    slots = np.asarray(slots)
    assert len(np.unique(slots)) > 40  # varied distances
    s_total = spec.num_slots
    near = (slots < s_total // 10).mean()
    far = (slots >= s_total - s_total // 10).mean()
    assert near > 3 * far  # short gaps far more frequent than long ones
    assert far > 0  # but long gaps do occur


def test_grain_source_and_batches():
    src = MQARSource(SPEC, seed=3)
    ds = grain.MapDataset.source(src).batch(4)
    b = ds[2]
    ref = src.batch(8, 4)
    assert set(b) == set(KEYS) and _same(b, ref)
    assert b["inputs"].shape == (4, 64)


def test_train_iterator_resumes_exactly_and_heldout_differs():
    cfg = _cfg()
    tok = build_tokenizer(cfg)
    it = make_train_iterator(cfg, tok, batch_size=4, seq_len=64, seed=5)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    it2 = make_train_iterator(cfg, tok, batch_size=4, seq_len=64, seed=5)
    it2.set_state(state)
    got = [next(it2) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(expected, got))
    for b in got:
        assert set(b) == set(KEYS) and b["inputs"].shape == (4, 64)
        assert (b["loss_mask"].sum(1) == 4).all()
    other = make_train_iterator(cfg, tok, batch_size=4, seq_len=64, seed=6)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)
    held = heldout_batches(cfg, tok, batch_size=4, seq_len=64, max_batches=2)
    assert len(held) == 2 and held[0]["inputs"].shape == (4, 64)
    assert _same(held[0], heldout_batches(cfg, tok, batch_size=4, seq_len=64, max_batches=1)[0])
    first = make_train_iterator(cfg, tok, batch_size=4, seq_len=64, seed=0)
    assert not np.array_equal(next(first)["inputs"], held[0]["inputs"])


def test_tokenizer_and_count_bytes():
    cfg = _cfg(mqar_vocab_size=100, tokenizer="byte")
    tok = build_tokenizer(cfg)
    assert isinstance(tok, MQARTokenizer)
    assert tok.vocab_size == 104
    assert {tok.bos_id, tok.eos_id, tok.pad_id, tok.fill_id} == {100, 101, 102, 103}
    assert tok.encode("3 77 _ 3") == [3, 77, tok.fill_id, 3]
    assert tok.decode([tok.bos_id, 3, 77, tok.fill_id, 3, tok.pad_id]) == "3 77 _ 3"
    with pytest.raises(ValueError, match="cannot encode"):
        tok.encode("hello")
    batch = heldout_batches(cfg, tok, batch_size=2, seq_len=32, max_batches=1)[0]
    assert count_bytes(batch, tok) == 8.0  # one byte per scored query (2 rows x 4 pairs)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mqar_vocab_size": 7}, "data.mqar_vocab_size"),
        ({"mqar_vocab_size": 8, "mqar_num_pairs": 5}, "data.mqar_num_pairs"),
        ({"mqar_passes": 0}, "data.mqar_passes"),
        ({"mqar_gap_power": 0.0}, "data.mqar_gap_power"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        validate_data_config(_cfg(**kw))


def test_seq_len_too_short_and_no_document_sources():
    cfg = _cfg(mqar_num_pairs=8, mqar_passes=2)
    validate_data_config(cfg)
    tok = build_tokenizer(cfg)
    with pytest.raises(ValueError, match="need seq_len >= 48"):
        make_train_iterator(cfg, tok, batch_size=2, seq_len=40, seed=0)
    with pytest.raises(ValueError, match="generated"):
        build_sources(cfg)
