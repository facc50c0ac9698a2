"""The blocked triangular inverse shared by the delta-rule op and its kernels."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kernels._delta_math import mm
from pallas_kernels.ops._common import unit_lower_inverse


def _gram(c: int, repeat: bool, seed: int = 0) -> np.ndarray:
    """Strictly lower part of eta * K K^T with unit keys (the delta rule's A)."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(2 if repeat else c, 16))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    if repeat:  # two distinct keys alternating: the case the whole-chunk doubling fails
        k = k[np.arange(c) % 2]
    return np.tril(0.99 * k @ k.T, -1)


@pytest.mark.parametrize("c, block", [(64, 8), (20, 8), (5, 8), (16, 4), (1, 8)])
@pytest.mark.parametrize("repeat", [False, True])
def test_matches_the_fp64_inverse(c, block, repeat):
    a = _gram(c, repeat)
    ref = np.linalg.inv(np.eye(c) + a)
    got = np.asarray(
        jax.jit(unit_lower_inverse, static_argnums=1)(jnp.asarray(a, jnp.float32), block)
    )
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_batched_and_with_a_kernel_matmul():
    a = np.stack([_gram(32, r, s) for r, s in [(False, 1), (True, 2), (False, 3)]])
    ref = np.linalg.inv(np.eye(32) + a)
    batched = np.asarray(unit_lower_inverse(jnp.asarray(a, jnp.float32)))
    two_d = np.stack(
        [
            np.asarray(unit_lower_inverse(jnp.asarray(x, jnp.float32), 8, functools.partial(mm)))
            for x in a
        ]
    )
    for got in (batched, two_d):
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_block_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="block must be a power of two, got 6"):
        unit_lower_inverse(jnp.zeros((8, 8)), 6)
