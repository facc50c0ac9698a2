"""Tests for norms, SwiGLU and RoPE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memzoo.layers.mlp import SwiGLU
from memzoo.layers.norms import GatedRMSNorm, RMSNorm, l2_normalize
from memzoo.layers.rope import apply_rope, segment_positions


def test_rmsnorm_reference_and_dtype():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 3.0
    norm = RMSNorm(16, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.arange(16, dtype=jnp.float32) / 8.0
    y = norm(x)
    ref = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * (np.arange(16) / 8.0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert y.dtype == jnp.float32
    nb = RMSNorm(16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    yb = nb(x)
    assert yb.dtype == jnp.bfloat16 and nb.scale[...].dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(yb, np.float32),
        x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6),
        rtol=2e-2,
        atol=2e-2,
    )


def test_gated_rmsnorm():
    kx, kg = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, 3, 4, 8))
    gate = jax.random.normal(kg, (2, 3, 4, 8))
    gn = GatedRMSNorm(8, rngs=nnx.Rngs(0))
    y = gn(x, gate)
    ref = RMSNorm(8, rngs=nnx.Rngs(0))(x) * jax.nn.silu(gate)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        gn(x, gate[..., :4])


def test_l2_normalize():
    x = jax.random.normal(jax.random.key(2), (3, 7, 16)).astype(jnp.bfloat16)
    y = l2_normalize(x)
    assert y.dtype == jnp.bfloat16
    norms = np.linalg.norm(np.asarray(y, np.float32), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-2)
    z = l2_normalize(jnp.zeros((4,)))
    assert np.all(np.isfinite(z)) and np.all(z == 0)
    y0 = l2_normalize(jnp.ones((4, 3)), axis=0)
    np.testing.assert_allclose(y0, 0.5, rtol=1e-5)


def test_swiglu():
    m = SwiGLU(32, 64, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 5, 32))
    y = m(x)
    assert y.shape == (2, 5, 32)
    ref = (jax.nn.silu(x @ m.gate.kernel[...]) * (x @ m.up.kernel[...])) @ m.down.kernel[...]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert m.gate.bias is None and m.up.bias is None and m.down.bias is None


def test_rope_theta_zero_is_nope():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 7))  # odd head dim is fine without RoPE
    assert (apply_rope(x, jnp.arange(5), theta=0.0) == x).all()


def test_rope_reference_and_relative():
    b, t, h, d = 2, 6, 3, 8
    x = jax.random.normal(jax.random.key(4), (b, t, h, d))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    y = apply_rope(x, pos)
    # reference: explicit rotation of pairs (i, i + d/2)
    xn = np.asarray(x)
    ref = np.empty_like(xn)
    for p in range(t):
        for i in range(d // 2):
            a = p * 10000.0 ** (-2 * i / d)
            c, s = np.cos(a), np.sin(a)
            x1, x2 = xn[:, p, :, i], xn[:, p, :, i + d // 2]
            ref[:, p, :, i] = x1 * c - x2 * s
            ref[:, p, :, i + d // 2] = x2 * c + x1 * s
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # norm preserved; position 0 is the identity
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(xn, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)
    # dot products depend only on the relative offset
    q = x[:, :1].repeat(t, 1)
    k = x[:, 1:2].repeat(t, 1)
    d1 = jnp.sum(apply_rope(q, pos + 0) * apply_rope(k, pos + 3), -1)
    d2 = jnp.sum(apply_rope(q, pos + 5) * apply_rope(k, pos + 8), -1)
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        apply_rope(x[..., :7], pos)


def test_rope_scale_multiplies_positions():
    x = jax.random.normal(jax.random.key(6), (2, 9, 3, 8))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    # Position Interpolation: scale 1/4 at positions 4p is plain RoPE at positions p
    np.testing.assert_allclose(apply_rope(x, 4 * pos, scale=0.25), apply_rope(x, pos), atol=1e-6)
    assert not np.allclose(apply_rope(x, pos, scale=0.5), apply_rope(x, pos), atol=1e-3)


def test_segment_positions():
    seg = jnp.array([[0, 0, 0, 1, 1, 2], [5, 5, 3, 3, 5, 5]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 0, 1]])
