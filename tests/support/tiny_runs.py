"""Shared settings for tests that train: a tiny model on a few stdlib documents."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "train" / "quickstart.yaml"

# Small data and bookkeeping for a run of a few steps on 2 CPU cores.
TINY_DATA = [
    "seq_len=32",
    "batch_size=4",
    "data.max_docs=40",
    "train.eval_batches=1",
    "train.progress=false",
]

# A tiny 1:1 memory/attention hybrid.
TINY_HYBRID = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.pattern=MA",
    "model.num_heads=2",
    "model.attn_heads=2",
    "model.chunk_size=16",
]
