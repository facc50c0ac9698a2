"""Normalisation layers: RMSNorm, gated RMSNorm and L2 normalisation.

All statistics are computed in float32 regardless of the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.layers.partitioning import param

__all__ = ["RMSNorm", "GatedRMSNorm", "l2_normalize"]


def _rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2, -1) + eps), in float32."""
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return x32 * jax.lax.rsqrt(ms + eps)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """L2-normalise ``x`` along ``axis``: ``x / sqrt(sum(x^2) + eps)``.

    Used on queries and keys of delta-rule memories (Yang et al. 2024, "Parallelizing Linear
    Transformers with the Delta Rule over Sequence Length"; fla's ``l2norm`` convention, where
    ``eps`` is added inside the square root). Computed in float32; returns ``x.dtype``.
    """
    x32 = x.astype(jnp.float32)
    ss = jnp.sum(jnp.square(x32), axis=axis, keepdims=True)
    return (x32 * jax.lax.rsqrt(ss + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization").

    ``y = x / sqrt(mean(x^2) + eps) * scale`` over the last axis, with a learnable ``scale``
    (shape ``[dim]``, initialised to 1). The input is cast to ``dtype``, the statistics are
    computed in float32 and the result is returned in ``dtype``.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        axis: str = "norm",
        rngs: nnx.Rngs,
    ) -> None:
        del rngs  # deterministic init
        self.dim = dim
        self.eps = eps
        self.dtype = dtype
        # ``axis``: the scale's logical axis name (memzoo.layers.partitioning)
        self.scale = param(jnp.ones((dim,), dtype=param_dtype), axis)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise ``x`` of shape ``[..., dim]``."""
        x = x.astype(self.dtype)
        y = _rms_normalize(x, self.eps) * self.scale[...].astype(jnp.float32)
        return y.astype(self.dtype)


class GatedRMSNorm(nnx.Module):
    """RMSNorm followed by a SiLU output gate (fla ``FusedRMSNormGated`` convention).

    ``y = x / sqrt(mean(x^2) + eps) * scale * silu(gate)``, the norm taken over the last axis
    (for memory layers: the per-head value dim). ``x`` and ``gate`` have the same shape
    ``[..., dim]``. Used as the output norm of gated linear-attention / delta-rule layers
    (e.g. Yang et al. 2024, "Gated Delta Networks"; Sun et al. 2023, RetNet).
    Computed in float32; returns ``dtype``.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        del rngs
        self.dim = dim
        self.eps = eps
        self.dtype = dtype
        self.scale = param(jnp.ones((dim,), dtype=param_dtype), "head_dim")

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        """Return ``RMSNorm(x) * silu(gate)``; both inputs ``[..., dim]``."""
        if x.shape != gate.shape:
            raise ValueError(f"x and gate must have the same shape, got {x.shape} and {gate.shape}")
        x = x.astype(self.dtype)
        g = gate.astype(self.dtype).astype(jnp.float32)
        y = _rms_normalize(x, self.eps) * self.scale[...].astype(jnp.float32)
        return (y * jax.nn.silu(g)).astype(self.dtype)
