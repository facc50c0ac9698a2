"""Delta rule with optional scalar decay (SPEC regime B): DeltaNet and Gated DeltaNet.

    S'_t = a_t S_{t-1}                                   (decay, then delta)
    S_t  = S'_t + eta_t k_t (v_t - S'_t^T k_t)^T
         = a_t (I - eta_t k_t k_t^T) S_{t-1} + eta_t k_t v_t^T
    y_t  = scale * q_t^T S_t

The op does not normalise q or k (the layer L2-normalises them).
References: Schlag, Irie, Schmidhuber, "Linear Transformers Are Secretly Fast Weight
Programmers", ICML 2021; Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length", NeurIPS 2024 (chunked WY form); Yang, Kautz, Hatamizadeh,
"Gated Delta Networks: Improving Mamba2 with Delta Rule", ICLR 2025 (the decay a_t).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._common import (
    NEG_INF,
    check_chunk_size,
    check_floating,
    check_segment_ids,
    check_state,
    check_time,
    chunk_segment_masks,
    default_scale,
    f32,
    fmt_shape,
    from_chunks,
    pad_time,
    resolve_impl,
    segment_resets,
    shape_of,
    time_major,
    to_chunks,
    unit_lower_inverse,
)

# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _validate(op: str, q, k, v, eta, log_a, step: bool) -> tuple[int, ...]:
    lead = "[B,H]" if step else "[B,T,H]"
    lead_open = lead[:-1]
    nd = 3 if step else 4
    qs = shape_of(op, "q", q)
    if len(qs) != nd:
        raise ValueError(f"{op}: q has shape {fmt_shape(qs)}; expected {lead_open},dk]")
    ks = shape_of(op, "k", k)
    if ks != qs:
        raise ValueError(f"{op}: k has shape {fmt_shape(ks)} but q has shape {fmt_shape(qs)}")
    vs = shape_of(op, "v", v)
    if len(vs) != nd or vs[:-1] != qs[:-1]:
        raise ValueError(
            f"{op}: v has shape {fmt_shape(vs)}; expected {lead_open},dv] with "
            f"{lead}={fmt_shape(qs[:-1])} matching q {fmt_shape(qs)}"
        )
    es = shape_of(op, "eta", eta)
    if es != qs[:-1]:
        raise ValueError(
            f"{op}: eta has shape {fmt_shape(es)} but q is {lead_open},dk]={fmt_shape(qs)}; "
            f"expected {lead}={fmt_shape(qs[:-1])}"
        )
    if log_a is not None:
        ls = shape_of(op, "log_a", log_a)
        if ls != qs[:-1]:
            raise ValueError(
                f"{op}: log_a has shape {fmt_shape(ls)} but q is {lead_open},dk]="
                f"{fmt_shape(qs)}; expected None or {lead}={fmt_shape(qs[:-1])} (scalar decay "
                "per head; per-channel decay is not supported by the delta rule)"
            )
        check_floating(op, "log_a", log_a)
    for name, x in (("q", q), ("k", k), ("v", v), ("eta", eta)):
        check_floating(op, name, x)
    return qs + (vs[-1],)


# --------------------------------------------------------------------------------------------
# Step and scan
# --------------------------------------------------------------------------------------------


def _step_f32(q, k, v, eta, log_a, state, scale):
    """fp32 core: q, k [B,H,dk]; v [B,H,dv]; eta [B,H]; log_a None/[B,H]; state [B,H,dk,dv]."""
    if log_a is not None:
        state = state * jnp.exp(log_a)[..., None, None]
    pred = jnp.einsum("bhkv,bhk->bhv", state, k)
    u = eta[..., None] * (v - pred)
    state = state + k[..., :, None] * u[..., None, :]
    y = scale * jnp.einsum("bhk,bhkv->bhv", q, state)
    return y, state


def delta_rule_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    eta: jax.Array,
    log_a: jax.Array | None,
    state: jax.Array | None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One token of regime B (decay, then delta); see the module docstring.

    q, k [B,H,dk]; v [B,H,dv]; eta [B,H]; log_a None or [B,H]; state [B,H,dk,dv] (None: zeros).
    Returns (y [B,H,dv] in v's dtype, new state fp32).
    """
    op = "delta_rule_step"
    b, h, dk, dv = _validate(op, q, k, v, eta, log_a, step=True)
    check_state(op, "state", state, (b, h, dk, dv), "[B,H,dk,dv]")
    s = jnp.zeros((b, h, dk, dv), jnp.float32) if state is None else f32(state)
    y, s = _step_f32(f32(q), f32(k), f32(v), f32(eta), f32(log_a), s, default_scale(scale, dk))
    return y.astype(v.dtype), s


def _scan(q, k, v, eta, log_a, s0, resets, scale):
    def body(s, xs):
        qt, kt, vt, et, lt, rt = xs
        s = jnp.where(rt[:, None, None, None], 0.0, s)
        y, s = _step_f32(qt, kt, vt, et, lt, s, scale)
        return s, y

    xs = tuple(time_major(x) for x in (q, k, v, eta, log_a, resets))
    s, ys = lax.scan(body, s0, xs)
    return jnp.moveaxis(ys, 0, 1), s


# --------------------------------------------------------------------------------------------
# Chunked WY form
# --------------------------------------------------------------------------------------------


