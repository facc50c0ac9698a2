"""Mixture-of-Memories (SPEC section 3 "MoM", regime D, extension E5).

Du, Sun, Zhou, et al. 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories".

M memories, each a Gated DeltaNet state S^m in R^{H x dk x dv}, plus (``shared_memory``) one
shared memory S^0 that sees every token. A router picks k of the M memories per token:

    p_t = softmax(x_t W_g)                      in R^M
    R_t = top_k(p_t);   w_{t,m} = p_{t,m} / sum_{m' in R_t} p_{t,m'}   (m in R_t, else 0)

Each memory has its own key, value, write-strength and decay projections; the query is shared:

    k^m_t, v^m_t (projected + short conv + SiLU by the layer, k L2-normalised)
    eta^m_t = sigmoid(W_b^m x_t),  log a^m_t = -exp(A_log^m) softplus(W_a^m x_t + dt_bias^m)
    S^m_t = a^m_t (I - eta^m_t k^m_t k^m_t^T) S^m_{t-1} + eta^m_t k^m_t v^m_t^T   if m in R_t
    S^m_t = S^m_{t-1}                                                          otherwise
    o_t = sum_{m in R_t} w_{t,m} (q_t^T S^m_t) / sqrt(dk)  +  q_t^T S^0_t / sqrt(dk)

A memory not routed to at t is neither written nor decayed at t (exact, SPEC E5).

Two exactly equivalent execution forms (both tested against a token-by-token reference):

* ``packed`` (regime D, the training path without a cache): the (token, memory) pairs of each
  row, T * (k + shared) of them, are sorted stably by (memory, time) into per-memory
  subsequences and run as packed segments through ONE ``delta_rule`` call; a segment is one
  (memory, document) pair, so memories and documents never mix. Outputs are scattered back,
  weighted, and summed. Costs (k + shared) / (M + shared) of the masked form. It starts from
  zero states and does not return per-memory final states, so it is used only without a cache.
* ``masked`` (prefill with a cache, and the reference): the M + 1 memories are stacked along
  the head axis, ``[B, T, (M+1) H, d]``, in one ``delta_rule`` call with eta = 0 and log a = 0
  on tokens not routed to a memory (no write, no decay); handles per-memory initial states.
  ``step`` (decoding) is the same with T = 1, so only routed memories change.

Short conv: the layer runs it per sequence (over every memory's k, v projections, with the
document ``segment_ids``) before routing, so it never crosses a document boundary. (The
reference code convolves the routed, re-ordered token stream, which leaks across memory and
document boundaries; we don't.)

Load balancing (Switch Transformer style): with f_m the fraction of routed token slots that go
to memory m and P_m the mean router probability of m over the batch,

    aux = aux_loss_scale * M * sum_m f_m P_m

sown as ``nnx.Intermediate`` ``aux_loss`` (and ``mom_load`` = f) on the training path (no
cache), only inside ``nnx.capture``; the train step adds it to the loss.

State (cache): ``[B, (M + shared) H, dk, dv]``, memory-major (memory m owns heads
``m H .. (m+1) H - 1``; the shared memory is last).
choice: the router has no bias and no noise; the routing weights are renormalised over the
top k (as the paper); gates of each memory follow the Gated DeltaNet preset.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memzoo.layers.norms import l2_normalize
from memzoo.layers.partitioning import dense, kernel_op, param
from memzoo.memories.base import Array, Gates, Memory, kernel_kwargs, register_memory
from pallas_kernels import delta_rule, delta_rule_step


def route(probs: Array, top_k: int) -> tuple[Array, Array, Array]:
    """Top-k routing of router probabilities ``[..., M]``.

    Returns ``(idx int [..., k], w [..., k] renormalised weights, dense [..., M] weights)``;
    ``dense`` is zero for memories not routed to."""
    top_p, idx = jax.lax.top_k(probs, top_k)
    w = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    one_hot = jax.nn.one_hot(idx, probs.shape[-1], dtype=probs.dtype)  # [..., k, M]
    dense = jnp.einsum("...k,...km->...m", w, one_hot)
    return idx, w, dense


def load_balance(probs: Array, idx: Array, num_memories: int) -> tuple[Array, Array]:
    """Switch-style load balance over all tokens: returns ``(M * sum_m f_m P_m, f)``."""
    counts = jnp.sum(jax.nn.one_hot(idx, num_memories, dtype=jnp.float32), axis=-2)
    f = jnp.mean(counts.reshape(-1, num_memories), axis=0) / idx.shape[-1]
    p = jnp.mean(probs.reshape(-1, num_memories).astype(jnp.float32), axis=0)
    return num_memories * jnp.sum(f * p), f


class MixtureOfMemories(Memory):
    """MoM memory: routed Gated DeltaNet states plus an optional shared one (module doc)."""

    def __init__(
        self,
        *,
        d_model: int,
        num_heads: int,
        dk: int,
        dv: int,
        num_memories: int = 4,
        top_k: int = 2,
        shared_memory: bool = True,
        aux_loss_scale: float = 1e-3,
        chunk_size: int = 64,
        impl: str = "auto",
        kernel_options: dict[str, Any] | None = None,
        init_std: float = 0.02,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **_unused: Any,
    ):
        if not 1 <= top_k <= num_memories:
            raise ValueError(f"mom: top_k={top_k} must be in [1, num_memories={num_memories}]")
        self.num_memories, self.top_k = num_memories, top_k
        self.shared_memory = shared_memory
        self.aux_loss_scale = aux_loss_scale
        self.num_kv = num_memories + int(shared_memory)  # key/value projection sets
        self.num_heads, self.dk, self.dv = num_heads, dk, dv
        self.chunk_size, self.impl = chunk_size, impl
        self.kernel_kw = kernel_kwargs(kernel_options)
        n, H = self.num_kv, num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(init_std)
        self.router = nnx.Linear(
            d_model,
            num_memories,
            use_bias=False,
            kernel_init=init,
            **kw,
            **dense("embed", "memories"),
        )
        gate = dense("embed", "gates")
        self.w_a = nnx.Linear(d_model, n * H, use_bias=False, kernel_init=init, **kw, **gate)
        self.w_b = nnx.Linear(d_model, n * H, use_bias=False, kernel_init=init, **kw, **gate)
        a = jax.random.uniform(rngs.params(), (n * H,), minval=1.0, maxval=16.0)
        self.A_log = param(jnp.log(a).astype(param_dtype), "gates")
        dt = jnp.exp(
            jax.random.uniform(rngs.params(), (n * H,)) * (math.log(0.1) - math.log(1e-3))
            + math.log(1e-3)
        )
        self.dt_bias = param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype), "gates")

    # -- gates and routing -----------------------------------------------------------------------

    def features(self, x: Array, q: Array, k: Array, v: Array) -> tuple[Array, Array, Array, Gates]:
        """q [B,T,H,dk]; k [B,T,n,H,dk]; v [B,T,n,H,dv] (n = M + shared) from the layer.

        Gates: ``eta``, ``log_a`` [B,T,n,H]; ``weight`` [B,T,n] (routing weights, 1 for the
        shared memory, 0 when not routed); ``routed`` [B,T,n] (1 where written); ``probs``
        [B,T,M]; ``idx`` int [B,T,k]."""
        B, T = x.shape[:2]
        n, H, M = self.num_kv, self.num_heads, self.num_memories
        z = self.w_a(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        log_a = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(z)
        eta = jax.nn.sigmoid(self.w_b(x).astype(jnp.float32))
        probs = jax.nn.softmax(self.router(x).astype(jnp.float32), axis=-1)
        idx, _, dense = route(probs, self.top_k)
        routed = jnp.sum(jax.nn.one_hot(idx, M, dtype=jnp.float32), axis=-2)
        if self.shared_memory:
            ones = jnp.ones((B, T, 1), jnp.float32)
            dense = jnp.concatenate([dense, ones], axis=-1)
            routed = jnp.concatenate([routed, ones], axis=-1)
        gates: Gates = {
            "eta": eta.reshape(B, T, n, H),
            "log_a": log_a.reshape(B, T, n, H),
            "weight": dense,
            "routed": routed,
            "probs": probs,
            "idx": idx,
        }
        q, k = l2_normalize(q).astype(q.dtype), l2_normalize(k).astype(k.dtype)
        return q, k, v, gates

    # -- execution paths -------------------------------------------------------------------------

    def _sow_aux(self, gates: Gates) -> None:
        # Only under nnx.capture (the train step): outside it, sow would mutate the module.
        if not hasattr(self, "__captures__"):
            return
        aux, load = load_balance(gates["probs"], gates["idx"], self.num_memories)
        self.sow(nnx.Intermediate, "aux_loss", self.aux_loss_scale * aux)
        self.sow(nnx.Intermediate, "mom_load", load)

    def parallel(self, q, k, v, gates, *, initial_state=None, segment_ids=None):
        if initial_state is None:
            self._sow_aux(gates)
            return self.parallel_packed(q, k, v, gates, segment_ids=segment_ids), None
        return self.parallel_masked(
            q, k, v, gates, initial_state=initial_state, segment_ids=segment_ids
        )

    def parallel_masked(self, q, k, v, gates, *, initial_state=None, segment_ids=None):
        """All memories stacked on the head axis; unrouted tokens get eta = 0, log a = 0."""
        B, T, H, dk = q.shape
        n, dv = self.num_kv, self.dv
        routed = gates["routed"][..., None]  # [B,T,n,1]
        eta = (gates["eta"] * routed).reshape(B, T, n * H)
        log_a = (gates["log_a"] * routed).reshape(B, T, n * H)
        qs = jnp.broadcast_to(q[:, :, None], (B, T, n, H, dk)).reshape(B, T, n * H, dk)
        y, state = kernel_op(
            delta_rule,
            (qs, k.reshape(B, T, n * H, dk), v.reshape(B, T, n * H, dv), eta, log_a),
            dict(
                initial_state=initial_state,
                segment_ids=segment_ids,
                chunk_size=self.chunk_size,
                impl=self.impl,
                **dict(self.kernel_kw),
            ),
        )
        y = y.reshape(B, T, n, H, dv).astype(jnp.float32)
        o = jnp.einsum("btnhv,btn->bthv", y, gates["weight"])
        return o.astype(v.dtype), state

    def parallel_packed(self, q, k, v, gates, *, segment_ids=None):
        """Regime D: sort (token, memory) pairs by (memory, time), one packed delta_rule call,
        scatter the weighted outputs back. Zero initial states; returns o [B,T,H,dv]."""
        B, T, H, dk = q.shape
        n, dv, M = self.num_kv, self.dv, self.num_memories
        mem = gates["idx"].astype(jnp.int32)  # [B,T,k]
        if self.shared_memory:
            mem = jnp.concatenate([mem, jnp.full((B, T, 1), M, jnp.int32)], axis=-1)
        kk = mem.shape[-1]
        L = T * kk
        t_idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :, None], (B, T, kk))
        key = (mem * T + t_idx).reshape(B, L)  # unique per row: (memory, time)
        key = jnp.sort(key, axis=-1)  # keys are unique, so this order is the stable one
        ts, ms = key % T, key // T  # [B,L]
        # document index, monotone in time: a new segment wherever memory or document changes
        if segment_ids is None:
            doc = jnp.zeros((B, T), jnp.int32)
        else:
            seg = jnp.asarray(segment_ids)
            starts = jnp.concatenate(
                [jnp.zeros((B, 1), jnp.int32), (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)], 1
            )
            doc = jnp.cumsum(starts, axis=1)
        packed_seg = ms * (T + 1) + jnp.take_along_axis(doc, ts, axis=1)
        flat = ts * n + ms  # index into [T * n]

        def gather_tm(a):  # a [B,T,n,...] -> [B,L,...]
            a2 = a.reshape(B, T * n, *a.shape[3:])
            ix = flat.reshape(B, L, *([1] * (a2.ndim - 2)))
            return jnp.take_along_axis(a2, ix, axis=1)

        qs = jnp.take_along_axis(q, ts[:, :, None, None], axis=1)
        y, _ = kernel_op(
            delta_rule,
            (qs, gather_tm(k), gather_tm(v), gather_tm(gates["eta"]), gather_tm(gates["log_a"])),
            dict(
                segment_ids=packed_seg,
                chunk_size=self.chunk_size,
                impl=self.impl,
                **dict(self.kernel_kw),
            ),
        )
        w = gather_tm(gates["weight"][..., None])[..., 0]  # [B,L]
        contrib = y.astype(jnp.float32) * w[:, :, None, None]
        b_idx = jnp.broadcast_to(jnp.arange(B)[:, None], (B, L))
        o = jnp.zeros((B, T, H, dv), jnp.float32).at[b_idx, ts].add(contrib)
        return o.astype(v.dtype)

    def step(self, q, k, v, gates, state):
        """One token: q [B,H,dk], k [B,n,H,dk], v [B,n,H,dv]; only routed memories change."""
        B, H, dk = q.shape
        n, dv = self.num_kv, self.dv
        routed = gates["routed"][..., None]  # [B,n,1]
        eta = (gates["eta"] * routed).reshape(B, n * H)
        log_a = (gates["log_a"] * routed).reshape(B, n * H)
        qs = jnp.broadcast_to(q[:, None], (B, n, H, dk)).reshape(B, n * H, dk)
        y, state = delta_rule_step(
            qs, k.reshape(B, n * H, dk), v.reshape(B, n * H, dv), eta, log_a, state
        )
        y = y.reshape(B, n, H, dv).astype(jnp.float32)
        o = jnp.einsum("bnhv,bn->bhv", y, gates["weight"])
        return o.astype(v.dtype), state

    def init_state(self, batch_size: int) -> Array:
        shape = (batch_size, self.num_kv * self.num_heads, self.dk, self.dv)
        return jnp.zeros(shape, jnp.float32)


register_memory("mom", lambda **kw: MixtureOfMemories(**kw))
