"""The linear-attention family as presets of one memory class (SPEC section 3).

Every member is a matrix (or, for HGRN, vector) state with an exact chunked training form:

* regime A, ``S_t = Diag(a_t) S_{t-1} + k_t v_t^T`` (op ``gla``): linear attention (a = 1;
  Katharopoulos et al. 2020), RetNet (fixed per-head a_h = 1 - 2^(-5-h); Sun et al. 2023),
  GLA (per-channel a_t = sigmoid(low-rank(x))^(1/16); Yang et al. 2024) and HGRN2 (per-channel
  a_t, tied key k_t = 1 - a_t; Qin et al. 2024);
* regime B, ``S_t = a_t (I - eta_t k_t k_t^T) S_{t-1} + eta_t k_t v_t^T`` (op ``delta_rule``):
  DeltaNet (a = 1, eta = sigmoid(W_b x); Schlag et al. 2021, Yang et al. 2024) and Gated
  DeltaNet (log a_t = -exp(A_log) softplus(W_a x + dt_bias); Yang, Kautz, Hatamizadeh 2025);
* HGRN gen 1 (Qin et al. 2023), vector state ``h_t = a_t h_{t-1} + (1 - a_t) v_t``, read
  ``h_t * q_t`` (op ``hgrn``).

A preset is a :class:`LinearMemorySpec`; a new variant is a new spec, not a new class.
choice: HGRN/HGRN2's lower bound on a is a fixed per-layer schedule
``lb_l = hgrn_lower_bound * l / n_layers`` instead of the paper's learned cumulative softmax.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.layers.norms import l2_normalize
from memzoo.layers.partitioning import dense, kernel_op, param
from memzoo.memories.base import Array, Gates, Memory, kernel_kwargs, register_memory
from pallas_kernels import delta_rule, delta_rule_step, gla, gla_step, hgrn, hgrn_step


@dataclasses.dataclass(frozen=True)
class LinearMemorySpec:
    rule: str  # "gla" | "delta" | "hgrn"
    decay: str  # "none" | "retnet" | "gdn" | "gla" | "hgrn2" | "hgrn"
    write: str = "none"  # "none" | "sigmoid" (eta_t = sigmoid(W_b x_t), delta rules)
    qk_l2: bool = False


PRESETS: dict[str, LinearMemorySpec] = {
    "linear_attention": LinearMemorySpec(rule="gla", decay="none"),
    "retnet": LinearMemorySpec(rule="gla", decay="retnet"),
    "gla": LinearMemorySpec(rule="gla", decay="gla"),
    "hgrn2": LinearMemorySpec(rule="gla", decay="hgrn2"),
    "hgrn": LinearMemorySpec(rule="hgrn", decay="hgrn"),
    "deltanet": LinearMemorySpec(rule="delta", decay="none", write="sigmoid", qk_l2=True),
    "gated_deltanet": LinearMemorySpec(rule="delta", decay="gdn", write="sigmoid", qk_l2=True),
}


def _linear(
    d_in: int, d_out: int, *, bias: bool, std: float, rngs: nnx.Rngs, axes=("embed", "gates"), **kw
):
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        kernel_init=nnx.initializers.normal(std),
        rngs=rngs,
        **kw,
        **dense(*axes),
    )


class LinearMemory(Memory):
    """One memory of the linear-attention family, selected by a :class:`LinearMemorySpec`."""

    def __init__(
        self,
        spec: LinearMemorySpec,
        *,
        d_model: int,
        num_heads: int,
        dk: int,
        dv: int,
        layer_idx: int = 0,
        n_layers: int = 1,
        chunk_size: int = 64,
        impl: str = "auto",
        kernel_options: dict[str, Any] | None = None,
        gate_low_rank: int = 16,
        hgrn_lower_bound: float = 0.0,
        init_std: float = 0.02,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if spec.rule == "hgrn" and dk != dv:
            raise ValueError(f"hgrn needs head_dim == value dim, got dk={dk}, dv={dv}")
        self.spec = spec
        self.uses_key = spec.rule != "hgrn" and spec.decay != "hgrn2"
        self.num_heads, self.dk, self.dv = num_heads, dk, dv
        self.chunk_size, self.impl = chunk_size, impl
        self.kernel_kw = kernel_kwargs(kernel_options)
        self.lower_bound = hgrn_lower_bound * layer_idx / max(n_layers, 1)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        H = num_heads
        if spec.decay == "gdn":
            self.w_a = _linear(d_model, H, bias=False, std=init_std, rngs=rngs, **kw)
            key = rngs.params()
            a = jax.random.uniform(key, (H,), minval=1.0, maxval=16.0)
            self.A_log = param(jnp.log(a).astype(param_dtype), "gates")
            dt = jnp.exp(
                jax.random.uniform(rngs.params(), (H,)) * (math.log(0.1) - math.log(1e-3))
                + math.log(1e-3)
            )
            self.dt_bias = param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype), "gates")
        elif spec.decay == "gla":
            lr = ("embed", "low_rank")
            self.w_a1 = _linear(
                d_model, gate_low_rank, bias=False, std=init_std, rngs=rngs, axes=lr, **kw
            )
            self.w_a2 = _linear(
                gate_low_rank,
                H * dk,
                bias=True,
                std=init_std,
                rngs=rngs,
                axes=("low_rank", "heads"),
                **kw,
            )
        elif spec.decay in ("hgrn2", "hgrn"):
            self.w_f = _linear(
                d_model, H * dk, bias=True, std=init_std, rngs=rngs, axes=("embed", "heads"), **kw
            )
        if spec.write == "sigmoid":
            self.w_b = _linear(d_model, H, bias=False, std=init_std, rngs=rngs, **kw)

    # -- gates ---------------------------------------------------------------------------------

    def _log_forget(self, z: Array) -> Array:
        """log a for a = lb + (1 - lb) sigmoid(z), stable in fp32."""
        z = z.astype(jnp.float32)
        if self.lower_bound == 0.0:
            return jax.nn.log_sigmoid(z)
        lb = self.lower_bound
        return jnp.log(lb + (1.0 - lb) * jax.nn.sigmoid(z))

    def features(self, x: Array, q: Array, k: Array, v: Array) -> tuple[Array, Array, Array, Gates]:
        B, T = x.shape[:2]
        H, dk = self.num_heads, self.dk
        gates: Gates = {}
        decay = self.spec.decay
        if decay == "retnet":
            log_a = jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(H, dtype=jnp.float32))))
            gates["log_a"] = jnp.broadcast_to(log_a, (B, T, H))
        elif decay == "gdn":
            z = self.w_a(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
            gates["log_a"] = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(z)
        elif decay == "gla":
            z = self.w_a2(self.w_a1(x)).astype(jnp.float32).reshape(B, T, H, dk)
            gates["log_a"] = jax.nn.log_sigmoid(z) / 16.0
        elif decay in ("hgrn2", "hgrn"):
            z = self.w_f(x).reshape(B, T, H, dk)
            log_a = self._log_forget(z)
            gates["log_a"] = log_a
            if decay == "hgrn2":
                k = (-jnp.expm1(log_a)).astype(q.dtype)  # tied key k_t = 1 - a_t
        if self.spec.write == "sigmoid":
            gates["eta"] = jax.nn.sigmoid(self.w_b(x).astype(jnp.float32))
        if self.spec.qk_l2:
            q, k = l2_normalize(q).astype(q.dtype), l2_normalize(k).astype(k.dtype)
        return q, k, v, gates

    # -- execution paths -----------------------------------------------------------------------

    def parallel(self, q, k, v, gates, *, initial_state=None, segment_ids=None):
        kw = dict(
            initial_state=initial_state,
            segment_ids=segment_ids,
            chunk_size=self.chunk_size,
            impl=self.impl,
            **dict(self.kernel_kw),
        )
        rule = self.spec.rule
        if rule == "gla":
            return kernel_op(gla, (q, k, v, gates.get("log_a")), kw)
        if rule == "delta":
            return kernel_op(delta_rule, (q, k, v, gates["eta"], gates.get("log_a")), kw)
        return kernel_op(hgrn, (q, v, gates["log_a"]), kw)

    def step(self, q, k, v, gates, state):
        rule = self.spec.rule
        if rule == "gla":
            return gla_step(q, k, v, gates.get("log_a"), state)
        if rule == "delta":
            return delta_rule_step(q, k, v, gates["eta"], gates.get("log_a"), state)
        return hgrn_step(q, v, gates["log_a"], state)

    def init_state(self, batch_size: int) -> Array:
        if self.spec.rule == "hgrn":
            return jnp.zeros((batch_size, self.num_heads, self.dk), jnp.float32)
        return jnp.zeros((batch_size, self.num_heads, self.dk, self.dv), jnp.float32)


def _factory(spec: LinearMemorySpec):
    return lambda **kw: LinearMemory(spec, **kw)


for _name, _spec in PRESETS.items():
    register_memory(_name, _factory(_spec))
