"""MQAR eval task: grid, scoring with an oracle and a random model, table, plot, end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

from memzoo.config import ModelConfig
from memzoo.data import DataConfig
from memzoo.evals import mqar
from memzoo.models.lm import build_model

PNG = b"\x89PNG\r\n\x1a\n"
V = 64  # regular ids; the model vocabulary is V + 4


def _cfg(vocab: int = V) -> SimpleNamespace:
    return SimpleNamespace(
        data=DataConfig(source="mqar", mqar_vocab_size=vocab),
        model=SimpleNamespace(vocab_size=vocab + 4),
    )


class Oracle:
    """Predicts, at every key, the token that followed its first occurrence (the value)."""

    def __init__(self, vocab: int = V) -> None:
        self.cfg = _cfg(vocab)
        self.vocab = vocab
        self.calls = 0

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        self.calls += 1
        b, t = tokens.shape
        out = np.zeros((b, t, self.vocab + 4), np.float32)
        for i in range(b):
            seen: dict[int, int] = {}
            for j in range(t):
                k = int(tokens[i, j])
                if k < self.vocab // 2:
                    if k in seen:
                        out[i, j, seen[k]] = 1.0
                    elif j + 1 < t:
                        seen[k] = int(tokens[i, j + 1])
        return out


def test_cells_skip_infeasible_and_reject_bad_settings():
    s = mqar.Settings(seq_lens="16,64", num_pairs="2,4,8")
    assert mqar.cells(s) == [
        {"seq_len": 16, "num_pairs": 2},
        {"seq_len": 16, "num_pairs": 4},
        {"seq_len": 64, "num_pairs": 2},
        {"seq_len": 64, "num_pairs": 4},
        {"seq_len": 64, "num_pairs": 8},
    ]
    json.dumps(mqar.cells(mqar.Settings()))
    with pytest.raises(ValueError, match="no cell fits"):
        mqar.cells(mqar.Settings(seq_lens="8", num_pairs="4"))
    with pytest.raises(ValueError, match="seq_lens"):
        mqar.cells(mqar.Settings(seq_lens="a,b"))


def test_oracle_scores_one_and_table_renders(tmp_path):
    s = mqar.Settings(seq_lens="32,64", num_pairs="4,8", samples=10, batch_size=4, passes=2)
    ctx = Oracle()
    results = [{**c, **mqar.run_cell(ctx, s, c)} for c in mqar.cells(s)]
    assert ctx.calls == 3 * len(results)  # batches of 4, 4, 2
    for r in results:
        assert r["accuracy"] == 1.0
        assert r["queries"] == 10 * r["num_pairs"] * 2 == r["correct"]
        assert r["vocab_size"] == V and r["chance"] == pytest.approx(2 / V)
        assert r["mean_distance"] > 0
    json.dumps(results)
    table = mqar.table(s, results)
    lines = table.splitlines()
    assert lines[0] == "| pairs \\ seq_len | 32 | 64 |"
    assert lines[2] == "| 4 | 100.0 | 100.0 |"
    assert lines[3] == "| 8 | - | 100.0 |"  # 32 tokens cannot hold 8 pairs x 2 passes
    (png,) = mqar.plots(s, results, tmp_path)
    assert png.read_bytes()[:8] == PNG


def test_vocab_resolution_errors():
    s = mqar.Settings(seq_lens="32", num_pairs="4", samples=2)
    ctx = Oracle()
    ctx.cfg.data.source = "stdlib"
    with pytest.raises(ValueError, match="not trained on data.source=mqar"):
        mqar.run_cell(ctx, s, {"seq_len": 32, "num_pairs": 4})
    s.vocab_size = 128
    with pytest.raises(ValueError, match="needs 132 ids"):
        mqar.run_cell(ctx, s, {"seq_len": 32, "num_pairs": 4})
    s.vocab_size = V
    assert mqar.run_cell(ctx, s, {"seq_len": 32, "num_pairs": 4})["accuracy"] == 1.0


def test_random_model_is_near_chance():
    mcfg = ModelConfig(vocab_size=V + 4, d_model=32, n_layers=1, pattern="A", attn_heads=2)
    model = build_model(mcfg, seed=0)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)[0])
    ctx = SimpleNamespace(
        cfg=SimpleNamespace(data=DataConfig(source="mqar", mqar_vocab_size=V), model=mcfg),
        model=model,
        logits=lambda x: np.asarray(fwd(state, x)),
    )
    s = mqar.Settings(samples=32, batch_size=32)
    r = mqar.run_cell(ctx, s, {"seq_len": 64, "num_pairs": 4})
    assert r["queries"] == 128
    assert r["accuracy"] <= 0.15  # chance is 2/64 over values, lower over the full vocab


def test_end_to_end_on_tiny_mqar_run(tmp_path):
    from memzoo.config import load_config
    from memzoo.evals.runner import run_eval
    from memzoo.train.loop import train

    cfg = load_config(
        "configs/train/mqar_tiny.yaml",
        [
            f"output_dir={tmp_path}",
            "steps=2",
            "optim.warmup_steps=1",
            "model.d_model=32",
            "data.mqar_vocab_size=64",
            "train.eval_batches=1",
            "train.async_checkpoint=false",
        ],
    )
    train(cfg)
    run_dir = tmp_path / "mqar_tiny"
    res = run_eval("mqar", run_dir, ["seq_lens=32,64", "num_pairs=4", "samples=8"], progress=False)
    out = run_dir / "evals" / "mqar"
    rec = json.loads((out / "results.json").read_text())
    assert rec["task"] == "mqar" and rec["step"] == 2
    assert [(c["seq_len"], c["num_pairs"]) for c in rec["cells"]] == [(32, 4), (64, 4)]
    assert all(0.0 <= c["accuracy"] <= 1.0 and c["queries"] == 32 for c in rec["cells"])
    assert (out / "table.md").read_text().startswith("| pairs \\ seq_len | 32 | 64 |")
    assert res["plots"] and (out / "accuracy.png").read_bytes()[:8] == PNG
