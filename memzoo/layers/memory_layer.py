"""The layer around a memory (SPEC section 3, fla/MaxText convention).

    q, k, v = x W_q, x W_k, x W_v
    q, k, v = SiLU(ShortConv_4(q, k, v))            (causal depthwise; never crosses documents)
    q, k, v, gates = memory.features(x, q, k, v)     (gates; L2 norm of q, k for delta rules)
    o = memory(q, k, v, gates)                       (parallel op, or one step when decoding)
    y = W_o GatedRMSNorm(o, x W_g)                   (norm over each head's value dim)

The cache for decoding is ``{"conv": last K-1 projected inputs, "state": memory state}``.

A memory may declare ``num_kv > 1`` key/value projection sets (MoM: one per memory); then k
and v come as ``[B, T, num_kv, H, d]`` (the conv runs over all of them, per sequence). A memory
that declares ``owns_layer = True`` (GAM) is a complete mixer: the layer only delegates its
call and cache to it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.layers.conv import ShortConv
from memzoo.layers.norms import GatedRMSNorm, RMSNorm
from memzoo.layers.partitioning import dense
from memzoo.memories import Memory, build_memory

Array = jax.Array


class MemoryLayer(nnx.Module):
    """Projections, short conv, gated output norm and output projection around a memory."""

    def __init__(
        self,
        memory: str,
        *,
        d_model: int,
        num_heads: int,
        head_dim: int = 0,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_output_gate: bool = True,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **memory_kwargs: Any,
    ):
        dk = head_dim or d_model // num_heads
        dv = int(dk * expand_v)
        self.num_heads, self.dk, self.dv = num_heads, dk, dv
        self.dtype = dtype
        self.memory: Memory = build_memory(
            memory,
            d_model=d_model,
            num_heads=num_heads,
            dk=dk,
            dv=dv,
            init_std=init_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            **memory_kwargs,
        )
        self.owns_layer = bool(getattr(self.memory, "owns_layer", False))
        if self.owns_layer:
            return
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(init_std)
        self.uses_key = self.memory.uses_key
        self.num_kv = int(getattr(self.memory, "num_kv", 1))
        width = num_heads * (dk * (1 + self.num_kv * int(self.uses_key)) + self.num_kv * dv)
        self.in_proj = nnx.Linear(
            d_model, width, use_bias=False, kernel_init=init, **kw, **dense("embed", "heads")
        )
        self.conv = ShortConv(width, conv_size, **kw) if use_short_conv else None
        self.use_output_gate = use_output_gate
        if use_output_gate:
            self.g_proj = nnx.Linear(
                d_model,
                num_heads * dv,
                use_bias=False,
                kernel_init=init,
                **kw,
                **dense("embed", "heads"),
            )
            self.out_norm = GatedRMSNorm(dv, eps=norm_eps, **kw)
        else:
            self.out_norm = RMSNorm(dv, eps=norm_eps, axis="head_dim", **kw)
        self.o_proj = nnx.Linear(
            num_heads * dv,
            d_model,
            use_bias=False,
            kernel_init=init,
            **kw,
            **dense("heads", "embed"),
        )

    def init_cache(self, batch_size: int, max_len: int = 0, dtype: Any = jnp.float32) -> dict:
        if self.owns_layer:
            return self.memory.init_cache(batch_size, max_len, dtype)
        cache: dict[str, Any] = {"state": self.memory.init_state(batch_size)}
        if self.conv is not None:
            cache["conv"] = self.conv.init_cache(batch_size, dtype)
        return cache

    def _split(self, h: Array) -> tuple[Array, Array, Array]:
        B, T, _ = h.shape
        H, dk, dv = self.num_heads, self.dk, self.dv
        n = self.num_kv
        q = h[..., : H * dk].reshape(B, T, H, dk)
        lead = (B, T, H) if n == 1 else (B, T, n, H)
        if self.uses_key:
            k = h[..., H * dk : (1 + n) * H * dk].reshape(*lead, dk)
        else:
            k = q  # placeholder: the memory derives its key (e.g. tied k = 1 - a)
        v = h[..., -n * H * dv :].reshape(*lead, dv)
        return q, k, v

    def __call__(
        self, x: Array, *, segment_ids: Array | None = None, cache: dict | None = None
    ) -> tuple[Array, dict | None]:
        if self.owns_layer:
            return self.memory(x, segment_ids=segment_ids, cache=cache)
        if cache is not None and segment_ids is not None:
            raise ValueError("MemoryLayer: segment_ids are not supported together with a cache")
        B, T, _ = x.shape
        x = x.astype(self.dtype)
        h = self.in_proj(x)
        new_cache: dict | None = None if cache is None else {}
        if self.conv is not None:
            h, conv_cache = self.conv(
                h, segment_ids=segment_ids, cache=None if cache is None else cache["conv"]
            )
            if new_cache is not None:
                new_cache["conv"] = conv_cache
        h = jax.nn.silu(h)
        q, k, v = self._split(h)
        q, k, v, gates = self.memory.features(x, q, k, v)
        if cache is not None and T == 1:
            step_gates = {name: g[:, 0] for name, g in gates.items()}
            o, state = self.memory.step(q[:, 0], k[:, 0], v[:, 0], step_gates, cache["state"])
            o = o[:, None]
        else:
            o, state = self.memory.parallel(
                q,
                k,
                v,
                gates,
                initial_state=None if cache is None else cache["state"],
                segment_ids=segment_ids,
            )
        if new_cache is not None:
            new_cache["state"] = state
        o = o.astype(self.dtype)
        if self.use_output_gate:
            g = self.g_proj(x).reshape(B, T, self.num_heads, self.dv)
            o = self.out_norm(o, g)
        else:
            o = self.out_norm(o)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.dv)), new_cache
