"""Gated Associative Memory (SPEC section 3 "GAM", extension E6: no recurrent state).

"Gated Associative Memory: A Parallel O(N) Architecture for Efficient Sequence Modeling"
(2025). The GAM mixer replaces attention with two parallel paths and a learned gate:

    local_t  = sum_{i=0}^{K-1} w_i * x_{t-K+1+i}          causal depthwise conv, K = 3
    global_t = softmax(x_t B^T / s) B                      B in R^{N x d}: a learned bank of
                                                           N = 512 slots, keys = values,
                                                           s = 1 (paper) or sqrt(d) (scaled)
    [g_l, g_g] = x_t W_g + b_g                             one linear map d -> 2d
    y_t = W_o (sigmoid(g_l) * local_t + sigmoid(g_g) * global_t)

What the "global" path is, plainly: a static key-value memory (like a softmax-routed FFN or a
product-key memory without the product keys). Its output at token t depends only on x_t and
the learned bank B, never on other tokens, so it mixes NO information across the sequence;
all token mixing in GAM comes from the kernel-3 causal convolution (and from stacking layers:
the receptive field grows by 2 tokens per layer). The zoo carries GAM as the conv + static
memory baseline, faithful to the paper.

No recurrent state: the decoding cache is the conv tail only (the last K-1 inputs);
prefill + decode equals the full forward. With ``segment_ids`` the conv never crosses a
document boundary. The model around it is a pre-LN block with a GELU FFN
(``model.mlp_type=gelu``, ``model.norm_type=layer``) and optional absolute position embeddings
(``model.abs_pos_emb``), set by ``configs/models/gam.yaml``.

choice: the bank is initialised N(0, 1/d) so that x B^T has unit scale for RMS-normalised x
[unverified against the paper's code]; the gate and output projections have biases (PyTorch
``nn.Linear`` defaults), the conv has a bias (``nn.Conv1d`` default).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.layers.conv import ShortConv
from memzoo.layers.partitioning import dense, param
from memzoo.memories.base import Array, Memory, register_memory


def associative_read(x: Array, bank: Array, *, scaled: bool = False) -> Array:
    """Static key-value read ``softmax(x B^T / s) B`` per token (keys = values = ``bank``).

    x [..., d]; bank [N, d]; s = sqrt(d) if ``scaled`` else 1. Computed in fp32, returns
    x's dtype. Token-wise: no information flows between positions."""
    x32, b32 = x.astype(jnp.float32), bank.astype(jnp.float32)
    scores = jnp.einsum("...d,nd->...n", x32, b32)
    if scaled:
        scores = scores / math.sqrt(x.shape[-1])
    return jnp.einsum("...n,nd->...d", jax.nn.softmax(scores, axis=-1), b32).astype(x.dtype)


class GatedAssociativeMemory(Memory):
    """The GAM mixer (module docstring). A complete mixer: ``MemoryLayer`` delegates to it."""

    owns_layer = True  # takes x directly; no q/k/v projections around it
    has_state = False  # no recurrent state: the contract's state checks do not apply

    def __init__(
        self,
        *,
        d_model: int,
        num_slots: int = 512,
        local_kernel: int = 3,
        scaled: bool = False,
        init_std: float = 0.02,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **_unused: Any,
    ):
        self.d_model, self.num_slots, self.scaled = d_model, num_slots, scaled
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(init_std)
        self.conv = ShortConv(d_model, local_kernel, use_bias=True, axis="embed", **kw)
        bank = jax.random.normal(rngs.params(), (num_slots, d_model)) / math.sqrt(d_model)
        self.bank = param(bank.astype(param_dtype), "slots", "embed")
        self.gate = nnx.Linear(
            d_model, 2 * d_model, use_bias=True, kernel_init=init, **kw, **dense("embed", "mlp")
        )
        self.o_proj = nnx.Linear(
            d_model, d_model, use_bias=True, kernel_init=init, **kw, **dense("mlp", "embed")
        )

    def init_cache(self, batch_size: int, max_len: int = 0, dtype: Any = jnp.float32) -> dict:
        return {"conv": self.conv.init_cache(batch_size, dtype)}

    def __call__(
        self, x: Array, *, segment_ids: Array | None = None, cache: dict | None = None
    ) -> tuple[Array, dict | None]:
        x = x.astype(self.dtype)
        local, conv_cache = self.conv(
            x, segment_ids=segment_ids, cache=None if cache is None else cache["conv"]
        )
        glob = associative_read(x, self.bank[...].astype(self.dtype), scaled=self.scaled)
        g_l, g_g = jnp.split(self.gate(x).astype(jnp.float32), 2, axis=-1)
        fused = jax.nn.sigmoid(g_l) * local.astype(jnp.float32) + jax.nn.sigmoid(g_g) * glob
        y = self.o_proj(fused.astype(self.dtype))
        return y, None if cache is None else {"conv": conv_cache}

    # The q/k/v memory interface does not apply (no state, no projections around it).
    def features(self, x, q, k, v):
        raise NotImplementedError("gam is a complete mixer; call it on x")

    def parallel(self, q, k, v, gates, *, initial_state=None, segment_ids=None):
        raise NotImplementedError("gam is a complete mixer; call it on x")

    def step(self, q, k, v, gates, state):
        raise NotImplementedError("gam is a complete mixer; call it on x")

    def init_state(self, batch_size: int) -> None:
        return None


register_memory("gam", lambda **kw: GatedAssociativeMemory(**kw))
