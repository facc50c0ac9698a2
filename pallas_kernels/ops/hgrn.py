"""HGRN (generation 1): gated linear recurrence with a vector state per head.

    h_t = a_t * h_{t-1} + (1 - a_t) * v_t,     y_t = q_t * h_t      (elementwise)

Reference: Qin, Yang, Zhong, "Hierarchically Gated Recurrent Neural Network for Sequence
Modeling", NeurIPS 2023.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._common import (
    check_chunk_size,
    check_floating,
    check_segment_ids,
    check_state,
    check_time,
    f32,
    fmt_shape,
    resolve_impl,
    segment_resets,
    shape_of,
    time_major,
)


def _validate(op: str, q, v, log_a, step: bool) -> tuple[int, ...]:
    desc = "[B,H,D]" if step else "[B,T,H,D]"
    nd = 3 if step else 4
    qs = shape_of(op, "q", q)
    if len(qs) != nd:
        raise ValueError(f"{op}: q has shape {fmt_shape(qs)}; expected {desc}")
    for name, x in (("v", v), ("log_a", log_a)):
        if x is None:
            raise ValueError(f"{op}: {name} is required (got None); expected {desc}")
        xs = shape_of(op, name, x)
        if xs != qs:
            raise ValueError(
                f"{op}: {name} has shape {fmt_shape(xs)} but q is {desc}={fmt_shape(qs)}; "
                f"expected {desc}={fmt_shape(qs)}"
            )
    for name, x in (("q", q), ("v", v), ("log_a", log_a)):
        check_floating(op, name, x)
    return qs


def _step_f32(q, v, log_a, h):
    h = jnp.exp(log_a) * h - jnp.expm1(log_a) * v
    return q * h, h


def hgrn_step(
    q: jax.Array, v: jax.Array, log_a: jax.Array, state: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """One HGRN token: h = a h + (1 - a) v; y = q * h. q, v, log_a [B,H,D]; state [B,H,D]."""
    op = "hgrn_step"
    b, h, d = _validate(op, q, v, log_a, step=True)
    check_state(op, "state", state, (b, h, d), "[B,H,D]")
    s = jnp.zeros((b, h, d), jnp.float32) if state is None else f32(state)
    y, s = _step_f32(f32(q), f32(v), f32(log_a), s)
    return y.astype(v.dtype), s


def _scan(q, v, log_a, h0, resets):
    def body(h, xs):
        qt, vt, lt, rt = xs
        h = jnp.where(rt[:, None, None], 0.0, h)
        y, h = _step_f32(qt, vt, lt, h)
        return h, y

    h, ys = lax.scan(body, h0, tuple(time_major(x) for x in (q, v, log_a, resets)))
    return jnp.moveaxis(ys, 0, 1), h


def _combine(x, y):
    a1, b1 = x
    a2, b2 = y
    return a1 * a2, a2 * b1 + b2


def _assoc(q, v, log_a, h0, resets):
    a = jnp.where(resets[:, :, None, None], 0.0, jnp.exp(log_a))
    b = -jnp.expm1(log_a) * v
    b = b.at[:, 0].add(a[:, 0] * h0)
    _, h = lax.associative_scan(_combine, (a, b), axis=1)
    return q * h, h[:, -1]


def hgrn(
    q: jax.Array,
    v: jax.Array,
    log_a: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    scale: float | None = None,
    impl: str = "auto",
    interpret: Any = False,
    block_v: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """HGRN gen-1 recurrence over a sequence.

        h_t = a_t h_{t-1} + (1 - a_t) v_t,  y_t = q_t * h_t,  a_t = exp(log_a_t)

    Args:
      q, v, log_a: [B,T,H,D].
      initial_state: [B,H,D] or None (zeros).
      segment_ids: int [B,T]; the state is zeroed before every token whose id differs from the
        previous token's.
      chunk_size: accepted for a uniform signature; "xla" uses lax.associative_scan and ignores
        it (it is still validated and passed to registered kernels).
      scale: accepted and ignored (the read is elementwise).
      impl: "auto", "scan", "xla", "pallas_tpu", "pallas_gpu".

    Returns:
      (y [B,T,H,D] in v's dtype, final_state [B,H,D] float32). Computation is in fp32.
    """
    op = "hgrn"
    b, t, h, d = _validate(op, q, v, log_a, step=False)
    check_time(op, (b, t))
    check_state(op, "initial_state", initial_state, (b, h, d), "[B,H,D]")
    check_segment_ids(op, segment_ids, b, t)
    chunk_size = check_chunk_size(op, chunk_size)
    which = resolve_impl(
        op,
        impl,
        (q, v, log_a),
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
    h0 = jnp.zeros((b, h, d), jnp.float32) if initial_state is None else f32(initial_state)
    resets = segment_resets(segment_ids, b, t)
    fn = _scan if which == "scan" else _assoc
    y, s = fn(f32(q), f32(v), f32(log_a), h0, resets)
    return y.astype(v.dtype), s


__all__ = ["hgrn", "hgrn_step"]
