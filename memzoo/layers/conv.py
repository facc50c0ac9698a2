"""Short causal depthwise convolution (the ``ShortConv`` of fla / Mamba-style layers)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.layers.partitioning import param
from memzoo.layers.rope import segment_positions

__all__ = ["ShortConv"]


class ShortConv(nnx.Module):
    """Causal depthwise 1-D convolution over time, without activation.

    ``y[t, c] = sum_{i=0}^{K-1} w[i, c] * x[t - (K-1) + i, c] (+ b[c])``, i.e. ``w[K-1]`` weighs
    the current token and ``w[0]`` the token ``K-1`` steps back; inputs before the start of the
    sequence (or of the document, with ``segment_ids``) count as zeros. This is the short
    convolution used before the memory in H3 / Mamba / GLA / DeltaNet layers (e.g. Yang et al.
    2024, "Parallelizing Linear Transformers with the Delta Rule"). The caller applies SiLU.

    Weights ``[K, channels]`` are initialised U(-1/sqrt(K), 1/sqrt(K)) (PyTorch's Conv1d default
    for a depthwise kernel).

    Cache: ``{"conv": [B, K-1, channels]}`` holding the last ``K-1`` inputs (oldest first),
    zeros initially (see :meth:`init_cache`).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 4,
        *,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        axis: str = "heads",
        rngs: nnx.Rngs,
    ) -> None:
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.use_bias = use_bias
        self.dtype = dtype
        bound = 1.0 / math.sqrt(kernel_size)
        # ``axis``: the channels' logical axis name (memzoo.layers.partitioning)
        self.weight = param(
            jax.random.uniform(
                rngs.params(), (kernel_size, channels), param_dtype, minval=-bound, maxval=bound
            ),
            "conv",
            axis,
        )
        self.bias = (
            param(jax.random.uniform(rngs.params(), (channels,), param_dtype, -bound, bound), axis)
            if use_bias
            else None
        )

    def init_cache(self, batch_size: int, dtype: jnp.dtype = jnp.float32) -> dict[str, jax.Array]:
        """Empty cache: ``{"conv": zeros[batch_size, kernel_size - 1, channels]}``."""
        return {"conv": jnp.zeros((batch_size, self.kernel_size - 1, self.channels), dtype)}

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        cache: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """Convolve ``x`` ``[B, T, channels]``.

        Args:
          x: inputs ``[B, T, channels]``, any ``T >= 1``.
          segment_ids: optional ``[B, T]`` document ids of a packed sequence; a token only
            sees earlier tokens of its own document (a document starts where the id changes
            from the previous token). Not supported together with ``cache``.
          cache: optional ``{"conv": [B, K-1, channels]}``; ``x`` continues the sequence whose
            last ``K-1`` inputs the cache holds.

        Returns:
          ``(y [B, T, channels] in dtype, new_cache)``; ``new_cache`` is ``None`` without cache.
        """
        if segment_ids is not None and cache is not None:
            raise ValueError("ShortConv: segment_ids are not supported together with a cache")
        k = self.kernel_size
        b, t, c = x.shape
        if c != self.channels:
            raise ValueError(f"ShortConv expected {self.channels} channels, got {c}")
        x = x.astype(self.dtype)
        if cache is not None:
            prev = cache["conv"].astype(self.dtype)
        else:
            prev = jnp.zeros((b, k - 1, c), self.dtype)
        xp = jnp.concatenate([prev, x], axis=1)  # [B, K-1+T, C]
        xp32 = xp.astype(jnp.float32)  # accumulate in fp32
        w = self.weight[...].astype(self.dtype).astype(jnp.float32)
        pos = segment_positions(segment_ids) if segment_ids is not None else None

        y = jnp.zeros((b, t, c), jnp.float32)
        for i in range(k):
            shift = k - 1 - i  # how many steps back this tap looks
            term = xp32[:, i : i + t, :] * w[i]
            if pos is not None and shift > 0:
                term = jnp.where((pos >= shift)[..., None], term, jnp.zeros_like(term))
            y = y + term
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype).astype(jnp.float32)
        y = y.astype(self.dtype)

        new_cache = None
        if cache is not None:
            new_cache = {"conv": xp[:, xp.shape[1] - (k - 1) :, :].astype(cache["conv"].dtype)}
        return y, new_cache
