"""experiments/grad_norms.py: per-parameter and per-sublayer gradient norms of a checkpoint
(the probe behind the titans_mac_stability reading)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from experiment_scripts import load_script
from flax import nnx
from tiny_runs import REPO

from memzoo.config import load_config
from memzoo.data.pipeline import make_train_iterator
from memzoo.data.tokenizer import build_tokenizer
from memzoo.models.lm import build_model
from memzoo.train.step import make_loss_grad

gn = load_script("grad_norms")


def test_group_of_splits_blocks_by_sublayer_and_a_mixer_by_part():
    assert gn.group_of("blocks/0/mixer/mem/memory/theta_W1") == "blocks/0/mixer/mem"
    assert gn.group_of("blocks/0/mixer/h_norm/scale") == "blocks/0/mixer/h_norm"
    assert gn.group_of("blocks/3/mixer/q_proj") == "blocks/3/mixer"  # a plain mixer's leaf
    assert gn.group_of("blocks/1/mlp/up/kernel") == "blocks/1/mlp"
    assert gn.group_of("blocks/1/norm1/scale") == "blocks/1/norm1"
    assert gn.group_of("embed/embedding") == "embed"


def tiny_mac(n_layers: int, batch_size: int):
    """A d_model-32 Titans MAC LM (seed 0) and the first batch of its 64-token MQAR stream."""
    cfg = load_config(
        REPO / "configs" / "train" / "mqar_tiny.yaml",
        ["model=titans_mac", f"model.n_layers={n_layers}", "model.d_model=32", "seq_len=64"],
    )
    cfg.model.vocab_size = build_tokenizer(cfg.data).vocab_size
    model = build_model(cfg.model, seed=0)
    data = make_train_iterator(cfg.data, None, batch_size=batch_size, seq_len=64, seed=0)
    return model, {k: jnp.asarray(v) for k, v in next(data).items()}


def test_norms_of_a_titans_mac_gradient_add_up_to_the_global_norm():
    model, batch = tiny_mac(n_layers=2, batch_size=4)
    graphdef, state = nnx.split(model)
    loss, grads = make_loss_grad(graphdef)(state, batch)
    norms = gn.param_norms(grads)
    assert len(norms) == len(nnx.state(model, nnx.Param).flat_state())
    assert "embed/embedding" in norms and "blocks/0/mixer/mem/in_proj/kernel" in norms
    assert not any(k.endswith("value") for k in norms)
    groups = gn.group_norms(norms)
    assert {"embed", "blocks/0/mixer/mem", "blocks/0/mixer/attn", "blocks/1/mlp"} <= set(groups)
    total = float(optax.global_norm(grads))
    assert total > 0 and math.isfinite(float(loss))
    assert math.isclose(math.sqrt(sum(v * v for v in groups.values())), total, rel_tol=1e-5)
    assert math.isclose(math.sqrt(sum(v * v for v in norms.values())), total, rel_tol=1e-5)


def test_span_gradients_add_up_to_the_whole_batch_gradient():
    """--spans: the spans' masks partition the batch's, so the count-weighted span gradients
    sum to the gradient of the whole batch's mean loss."""
    model, batch = tiny_mac(n_layers=1, batch_size=2)
    parts = gn.span_batches(batch, 24)  # an uneven split: 24, 24, 16
    assert [(a, b) for a, b, _ in parts] == [(0, 24), (24, 48), (48, 64)]
    masks = [p["loss_mask"] for _, _, p in parts]
    assert bool((sum(m.astype(jnp.int32) for m in masks) == batch["loss_mask"]).all())
    assert sum(float(m.sum()) > 0 for m in masks) >= 2  # the sum below mixes spans
    graphdef, state = nnx.split(model)
    grad = make_loss_grad(graphdef)
    _, whole = grad(state, batch)
    total = float(batch["loss_mask"].sum())
    summed = None
    for m, (_, _, part) in zip(masks, parts):
        n = float(m.sum())
        if n == 0:
            continue
        _, g = grad(state, part)
        g = jax.tree.map(lambda x, w=n / total: w * x, g)
        summed = g if summed is None else jax.tree.map(jnp.add, summed, g)
    diff = float(optax.global_norm(jax.tree.map(jnp.subtract, summed, whole)))
    assert diff <= 1e-5 * float(optax.global_norm(whole))