def _chunked(q, k, v, eta, log_a, s0, resets, scale, chunk_size):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, t)
    n = -(-t // c)
    tp = n * c
    if log_a is None:
        log_a = jnp.zeros((b, t, h), jnp.float32)

    qc = to_chunks(pad_time(q * scale, tp), c)  # [B,H,N,C,dk]
    kc = to_chunks(pad_time(k, tp), c)
    vc = to_chunks(pad_time(v, tp), c)  # [B,H,N,C,dv]
    ec = to_chunks(pad_time(eta, tp), c)  # [B,H,N,C]
    lc = to_chunks(pad_time(log_a, tp), c)
    from_start, same, causal_same = chunk_segment_masks(pad_time(resets, tp), c)

    g = jnp.cumsum(lc, axis=3)  # [B,H,N,C]
    gamma = jnp.exp(jnp.where(causal_same, g[..., :, None] - g[..., None, :], NEG_INF))
    strict = jnp.tril(jnp.ones((c, c), dtype=bool), -1)

    # (I + A) U = eta V - diag(eta * from_start * e^G) K S0, A strictly lower (same document).
    kk = jnp.einsum("...rd,...sd->...rs", kc, kc)
    a_mat = jnp.where(strict, ec[..., :, None] * kk * gamma, 0.0)
    read0 = from_start * jnp.exp(g)  # [B,H,N,C]: weight of the chunk-start state
    rhs = jnp.concatenate([ec[..., None] * vc, (ec * read0)[..., None] * kc], axis=-1)
    sol = unit_lower_inverse(a_mat) @ rhs
    u_v, w = sol[..., :dv], sol[..., dv:]  # U = u_v - w S0

    a_qk = jnp.einsum("...rd,...sd->...rs", qc, kc) * gamma
    q_inter = qc * read0[..., None]
    g_end = g[..., -1:]  # [B,H,N,1]
    end_same = same[..., -1, :]  # [B,1,N,C]
    k_state = kc * jnp.exp(jnp.where(end_same, g_end - g, NEG_INF))[..., None]
    dec_end = from_start[..., -1] * jnp.exp(g_end[..., 0])  # [B,H,N]

    def body(s, xs):
        uv, wc, aqk, qi, kst, dec = xs
        u = uv - jnp.einsum("bhcd,bhde->bhce", wc, s)
        o = jnp.einsum("bhcd,bhde->bhce", qi, s) + jnp.einsum("bhrs,bhse->bhre", aqk, u)
        s_next = dec[..., None, None] * s + jnp.einsum("bhcd,bhce->bhde", kst, u)
        return s_next, o

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u_v, w, a_qk, q_inter, k_state, dec_end))
    s_final, o = lax.scan(body, s0, xs)
    o = jnp.moveaxis(o, 0, 2)  # [B,H,N,C,dv]
    return from_chunks(o)[:, :t], s_final


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    eta: jax.Array,
    log_a: jax.Array | None = None,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    scale: float | None = None,
    impl: str = "auto",
    interpret: Any = False,
    block_v: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(Gated) delta rule over a sequence (SPEC regime B, decay then delta).

        S'_t = a_t S_{t-1};  S_t = S'_t + eta_t k_t (v_t - S'_t^T k_t)^T;  y_t = scale q_t^T S_t

    Args:
      q, k: [B,T,H,dk] (not normalised here); v: [B,T,H,dv]; eta: [B,T,H] write strength
        (DeltaNet's beta); log_a: None (DeltaNet, a = 1) or [B,T,H] (Gated DeltaNet).
      initial_state: [B,H,dk,dv] or None (zeros).
      segment_ids: int [B,T]; the state is zeroed before every token whose id differs from the
        previous token's.
      chunk_size: chunk length C of the parallel WY form ("xla"); any T is accepted.
      scale: read scale, default 1/sqrt(dk).
      impl: "auto", "scan", "xla", "pallas_tpu", "pallas_gpu".
      interpret: run the Pallas impl in interpret mode (True, or ``pltpu.InterpretParams``).
      block_v: the kernels' dv block (None = the backend's default).

    Returns:
      (y [B,T,H,dv] in v's dtype, final_state [B,H,dk,dv] float32). Computation is in fp32.
    """
    op = "delta_rule"
    b, t, h, dk, dv = _validate(op, q, k, v, eta, log_a, step=False)
    check_time(op, (b, t))
    check_state(op, "initial_state", initial_state, (b, h, dk, dv), "[B,H,dk,dv]")
    check_segment_ids(op, segment_ids, b, t)
    chunk_size = check_chunk_size(op, chunk_size)
    which = resolve_impl(
        op,
        impl,
        (q, k, v, eta, log_a),
        dict(
            initial_state=initial_state,
            segment_ids=segment_ids,
            chunk_size=chunk_size,
            scale=scale,
        ),
        interpret=interpret,
        block_v=block_v,
    )
    if callable(which):
        return which()
    s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else f32(initial_state)
    resets = segment_resets(segment_ids, b, t)
    args = (f32(q), f32(k), f32(v), f32(eta), f32(log_a), s0, resets, default_scale(scale, dk))
    if which == "scan":
        y, s = _scan(*args)
    else:
        y, s = _chunked(*args, chunk_size)
    return y.astype(v.dtype), s


__all__ = ["delta_rule", "delta_rule_step"]
