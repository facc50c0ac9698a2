"""Gated linear attention (SPEC regime A): diagonal / scalar / no decay on a matrix state.

    S_t = Diag(a_t) S_{t-1} + k_t v_t^T          (a_t decays along the key dim)
    y_t = scale * q_t^T S_t

Covers linear attention (a = 1), RetNet / Mamba2-like scalar decay (log_a [B,T,H]) and
GLA / HGRN2 per-channel decay (log_a [B,T,H,dk]).
Reference: Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with
Hardware-Efficient Training", ICML 2024.
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
)

SUB_CHUNK = 16


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _validate(op: str, q, k, v, log_a, step: bool) -> tuple[int, ...]:
    lead = "[B,H]" if step else "[B,T,H]"
    qs = shape_of(op, "q", q)
    nd = 3 if step else 4
    if len(qs) != nd:
        raise ValueError(f"{op}: q has shape {fmt_shape(qs)}; expected {lead[:-1]},dk]")
    ks = shape_of(op, "k", k)
    if ks != qs:
        raise ValueError(f"{op}: k has shape {fmt_shape(ks)} but q has shape {fmt_shape(qs)}")
    vs = shape_of(op, "v", v)
    if len(vs) != nd or vs[:-1] != qs[:-1]:
        raise ValueError(
            f"{op}: v has shape {fmt_shape(vs)}; expected {lead[:-1]},dv] with "
            f"{lead}={fmt_shape(qs[:-1])} matching q {fmt_shape(qs)}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_floating(op, name, x)
    if log_a is not None:
        ls = shape_of(op, "log_a", log_a)
        if ls not in (qs[:-1], qs):
            raise ValueError(
                f"{op}: log_a has shape {fmt_shape(ls)} but q is {lead[:-1]},dk]="
                f"{fmt_shape(qs)}; expected None, {lead} or {lead[:-1]},dk]"
            )
        check_floating(op, "log_a", log_a)
    return qs + (vs[-1],)


# --------------------------------------------------------------------------------------------
# Step (one token) and scan
# --------------------------------------------------------------------------------------------


def _step_f32(q, k, v, log_a, state, scale):
    """fp32 core: q, k [B,H,dk]; v [B,H,dv]; log_a None/[B,H]/[B,H,dk]; state [B,H,dk,dv]."""
    if log_a is not None:
        decay = jnp.exp(log_a)
        decay = decay[..., None] if log_a.ndim == q.ndim else decay[..., None, None]
        state = state * decay
    state = state + k[..., :, None] * v[..., None, :]
    y = scale * jnp.einsum("bhk,bhkv->bhv", q, state)
    return y, state


def gla_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_a: jax.Array | None,
    state: jax.Array | None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One token of regime A: S = Diag(a) S + k v^T; y = scale * q^T S.

    q, k [B,H,dk]; v [B,H,dv]; log_a None, [B,H] or [B,H,dk]; state [B,H,dk,dv] (None: zeros).
    Returns (y [B,H,dv] in v's dtype, new state fp32).
    """
    b, h, dk, dv = _validate("gla_step", q, k, v, log_a, step=True)
    check_state("gla_step", "state", state, (b, h, dk, dv), "[B,H,dk,dv]")
    s = jnp.zeros((b, h, dk, dv), jnp.float32) if state is None else f32(state)
    y, s = _step_f32(f32(q), f32(k), f32(v), f32(log_a), s, default_scale(scale, dk))
    return y.astype(v.dtype), s


def _scan(q, k, v, log_a, s0, resets, scale):
    def body(s, xs):
        qt, kt, vt, lt, rt = xs
        s = jnp.where(rt[:, None, None, None], 0.0, s)
        y, s = _step_f32(qt, kt, vt, lt, s, scale)
        return s, y

    xs = (time_major(q), time_major(k), time_major(v), time_major(log_a), time_major(resets))
    s, ys = lax.scan(body, s0, xs)
    return jnp.moveaxis(ys, 0, 1), s


# --------------------------------------------------------------------------------------------
# Chunked (parallel form)
# --------------------------------------------------------------------------------------------


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def _intra_per_channel(q, k, g):
    """Causal intra-chunk scores A[r,s] = sum_d q_rd k_sd exp(G_rd - G_sd), s <= r.

    q, k, g: [..., C, dk] with g the within-chunk cumulative log decay. Every exponent that is
    exponentiated is <= 0 (for log_a <= 0): diagonal sub-chunks use pairwise differences,
    off-diagonal sub-chunk blocks are rescaled against the last row of the key sub-chunk.
    """
    *lead, c_len, dk = q.shape
    c = _largest_divisor_at_most(c_len, SUB_CHUNK)
    n = c_len // c
    qs = q.reshape(*lead, n, c, dk)
    ks = k.reshape(*lead, n, c, dk)
    gs = g.reshape(*lead, n, c, dk)

    tri = jnp.tril(jnp.ones((c, c), dtype=bool))
    diff = gs[..., :, :, None, :] - gs[..., :, None, :, :]  # [..., n, r, s, dk]
    diff = jnp.where(tri[:, :, None], diff, NEG_INF)
    # an einsum, not sum(q[:, None] * k[None] * e, -1): the gradient of that broadcast-reduce
    # segfaults in XLA's CPU backend (jaxlib 0.10.2 on AMD EPYC hosts)
    diag = jnp.einsum("...rd,...sd,...rsd->...rs", qs, ks, jnp.exp(diff))
    if n == 1:
        return diag.reshape(*lead, c_len, c_len)

    gref = gs[..., :, -1, :]  # [..., n(j), dk]: last row of key sub-chunk j
    lower = jnp.arange(n)[:, None] > jnp.arange(n)[None, :]  # [i, j]
    eq = gs[..., :, None, :, :] - gref[..., None, :, None, :]  # [..., i, j, r, dk]
    eq = jnp.where(lower[:, :, None, None], eq, NEG_INF)
    kd = ks * jnp.exp(gref[..., :, None, :] - gs)  # [..., j, s, dk]
    off = jnp.einsum("...ird,...ijrd,...jsd->...irjs", qs, jnp.exp(eq), kd)
    eye = jnp.eye(n, dtype=q.dtype)
    full = off + jnp.einsum("...irs,ij->...irjs", diag, eye)
    return full.reshape(*lead, c_len, c_len)


