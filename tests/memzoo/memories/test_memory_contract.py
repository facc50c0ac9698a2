"""One contract for every registered memory, run through the layer around it.

A new memory registers itself and joins these checks: the decode path (one ``step`` per token)
equals the parallel path; a sequence split in two with the cache carried equals the whole;
packed documents equal each document alone; bf16 runs and gradients are finite.

Compiling a layer dominates the cost (an ATLAS layer takes seconds per shape on a CPU), so each
memory's tests share one jitted function and the same few shapes: the whole sequence is
``T`` tokens, split at ``SPLIT`` (mid-chunk), and a memory's tests are kept on one xdist worker.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiers import core_first

from memzoo.layers.memory_layer import MemoryLayer
from memzoo.memories import memory_names
from memzoo.memories.gradient import PRESETS

D, H, B = 32, 2, 2
CHUNK, T, SPLIT = 8, 24, 11


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def make_layer(name, dtype=jnp.float32, **kw):
    return MemoryLayer(
        name,
        d_model=D,
        num_heads=H,
        chunk_size=CHUNK,
        layer_idx=1,
        n_layers=2,
        hgrn_lower_bound=0.3,
        dtype=dtype,
        rngs=nnx.Rngs(0),
        **kw,
    )


@functools.cache
def contract(name):
    """(layer, run): ``run(x, seg=None, cache=None)`` is one jitted function per memory, so a
    shape compiled by one test is reused by the others."""
    layer = make_layer(name)
    gd, st = nnx.split(layer)

    @jax.jit
    def run(st, x, seg, cache):
        return nnx.merge(gd, st)(x, segment_ids=seg, cache=cache)

    return layer, lambda x, seg=None, cache=None: run(st, x, seg, cache)


# decode == parallel runs on every memory in the default tier; the other checks run on the
# core gradient presets there and on all of them in the full tier (tests/support/tiers.py)
EVERY = core_first(memory_names(), (), group="contract")
TIERED = core_first(memory_names(), PRESETS, group="contract")


def inputs(n, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, n, D), jnp.float32)


@pytest.mark.parametrize("name", EVERY)
def test_decode_steps_equal_parallel(name):
    lyr, run = contract(name)
    x = inputs(T)
    full, _ = run(x)
    cache = lyr.init_cache(B)
    outs = []
    for t in range(T):
        y, cache = run(x[:, t : t + 1], cache=cache)
        outs.append(y)
    assert rel(jnp.concatenate(outs, 1), full) < 1e-4, name


@pytest.mark.parametrize("name", TIERED)
def test_split_with_carried_cache_equals_whole(name):
    lyr, run = contract(name)
    x = inputs(T, seed=1)
    full, _ = run(x)
    y1, cache = run(x[:, :SPLIT], cache=lyr.init_cache(B))
    y2, cache = run(x[:, SPLIT:], cache=cache)
    assert rel(jnp.concatenate([y1, y2], 1), full) < 1e-4, name
    if not getattr(lyr.memory, "has_state", True):
        return  # stateless mixer (GAM): the cache is a conv tail only, no state to compare
    # the carried state is the same as after one pass over the whole sequence
    _, whole = run(x, cache=lyr.init_cache(B))
    for got, want in zip(
        jax.tree.leaves(cache["state"]), jax.tree.leaves(whole["state"]), strict=True
    ):
        if jnp.issubdtype(want.dtype, jnp.integer):  # e.g. the position in the current chunk
            np.testing.assert_array_equal(got, want)
        else:
            assert rel(got, want) < 1e-4, name


@pytest.mark.parametrize("name", TIERED)
def test_packed_documents_equal_each_alone(name):
    lyr, run = contract(name)
    # gradient memories chunk on one grid per row: documents must start on it
    n = 2 * CHUNK if getattr(lyr.memory, "chunk_grid", False) else SPLIT
    a, b = inputs(n, seed=2), inputs(T - n, seed=3)
    seg = jnp.concatenate([jnp.full((B, n), 1), jnp.full((B, T - n), 2)], 1).astype(jnp.int32)
    packed, _ = run(jnp.concatenate([a, b], 1), seg)
    # each document alone, from a fresh cache: the shapes the split test compiled
    ya, _ = run(a, cache=lyr.init_cache(B))
    yb, _ = run(b, cache=lyr.init_cache(B))
    assert rel(packed, jnp.concatenate([ya, yb], 1)) < 1e-4, name


@pytest.mark.parametrize("name", TIERED)
def test_bf16_forward_and_grads_finite(name):
    lyr = make_layer(name, dtype=jnp.bfloat16)
    gd, st = nnx.split(lyr)
    x = inputs(T, seed=4)

    def loss(st):
        y, _ = nnx.merge(gd, st)(x)
        return jnp.mean(jnp.square(y.astype(jnp.float32))), y

    (val, ybf), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(st)
    assert np.isfinite(float(val))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), name
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0, name
    y32, _ = contract(name)[1](x)
    assert ybf.dtype == jnp.bfloat16
    assert rel(ybf.astype(jnp.float32), y32) < 5e-2, name


def test_unknown_memory_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown memory 'gated_deltanett'.*gated_deltanet"):
        make_layer("gated_deltanett")
