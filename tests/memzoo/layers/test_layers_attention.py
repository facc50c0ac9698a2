"""Tests for causal softmax attention with RoPE, GQA, sliding window and KV cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.layers.attention import Attention
from memzoo.layers.rope import apply_rope

D = 32

# jitted entry points (compiling whole calls is much faster than eager op-by-op on CPU)
_full = nnx.jit(lambda m, x: m(x))
_packed = nnx.jit(lambda m, x, seg: m(x, segment_ids=seg))
_cached = nnx.jit(lambda m, x, c: m(x, cache=c))


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _naive(attn: Attention, x, positions, allowed):
    """Per-head loop reference; allowed[b, t, s] bool."""
    b, t, _ = x.shape
    h, hk, dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).reshape(b, t, h, dh)
    k = attn.k_proj(x).reshape(b, t, hk, dh)
    v = np.asarray(attn.v_proj(x).reshape(b, t, hk, dh), np.float64)
    if attn.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = np.asarray(apply_rope(q, positions, theta=attn.rope_theta), np.float64)
    k = np.asarray(apply_rope(k, positions, theta=attn.rope_theta), np.float64)
    out = np.zeros((b, t, h, dh))
    for hh in range(h):
        kv = hh // (h // hk)
        s = np.einsum("btd,bsd->bts", q[:, :, hh], k[:, :, kv]) / math.sqrt(dh)
        s = np.where(allowed, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, hh] = np.einsum("bts,bsd->btd", p, v[:, :, kv])
    return np.asarray(attn.o_proj(jnp.asarray(out.reshape(b, t, h * dh), jnp.float32)))


CONFIGS = {
    "mha": dict(num_heads=4),
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "mqa_window": dict(num_heads=4, num_kv_heads=1, window=3),
    "gqa_window_qknorm": dict(num_heads=4, num_kv_heads=2, window=5, qk_norm=True, use_bias=True),
    "nope": dict(num_heads=4, rope_theta=0.0),
}


@pytest.mark.parametrize("theta, invariant", [(0.0, True), (10000.0, False)])
def test_nope_last_query_ignores_key_order(theta, invariant):
    """Without positions, the last token's output is the same for any order of the tokens
    before it; with RoPE it is not."""
    attn = Attention(D, num_heads=4, rope_theta=theta, rngs=nnx.Rngs(5))
    x = jax.random.normal(jax.random.key(6), (1, 8, D))
    perm = jnp.array([3, 0, 6, 1, 5, 2, 4, 7])
    y, _ = _full(attn, x)
    yp, _ = _full(attn, x[:, perm])
    err = _rel_err(yp[:, -1], y[:, -1])
    assert (err < 1e-5) if invariant else (err > 1e-3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_matches_naive(name):
    attn = Attention(D, **CONFIGS[name], rngs=nnx.Rngs(0))
    b, t = 2, 9
    x = jax.random.normal(jax.random.key(1), (b, t, D))
    y, c = _full(attn, x)
    assert c is None and y.shape == (b, t, D)
    i = np.arange(t)
    allowed = i[None, :] <= i[:, None]
    if attn.window:
        allowed &= i[None, :] > i[:, None] - attn.window
    ref = _naive(attn, x, jnp.broadcast_to(jnp.arange(t), (b, t)), allowed[None])
    assert _rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("t0", [1, 4])
def test_prefill_then_decode_matches_full(name, t0):
    attn = Attention(D, **CONFIGS[name], rngs=nnx.Rngs(2))
    b, t, max_len = 2, 10, 12
    x = jax.random.normal(jax.random.key(3), (b, t, D))
    y_full, _ = _full(attn, x)
    cache = attn.init_cache(b, max_len)
    ys = []
    y, cache = _cached(attn, x[:, :t0], cache)
    ys.append(y)
    for i in range(t0, t):
        y, cache = _cached(attn, x[:, i : i + 1], cache)
        ys.append(y)
    assert int(cache["pos"]) == t
    assert _rel_err(jnp.concatenate(ys, 1), y_full) < 1e-5


def test_jit_decode_with_traced_pos():
    attn = Attention(D, 4, 2, window=4, rngs=nnx.Rngs(4))
    b, t, max_len = 1, 8, 8
    x = jax.random.normal(jax.random.key(5), (b, t, D))
    y_full, _ = _full(attn, x)

    traces = []

    @nnx.jit
    def step(m, xx, c):
        traces.append(1)
        return m(xx, cache=c)

    cache = attn.init_cache(b, max_len)
    y0, cache = step(attn, x[:, :3], cache)
    ys = [y0]
    for i in range(3, t):
        y, cache = step(attn, x[:, i : i + 1], cache)
        ys.append(y)
    # one trace for the prefill shape, one for the decode shape: pos is traced, not static
    assert len(traces) == 2
    assert _rel_err(jnp.concatenate(ys, 1), y_full) < 1e-5


def test_packed_segments_equal_separate_documents():
    attn = Attention(D, 4, 2, window=4, rngs=nnx.Rngs(6))
    lens = [3, 5, 1, 6]
    ids = [1, 2, 1, 0]
    t = sum(lens)
    x = jax.random.normal(jax.random.key(7), (2, t, D))
    seg1 = jnp.concatenate([jnp.full((n,), i) for n, i in zip(lens, ids)])
    seg = jnp.stack([seg1, jnp.zeros((t,), jnp.int32)])  # row 1: a single document
    y_packed, _ = _packed(attn, x, seg)
    outs, s = [], 0
    for n in lens:
        y, _ = _full(attn, x[:1, s : s + n])
        outs.append(y)
        s += n
    assert _rel_err(y_packed[:1], jnp.concatenate(outs, 1)) < 1e-5
    y_single, _ = _full(attn, x[1:])
    assert _rel_err(y_packed[1:], y_single) < 1e-5


def test_bad_configs_raise():
    with pytest.raises(ValueError, match=r"num_heads \(6\).*num_kv_heads \(4\)"):
        Attention(D, 6, 4, head_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model"):
        Attention(30, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="even"):
        Attention(D, 4, head_dim=7, rngs=nnx.Rngs(0))
    attn = Attention(D, 4, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 3, D))
    with pytest.raises(ValueError, match="segment_ids"):
        attn(x, segment_ids=jnp.zeros((1, 3), jnp.int32), cache=attn.init_cache(1, 4))
    with pytest.raises(ValueError, match="overflow"):
        attn(x, cache=attn.init_cache(1, 2))


def test_head_dim_override_and_bf16():
    attn = Attention(D, 2, 1, head_dim=24, dtype=jnp.bfloat16, rngs=nnx.Rngs(8))
    x = jax.random.normal(jax.random.key(9), (2, 5, D))
    y, _ = _full(attn, x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, D)
    cache = attn.init_cache(2, 8, jnp.bfloat16)
    assert cache["k"].shape == (2, 8, 1, 24)
    y2, cache = _cached(attn, x, cache)
    assert cache["k"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(y2, np.float32)))
    assert _rel_err(np.asarray(y2, np.float32), np.asarray(y, np.float32)) < 2e-2
