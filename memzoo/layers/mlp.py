"""Feed-forward blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.layers.partitioning import dense

__all__ = ["SwiGLU"]


class SwiGLU(nnx.Module):
    """SwiGLU feed-forward network (Shazeer 2020, "GLU Variants Improve Transformer").

    ``y = W_down (silu(W_gate x) * (W_up x))`` with ``W_gate, W_up: d_model -> hidden_dim`` and
    ``W_down: hidden_dim -> d_model``; no biases.
    """

    def __init__(
        self,
        d_model: int,
        hidden_dim: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.d_model = d_model
        self.hidden_dim = hidden_dim
        self.dtype = dtype
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = nnx.Linear(d_model, hidden_dim, **kw, **dense("embed", "mlp"))
        self.up = nnx.Linear(d_model, hidden_dim, **kw, **dense("embed", "mlp"))
        self.down = nnx.Linear(hidden_dim, d_model, **kw, **dense("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply to ``x`` of shape ``[..., d_model]``."""
        x = x.astype(self.dtype)
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
