"""Shared helpers for the Pallas kernel tests (tests/pallas_kernels/kernels/)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rel(a, b) -> float:
    """Relative error ||a - b|| / max(||b||, tiny), in fp32 (pytrees allowed)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(
        float(jnp.sum((jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)) ** 2))
        for x, y in zip(la, lb)
    )
    den = sum(float(jnp.sum(jnp.asarray(y, jnp.float32) ** 2)) for y in lb)
    return float(np.sqrt(num) / max(np.sqrt(den), 1e-30))


def packed_ids(batch: int, time: int, cuts: tuple[int, ...]) -> jax.Array:
    """segment_ids [B,T] with documents starting at the given cut positions (row b shifts the
    cuts by b so rows differ)."""
    rows = []
    for b in range(batch):
        ids = np.zeros(time, np.int32)
        for c in cuts:
            c = min(time - 1, c + b)
            ids[c:] += 1
        rows.append(ids)
    return jnp.asarray(np.stack(rows))
