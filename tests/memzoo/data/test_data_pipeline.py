"""Sources, tokenizers from files, iterator state, determinism and the held-out split."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from memzoo.data import (
    DataConfig,
    build_sources,
    build_tokenizer,
    count_bytes,
    heldout_batches,
    make_train_iterator,
    pack_documents,
)
from memzoo.data.sources import stable_fraction, stdlib_files

KEYS = ("inputs", "targets", "segment_ids", "loss_mask")
DOCS = [f"document number {i}: héllo {'x' * (i % 7)} 日本 end" for i in range(24)]


def _assert_batch(batch: dict, batch_size: int, seq_len: int) -> None:
    assert set(batch) == set(KEYS)
    for k in KEYS:
        assert batch[k].shape == (batch_size, seq_len), k
    assert batch["inputs"].dtype == np.int32
    assert batch["targets"].dtype == np.int32
    assert batch["segment_ids"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32


def _same(a: dict, b: dict) -> bool:
    return all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in KEYS)


def _docs_from_rows(rows: list[dict], tok) -> list[str]:
    """Rebuilds the document stream from consecutive rows (stride seq_len, overlap 1)."""
    stream = list(rows[0]["inputs"]) + [rows[0]["targets"][-1]]
    for r in rows[1:]:
        stream += list(r["targets"])
    docs, cur = [], None
    for t in stream:
        if t == tok.bos_id:
            cur = []
        elif t == tok.eos_id and cur is not None:
            docs.append(tok.decode(cur))
            cur = None
        elif cur is not None:
            cur.append(int(t))
    return docs


def _source_texts(src) -> list[str]:
    return [src[i] for i in range(len(src))]


def _write_all_formats(tmp_path, docs: list[str]) -> dict[str, str]:
    """Writes docs as text / jsonl / parquet / arrayrecord (3 files each); returns globs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    chunks = [docs[0::3], docs[1::3], docs[2::3]]
    for d in ("text", "jsonl", "parquet", "ar", "arjson"):
        (tmp_path / d).mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "text" / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    for c, chunk in enumerate(chunks):
        with open(tmp_path / "jsonl" / f"part{c}.jsonl", "w", encoding="utf-8") as f:
            for j, doc in enumerate(chunk):
                f.write(json.dumps({"id": j, "body": doc}) + "\n")
            f.write("\n")  # blank lines are skipped
        pq.write_table(
            pa.table({"body": chunk, "n": list(range(len(chunk)))}),
            str(tmp_path / "parquet" / f"part{c}.parquet"),
            row_group_size=3,
        )
        w = ArrayRecordWriter(str(tmp_path / "ar" / f"part{c}.array_record"), "group_size:1")
        for doc in chunk:
            w.write(doc.encode("utf-8"))
        w.close()
        w = ArrayRecordWriter(str(tmp_path / "arjson" / f"part{c}.array_record"), "group_size:1")
        for doc in chunk:
            w.write(json.dumps({"body": doc}).encode("utf-8"))
        w.close()
    return {
        "text": str(tmp_path / "text" / "*.txt"),
        "jsonl": str(tmp_path / "jsonl" / "*.jsonl"),
        "parquet": str(tmp_path / "parquet" / "*.parquet"),
        "arrayrecord": str(tmp_path / "ar" / "*.array_record"),
        "arrayrecord_json": str(tmp_path / "arjson" / "*.array_record"),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    return _write_all_formats(tmp_path_factory.mktemp("corpus"), DOCS)


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet", "arrayrecord", "arrayrecord_json"])
def test_file_sources(corpus, fmt: str) -> None:
    source = "arrayrecord" if fmt.startswith("arrayrecord") else fmt
    cfg = DataConfig(source=source, paths=corpus[fmt], text_key="body", heldout_fraction=0.34)
    train, held = build_sources(cfg)
    assert len(train) > 0 and len(held) > 0
    train_t, held_t = _source_texts(train), _source_texts(held)
    assert sorted(train_t + held_t) == sorted(DOCS)
    assert not set(train_t) & set(held_t)
    # split is by file: a file's documents all land on one side
    assert not {r.file for r in train.refs} & {r.file for r in held.refs}

    tok = build_tokenizer(cfg)
    it = make_train_iterator(cfg, tok, batch_size=2, seq_len=32, seed=3)
    rows = []
    for _ in range(30):
        b = next(it)
        _assert_batch(b, 2, 32)
        rows += [{k: b[k][i] for k in KEYS} for i in range(2)]
    seen = _docs_from_rows(rows, tok)
    assert set(seen) == set(train_t)  # > one epoch of tiny docs: every train doc appears

    hb = heldout_batches(cfg, tok, batch_size=2, seq_len=32, max_batches=100)
    assert hb
    for b in hb:
        _assert_batch(b, 2, 32)
    held_rows = [{k: b[k][i] for k in KEYS} for b in hb for i in range(2)]
    held_rows = [r for r in held_rows if r["segment_ids"].any()]
    assert _docs_from_rows(held_rows, tok) == held_t  # file order, no shuffle, complete


def test_single_file_splits_by_document(tmp_path) -> None:
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    cfg = DataConfig(source="jsonl", paths=str(path), heldout_fraction=0.3)
    train, held = build_sources(cfg)
    assert len(train) > 0 and len(held) > 0
    assert sorted(_source_texts(train) + _source_texts(held)) == sorted(DOCS)
    again = build_sources(cfg)
    assert [r.record for r in again[1].refs] == [r.record for r in held.refs]


def test_max_docs(corpus) -> None:
    cfg = DataConfig(source="jsonl", paths=corpus["jsonl"], text_key="body", max_docs=3)
    train, held = build_sources(cfg)
    assert len(train) == 3 and len(held) <= 3


def test_epochs_reshuffled_deterministically(tmp_path) -> None:
    path = tmp_path / "docs.jsonl"
    docs = [f"d{i:02d}" for i in range(20)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(source="jsonl", paths=str(path), heldout_fraction=0.0)
    tok = build_tokenizer(cfg)
    it = make_train_iterator(cfg, tok, batch_size=1, seq_len=10, seed=5)
    rows = [
        {k: v[0] for k, v in next(it).items()} for _ in range(30)
    ]  # ~2.5 epochs of 5-token docs
    seen = _docs_from_rows(rows, tok)
    e1, e2 = seen[:20], seen[20:40]
    assert sorted(e1) == docs and sorted(e2) == docs
    assert e1 != e2 and e1 != docs


def test_hf_tokenizer(tmp_path, corpus) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["[UNK]", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(DOCS * 3, trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))

    cfg = DataConfig(
        source="jsonl", paths=corpus["jsonl"], text_key="body", tokenizer="hf",
        tokenizer_path=str(path),
    )  # fmt: skip
    tok = build_tokenizer(cfg)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.vocab_size == hf.get_vocab_size()
    text = "héllo 日本 document"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text

    it = make_train_iterator(cfg, tok, batch_size=2, seq_len=16, seed=0)
    b = next(it)
    _assert_batch(b, 2, 16)
    assert b["inputs"].max() < tok.vocab_size
    assert count_bytes(b, tok) > 0
    # ByteLevel BPE: byte counts are exact, also for tokens holding partial UTF-8 sequences.
    for text in (DOCS[5], "ÿ日本語🎉 ok"):
        rows = pack_documents([tok.encode(text)], seq_len=200, bos_id=1, eos_id=2, pad_id=3)
        batch = {k: np.stack([r[k] for r in rows]) for k in KEYS}
        assert count_bytes(batch, tok) == len(text.encode("utf-8"))

    # A WordLevel tokenizer without specials: bos/eos/pad get ids after the vocabulary.
    wl = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.train_from_iterator(["a b c", "b c d"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    wl.save(str(tmp_path / "wl.json"))
    tok2 = build_tokenizer(DataConfig(tokenizer="hf", tokenizer_path=str(tmp_path / "wl.json")))
    base = wl.get_vocab_size()
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id, tok2.vocab_size) == (
        base,
        base + 1,
        base + 2,
        base + 3,
    )
    assert tok2.decode([tok2.bos_id, *tok2.encode("a d"), tok2.eos_id]) == "a d"


def test_sentencepiece_tokenizer(tmp_path, corpus) -> None:
    import sentencepiece as spm

    txt = tmp_path / "sp_train.txt"
    txt.write_text("\n".join(DOCS * 5), encoding="utf-8")
    start = time.time()
    spm.SentencePieceTrainer.train(
        input=str(txt),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    if time.time() - start > 5:
        pytest.skip("sentencepiece training took > 5 s")
    path = str(tmp_path / "sp.model")
    cfg = DataConfig(
        source="text", paths=corpus["text"], tokenizer="sentencepiece", tokenizer_path=path
    )
    tok = build_tokenizer(cfg)
    sp = spm.SentencePieceProcessor(model_file=path)
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    assert sp.pad_id() == -1 and tok.pad_id == sp.get_piece_size()  # fallback id
    assert tok.vocab_size == sp.get_piece_size() + 1
    text = "héllo 日本 document Ω"  # Ω is unseen: byte fallback
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text

    it = make_train_iterator(cfg, tok, batch_size=2, seq_len=16, seed=0)
    b = next(it)
    _assert_batch(b, 2, 16)
    row = {
        "targets": np.asarray([ids]),
        "loss_mask": np.ones((1, len(ids)), np.float32),
    }
    # "▁" of the dummy prefix counts one byte.
    assert count_bytes(row, tok) == len(text.encode("utf-8")) + 1
    assert count_bytes(b, tok) > 0


@pytest.mark.parametrize("source", ["stdlib", "jsonl"])
def test_state_round_trip_exact(corpus, source: str) -> None:
    if source == "stdlib":
        cfg = DataConfig(max_docs=40)
    else:
        cfg = DataConfig(source="jsonl", paths=corpus["jsonl"], text_key="body")
    tok = build_tokenizer(cfg)
    kw = dict(batch_size=3, seq_len=48, seed=11)
    it = make_train_iterator(cfg, tok, **kw)
    for _ in range(7):  # jsonl: crosses epoch boundaries
        next(it)
    state = it.get_state()
    dumped = json.dumps(state)
    later = [next(it) for _ in range(9)]

    it2 = make_train_iterator(cfg, tok, **kw)
    it2.set_state(json.loads(dumped))
    for expected in later:
        assert _same(expected, next(it2))
    assert json.dumps(it.get_state()) == json.dumps(it2.get_state())

    it3 = make_train_iterator(cfg, tok, **{**kw, "seed": 12})
    with pytest.raises(ValueError, match="seed"):
        it3.set_state(state)


def test_determinism_by_seed() -> None:
    cfg = DataConfig(max_docs=60)
    tok = build_tokenizer(cfg)

    def take(seed: int, n: int = 4) -> list[dict]:
        it = make_train_iterator(cfg, tok, batch_size=2, seq_len=64, seed=seed)
        return [next(it) for _ in range(n)]

    a, b, c = take(0), take(0), take(1)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not all(_same(x, y) for x, y in zip(a, c))
    first = a[0]
    # every row starts with BOS (fresh epoch), segments start at 1
    assert (first["inputs"][0, 0] == tok.bos_id) and first["segment_ids"][0, 0] == 1


def test_stdlib_split_disjoint_and_stable() -> None:
    cfg = DataConfig(heldout_fraction=0.1)
    train, held = build_sources(cfg)
    root, rels = stdlib_files()
    assert rels == sorted(rels) and rels
    assert not any("site-packages" in r or "dist-packages" in r for r in rels)
    assert len(train) + len(held) == len(rels)
    tr_files = {train.files[r.file] for r in train.refs}
    he_files = {held.files[r.file] for r in held.refs}
    assert not tr_files & he_files
    for f in he_files:
        assert stable_fraction(os.path.relpath(f, root).replace(os.sep, "/")) < 0.1
    for f in tr_files:
        assert stable_fraction(os.path.relpath(f, root).replace(os.sep, "/")) >= 0.1
    train2, held2 = build_sources(cfg)
    assert held2.refs == held.refs and train2.refs == train.refs

    tok = build_tokenizer(cfg)
    h1 = heldout_batches(cfg, tok, batch_size=4, seq_len=128, max_batches=3)
    h2 = heldout_batches(cfg, tok, batch_size=4, seq_len=128, max_batches=3)
    assert len(h1) == 3 and all(_same(x, y) for x, y in zip(h1, h2))
    assert count_bytes(h1[0], tok) > 0


def test_stdlib_throughput() -> None:
    cfg = DataConfig()
    tok = build_tokenizer(cfg)
    it = make_train_iterator(cfg, tok, batch_size=8, seq_len=256, seed=0)
    next(it)
    n, start = 100, time.perf_counter()
    for _ in range(n):
        b = next(it)
    rate = n * 8 * 256 / (time.perf_counter() - start)
    _assert_batch(b, 8, 256)
    assert rate > 100_000, rate


@pytest.mark.slow
def test_state_round_trip_with_workers() -> None:
    cfg = DataConfig(max_docs=50, num_workers=2)
    tok = build_tokenizer(cfg)
    kw = dict(batch_size=2, seq_len=64, seed=1)
    it = make_train_iterator(cfg, tok, **kw)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    later = [next(it) for _ in range(4)]
    it.close()
    it2 = make_train_iterator(cfg, tok, **kw)
    it2.set_state(state)
    try:
        for expected in later:
            assert _same(expected, next(it2))
    finally:
        it2.close()
