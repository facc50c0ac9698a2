"""Shared machinery for the recurrence ops: validation, padding, chunking, segment masks and
implementation dispatch (including the registry of Pallas kernels).

Only jax / numpy are used here (never flax).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

VALID_IMPLS: tuple[str, ...] = ("auto", "scan", "xla", "pallas_tpu", "pallas_gpu")
KERNEL_BACKENDS: tuple[str, ...] = ("tpu", "gpu")
KNOWN_OPS: tuple[str, ...] = ("gla", "delta_rule", "hgrn", "gradient_memory")

_REGISTRY: dict[tuple[str, str], Callable[..., Any]] = {}

NEG_INF = -jnp.inf


# --------------------------------------------------------------------------------------------
# Kernel registry and dispatch
# --------------------------------------------------------------------------------------------


def register_kernel(op_name: str, backend: str, fn: Callable[..., Any]) -> None:
    """Register a (Pallas) kernel for ``op_name`` on ``backend`` ("tpu" or "gpu").

    ``fn`` is called with the op's positional array arguments (e.g. ``q, k, v, log_a`` for
    ``gla``) and the keyword arguments ``initial_state, segment_ids, chunk_size, scale``
    (already validated and passed through unchanged, so ``scale`` may be None) and must
    return ``(y, final_state)`` with the same semantics as the op's "scan" implementation.
    Registering again replaces the previous kernel.
    """
    if op_name not in KNOWN_OPS:
        raise ValueError(f"register_kernel: unknown op {op_name!r}; valid ops are {KNOWN_OPS}")
    if backend not in KERNEL_BACKENDS:
        raise ValueError(
            f"register_kernel: unknown backend {backend!r}; valid backends are {KERNEL_BACKENDS}"
        )
    if not callable(fn):
        raise TypeError(f"register_kernel: fn for {op_name!r}/{backend!r} is not callable")
    _REGISTRY[(op_name, backend)] = fn


def unregister_kernel(op_name: str, backend: str) -> None:
    """Remove a registered kernel (no error if none is registered)."""
    _REGISTRY.pop((op_name, backend), None)


def registered_kernel(op_name: str, backend: str) -> Callable[..., Any] | None:
    return _REGISTRY.get((op_name, backend))


def resolve_impl(op: str, impl: str) -> str | Callable[..., Any]:
    """Return "scan", "xla" or a registered kernel callable."""
    if not isinstance(impl, str) or impl not in VALID_IMPLS:
        raise ValueError(f"{op}: unknown impl {impl!r}; valid impls are {', '.join(VALID_IMPLS)}")
    if impl in ("scan", "xla"):
        return impl
    if impl == "auto":
        fn = _REGISTRY.get((op, jax.default_backend()))
        return fn if fn is not None else "xla"
    backend = impl[len("pallas_") :]
    fn = _REGISTRY.get((op, backend))
    if fn is None:
        raise NotImplementedError(
            f"{op}: no Pallas kernel is registered for backend {backend!r} (impl={impl!r}); "
            f"register one with register_kernel({op!r}, {backend!r}, fn) or use impl='xla', "
            "'scan' or 'auto'"
        )
    return fn


# --------------------------------------------------------------------------------------------
# Validation (pure Python on static shapes, so errors surface before any tracing)
# --------------------------------------------------------------------------------------------


def fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ",".join(str(int(s)) for s in shape) + ")"


def shape_of(op: str, name: str, x: Any) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ValueError(f"{op}: {name} must be an array, got {type(x).__name__}")
    return tuple(shape)


def check_floating(op: str, name: str, x: Any) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{op}: {name} must be a floating point array, got dtype {x.dtype}")


def check_time(op: str, shape: tuple[int, ...]) -> None:
    if shape[1] < 1:
        raise ValueError(f"{op}: sequence length T must be >= 1, got q of shape {fmt_shape(shape)}")


def check_chunk_size(op: str, chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be an integer >= 1, got {chunk_size!r}")
    return chunk_size


def check_segment_ids(op: str, segment_ids: Any, batch: int, time: int) -> None:
    if segment_ids is None:
        return
    shape = shape_of(op, "segment_ids", segment_ids)
    if shape != (batch, time):
        raise ValueError(
            f"{op}: segment_ids has shape {fmt_shape(shape)}; expected [B,T]="
            f"{fmt_shape((batch, time))}"
        )
    dtype = jnp.result_type(segment_ids)
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)):
        raise ValueError(f"{op}: segment_ids must be an integer array, got dtype {dtype}")


def check_state(op: str, name: str, state: Any, expected: tuple[int, ...], desc: str) -> None:
    if state is None:
        return
    shape = shape_of(op, name, state)
    if shape != expected:
        raise ValueError(
            f"{op}: {name} has shape {fmt_shape(shape)}; expected {desc}={fmt_shape(expected)}"
        )


def default_scale(scale: Any, dk: int) -> Any:
    return 1.0 / math.sqrt(dk) if scale is None else scale


# --------------------------------------------------------------------------------------------
# Segments, padding, chunking
# --------------------------------------------------------------------------------------------


def segment_resets(segment_ids: Any, batch: int, time: int) -> jax.Array:
    """Bool [B, T]: True at t > 0 where segment_ids[t] != segment_ids[t-1] (state is zeroed
    before token t is processed). All False when segment_ids is None."""
    if segment_ids is None:
        return jnp.zeros((batch, time), dtype=bool)
    seg = jnp.asarray(segment_ids)
    first = jnp.zeros((batch, 1), dtype=bool)
    return jnp.concatenate([first, seg[:, 1:] != seg[:, :-1]], axis=1)


def f32(x: Any) -> jax.Array | None:
    return None if x is None else jnp.asarray(x).astype(jnp.float32)


def pad_time(x: jax.Array, padded: int) -> jax.Array:
    """Zero-pad axis 1 (time) of x up to ``padded``."""
    extra = padded - x.shape[1]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths)


def to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, Tp, H, ...] -> [B, H, N, C, ...] (Tp = N * C)."""
    b, tp, h = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape((b, tp // chunk, chunk, h) + rest)
    return jnp.moveaxis(x, 3, 1)


def from_chunks(x: jax.Array) -> jax.Array:
    """[B, H, N, C, ...] -> [B, N*C, H, ...]."""
    b, h, n, c = x.shape[:4]
    rest = x.shape[4:]
    x = jnp.moveaxis(x, 1, 3)
    return x.reshape((b, n * c, h) + rest)


def chunk_segment_masks(resets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From resets [B, Tp] build per-chunk masks, broadcastable over heads.

    Returns
      from_start [B, 1, N, C]   : token reads the chunk-start state (no reset in [c0, r])
      same_doc   [B, 1, N, C, C]: tokens r and s are in the same document
      causal_same[B, 1, N, C, C]: s <= r and same document
    """
    b, tp = resets.shape
    n = tp // chunk
    r = resets.reshape(b, 1, n, chunk).astype(jnp.int32)
    count = jnp.cumsum(r, axis=-1)
    from_start = count == 0
    same = count[..., :, None] == count[..., None, :]
    causal = jnp.tril(jnp.ones((chunk, chunk), dtype=bool))
    return from_start, same, same & causal


def time_major(x: jax.Array | None) -> jax.Array | None:
    return None if x is None else jnp.moveaxis(x, 1, 0)
