"""Gated Associative Memory: the global path is token-wise (a static key-value read), the
mixer equals its equations, the GAM preset (LayerNorm, GELU FFN, absolute positions) decodes
exactly (prefill + decode == full forward) and keeps packed documents separate, and a tiny
model trains with falling loss."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tiny_runs import TINY_DATA

from memzoo.config import load_config
from memzoo.memories import build_memory
from memzoo.memories.gam import GatedAssociativeMemory, associative_read
from memzoo.models.lm import GeluMLP, build_model
from memzoo.train.loop import train

V = 61


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_associative_read_is_tokenwise_softmax_over_the_bank():
    kx, kb = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 7, 8))
    bank = jax.random.normal(kb, (5, 8))
    y = associative_read(x, bank)
    xn, bn = np.asarray(x, np.float64), np.asarray(bank, np.float64)
    s = xn @ bn.T
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(y), p @ bn, rtol=1e-5, atol=1e-6)
    s2 = s / np.sqrt(8)
    p2 = np.exp(s2 - s2.max(-1, keepdims=True))
    p2 /= p2.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(associative_read(x, bank, scaled=True)), p2 @ bn, rtol=1e-5, atol=1e-6
    )
    # no information flows between tokens: changing token 3 changes only output 3
    y2 = associative_read(x.at[:, 3].set(0.5), bank)
    changed = np.any(np.abs(np.asarray(y2 - y)) > 0, axis=-1)
    assert changed[:, 3].all() and changed.sum() == 2


def test_mixer_equals_its_equations_and_is_stateless():
    gam = build_memory("gam", d_model=8, num_slots=6, rngs=nnx.Rngs(1))
    assert isinstance(gam, GatedAssociativeMemory)
    assert gam.owns_layer and not gam.has_state
    assert gam.bank.shape == (6, 8) and gam.conv.kernel_size == 3
    x = jax.random.normal(jax.random.key(2), (1, 5, 8))
    y, cache = gam(x)
    assert cache is None
    xn = np.asarray(x[0], np.float64)
    w = np.asarray(gam.conv.weight[...], np.float64)  # [3, d], w[2] weighs the current token
    pad = np.concatenate([np.zeros((2, 8)), xn])
    local = sum(w[i] * pad[i : i + 5] for i in range(3)) + np.asarray(gam.conv.bias[...])
    glob = np.asarray(associative_read(x, gam.bank[...])[0], np.float64)
    g = xn @ np.asarray(gam.gate.kernel[...]) + np.asarray(gam.gate.bias[...])
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    fused = sig(g[:, :8]) * local + sig(g[:, 8:]) * glob
    ref = fused @ np.asarray(gam.o_proj.kernel[...]) + np.asarray(gam.o_proj.bias[...])
    np.testing.assert_allclose(np.asarray(y[0]), ref, rtol=1e-4, atol=1e-6)
    assert set(gam.init_cache(3)) == {"conv"}


def tiny(*overrides):
    base = ["model=gam", f"model.vocab_size={V}", "model.d_model=32", "model.n_layers=2"]
    return load_config(None, [*base, "model.gam_num_slots=16", *overrides]).model


def test_preset_is_pre_ln_gelu_with_positions():
    cfg = tiny()
    assert (cfg.memory, cfg.mlp_type, cfg.norm_type, cfg.abs_pos_emb) == (
        "gam",
        "gelu",
        "layer",
        True,
    )
    model = build_model(cfg, seed=0)
    assert isinstance(model.blocks[0].mlp, GeluMLP)
    assert isinstance(model.blocks[0].norm1, nnx.LayerNorm)
    assert model.pos_embed.embedding.shape == (cfg.max_seq_len, 32)


def test_prefill_decode_equals_full_forward_and_documents_stay_separate():
    model = build_model(tiny(), seed=1)
    gd, st = nnx.split(model)
    full = jax.jit(lambda st, t, s: nnx.merge(gd, st)(t, segment_ids=s)[0])
    run = jax.jit(lambda st, t, c: nnx.merge(gd, st)(t, cache=c))
    toks = jax.random.randint(jax.random.key(0), (2, 17), 0, V)
    ref = nnx.merge(gd, st)(toks)[0]
    logits, cache = run(st, toks[:, :6], model.init_cache(2, 17))
    outs = [logits]
    for t in range(6, 17):
        logits, cache = run(st, toks[:, t : t + 1], cache)
        outs.append(logits)
    assert rel(jnp.concatenate(outs, 1), ref) < 1e-4
    assert int(cache[-1]["pos"]) == 17
    # packed: the second document (positions restart, conv does not reach back) equals itself
    # alone, computed as the prefix of a single-document sequence of the same shape
    seg = jnp.asarray([[1] * 6 + [2] * 11] * 2, jnp.int32)
    one = jnp.ones((2, 17), jnp.int32)
    packed = full(st, toks, seg)
    alone = full(st, jnp.concatenate([toks[:, 6:], toks[:, :6]], 1), one)[:, :11]
    assert rel(packed[:, 6:], alone) < 1e-4
    assert rel(packed[:, :6], full(st, toks, one)[:, :6]) < 1e-5


def test_tiny_gam_trains(tmp_path):
    cfg = load_config(
        None,
        [
            "model=gam",
            "model.d_model=32",
            "model.n_layers=2",
            "model.gam_num_slots=32",
            *TINY_DATA,
            "optim.warmup_steps=2",
            "steps=10",
            f"output_dir={tmp_path}",
        ],
    )
    summary = train(cfg)
    losses = summary["losses"]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert np.isfinite(summary["heldout_loss"])