def _chunked(q, k, v, log_a, s0, resets, scale, chunk_size):
    b, t, h, dk = q.shape
    c = min(chunk_size, t)
    n = -(-t // c)
    tp = n * c

    per_channel = log_a is not None and log_a.ndim == 4
    if log_a is None:
        log_a = jnp.zeros((b, t, h), jnp.float32)
    qc = to_chunks(pad_time(q * scale, tp), c)  # [B,H,N,C,dk]
    kc = to_chunks(pad_time(k, tp), c)
    vc = to_chunks(pad_time(v, tp), c)  # [B,H,N,C,dv]
    lc = to_chunks(pad_time(log_a, tp), c)  # [B,H,N,C] or [B,H,N,C,dk]
    from_start, same, causal_same = chunk_segment_masks(pad_time(resets, tp), c)

    g = jnp.cumsum(lc, axis=3)
    if per_channel:
        scores = _intra_per_channel(qc, kc, g)
        scores = jnp.where(causal_same, scores, 0.0)
        gx = g
    else:
        expo = jnp.where(causal_same, g[..., :, None] - g[..., None, :], NEG_INF)
        scores = jnp.einsum("...rd,...sd->...rs", qc, kc) * jnp.exp(expo)
        gx = g[..., None]  # [B,H,N,C,1]
    o_intra = jnp.einsum("...rs,...se->...re", scores, vc)

    q_inter = qc * jnp.exp(gx) * from_start[..., None]
    g_end = gx[..., -1:, :]  # [B,H,N,1,dk|1]
    end_same = same[..., -1, :]  # [B,1,N,C]: same document as the chunk's last token
    k_state = kc * jnp.exp(jnp.where(end_same[..., None], g_end - gx, NEG_INF))
    ds = jnp.einsum("...cd,...ce->...de", k_state, vc)  # [B,H,N,dk,dv]
    dec_end = jnp.exp(g_end[..., 0, :]) * from_start[..., -1][..., None]  # [B,H,N,dk|1]

    def body(s, xs):
        dec, d = xs
        return dec[..., None] * s + d, s

    s_final, s_starts = lax.scan(body, s0, (jnp.moveaxis(dec_end, 2, 0), jnp.moveaxis(ds, 2, 0)))
    s_starts = jnp.moveaxis(s_starts, 0, 2)  # [B,H,N,dk,dv]
    o = o_intra + jnp.einsum("bhncd,bhnde->bhnce", q_inter, s_starts)
    return from_chunks(o)[:, :t], s_final


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------


def gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
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
    """Gated linear attention over a sequence (SPEC regime A).

        S_t = Diag(a_t) S_{t-1} + k_t v_t^T,   y_t = scale * q_t^T S_t,   a_t = exp(log_a_t)

    Args:
      q, k: [B,T,H,dk]; v: [B,T,H,dv].
      log_a: None (a = 1, plain linear attention), [B,T,H] (scalar decay per head and step)
        or [B,T,H,dk] (per-channel decay, GLA / HGRN2). Should be <= 0.
      initial_state: [B,H,dk,dv] or None (zeros).
      segment_ids: int [B,T] for packed documents; the state is zeroed before every token whose
        id differs from the previous token's.
      chunk_size: chunk length C of the parallel form ("xla"); any T is accepted.
      scale: read scale, default 1/sqrt(dk).
      impl: "auto", "scan" (exact lax.scan reference), "xla" (chunked), "pallas_tpu",
        "pallas_gpu" (the Pallas kernels; "auto" takes them on TPU / GPU when they support
        the call).
      interpret: run the Pallas impl in interpret mode (True, or ``pltpu.InterpretParams``).
      block_v: the kernels' dv block (None = the backend's default).

    Returns:
      (y [B,T,H,dv] in v's dtype, final_state [B,H,dk,dv] float32). Computation is in fp32.
    """
    op = "gla"
    b, t, h, dk, dv = _validate(op, q, k, v, log_a, step=False)
    check_time(op, (b, t))
    check_state(op, "initial_state", initial_state, (b, h, dk, dv), "[B,H,dk,dv]")
    check_segment_ids(op, segment_ids, b, t)
    chunk_size = check_chunk_size(op, chunk_size)
    which = resolve_impl(
        op,
        impl,
        (q, k, v, log_a),
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
    args = (f32(q), f32(k), f32(v), f32(log_a), s0, resets, default_scale(scale, dk))
    if which == "scan":
        y, s = _scan(*args)
    else:
        y, s = _chunked(*args, chunk_size)
    return y.astype(v.dtype), s


__all__: Any = ["gla", "gla_step"]
