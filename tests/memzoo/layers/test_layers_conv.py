"""Tests for the causal short convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.layers.conv import ShortConv

_full = nnx.jit(lambda m, x: m(x))
_packed = nnx.jit(lambda m, x, seg: m(x, segment_ids=seg))
_cached = nnx.jit(lambda m, x, c: m(x, cache=c))


def _ref_conv(x, w):
    """Naive causal depthwise conv: y[t] = sum_i w[i] x[t-(K-1)+i]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    k = w.shape[0]
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        for i in range(k):
            s = t - (k - 1) + i
            if s >= 0:
                y[:, t] += w[i] * x[:, s]
    return y


@pytest.mark.parametrize("t", [1, 2, 7, 13])
@pytest.mark.parametrize("kernel_size", [1, 3, 4])
def test_full_matches_reference(t, kernel_size):
    conv = ShortConv(6, kernel_size, rngs=nnx.Rngs(0))
    assert conv.weight[...].shape == (kernel_size, 6)
    x = jax.random.normal(jax.random.key(t), (2, t, 6))
    y, c = conv(x)
    assert c is None and y.shape == x.shape
    np.testing.assert_allclose(y, _ref_conv(x, conv.weight[...]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t0", [1, 2, 5])
def test_cache_prefill_then_decode(t0):
    t = 11
    conv = ShortConv(8, 4, use_bias=True, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (3, t, 8))
    y_full, _ = _full(conv, x)
    cache = conv.init_cache(3)
    assert cache["conv"].shape == (3, 3, 8)
    ys = []
    y, cache = _cached(conv, x[:, :t0], cache)
    ys.append(y)
    for i in range(t0, t):
        y, cache = _cached(conv, x[:, i : i + 1], cache)
        ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, 1), y_full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache["conv"], x[:, -3:], rtol=0, atol=0)


def test_cache_jit_chunks():
    conv = ShortConv(4, 4, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(5), (1, 9, 4))
    y_full, _ = conv(x)
    step = nnx.jit(lambda m, xx, c: m(xx, cache=c))
    cache = conv.init_cache(1)
    outs = []
    for a, b in [(0, 2), (2, 7), (7, 9)]:
        y, cache = step(conv, x[:, a:b], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, rtol=1e-5, atol=1e-6)


def test_segment_reset_equals_separate_documents():
    conv = ShortConv(5, 4, use_bias=True, rngs=nnx.Rngs(3))
    lens = [3, 1, 6, 2]  # odd lengths, one shorter than the kernel
    ids = [7, 2, 7, 4]  # a repeated id that is not contiguous is a new document
    x = jax.random.normal(jax.random.key(9), (1, sum(lens), 5))
    seg = jnp.concatenate([jnp.full((n,), i) for n, i in zip(lens, ids)])[None]
    y_packed, _ = _packed(conv, x, seg)
    outs, s = [], 0
    for n in lens:
        y, _ = _full(conv, x[:, s : s + n])
        outs.append(y)
        s += n
    np.testing.assert_allclose(y_packed, jnp.concatenate(outs, 1), rtol=1e-5, atol=1e-6)
    # without segment ids the documents do mix
    y_mixed, _ = _full(conv, x)
    assert not np.allclose(y_mixed, y_packed)


def test_segment_with_cache_raises_and_dtype():
    conv = ShortConv(4, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 3, 4))
    with pytest.raises(ValueError):
        conv(x, segment_ids=jnp.zeros((1, 3), jnp.int32), cache=conv.init_cache(1))
    y, c = conv(x, cache=conv.init_cache(1, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and c["conv"].dtype == jnp.bfloat16
    assert conv.weight[...].dtype == jnp.float32
