"""Shared machinery for the recurrence ops: validation, padding, chunking, segment masks and
implementation dispatch (including the registry of Pallas kernels).

Only jax / numpy are used here (never flax).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

VALID_IMPLS: tuple[str, ...] = ("auto", "scan", "xla", "pallas_tpu", "pallas_gpu")
KERNEL_BACKENDS: tuple[str, ...] = ("tpu", "gpu")
KNOWN_OPS: tuple[str, ...] = ("gla", "delta_rule", "hgrn", "gradient_memory")

_REGISTRY: dict[tuple[str, str], Kernel] = {}
_LOGGED: set[tuple[str, str, str]] = set()
log = logging.getLogger("pallas_kernels")

NEG_INF = -jnp.inf


# --------------------------------------------------------------------------------------------
# Kernel registry and dispatch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """A registered kernel: ``fn`` computes the op; ``supports`` (optional) takes the same
    arguments and returns None when ``fn`` handles the call, else a short reason naming what
    is unsupported (e.g. "dk=48 is not a multiple of 16")."""

    fn: Callable[..., Any]
    supports: Callable[..., str | None] | None = None

    def unsupported(self, args: tuple, kwargs: dict) -> str | None:
        return None if self.supports is None else self.supports(*args, **kwargs)


def register_kernel(
    op_name: str,
    backend: str,
    fn: Callable[..., Any],
    *,
    supports: Callable[..., str | None] | None = None,
) -> None:
    """Register a (Pallas) kernel for ``op_name`` on ``backend`` ("tpu" or "gpu").

    ``fn`` is called with the op's positional array arguments (e.g. ``q, k, v, log_a`` for
    ``gla``) and the op's keyword arguments (``initial_state, segment_ids, chunk_size, scale``
    for the matrix-state ops; already validated and passed through unchanged, so ``scale`` may
    be None), plus ``interpret=`` and ``block_v=`` when the caller set them. It must return
    ``(y, final_state)`` with the same semantics as the op's "scan" implementation.
    ``supports`` takes the same arguments (without interpret / block_v) and returns None or
    the reason the kernel cannot run the call. Registering again replaces the previous kernel.
    """
    if op_name not in KNOWN_OPS:
        raise ValueError(f"register_kernel: unknown op {op_name!r}; valid ops are {KNOWN_OPS}")
    if backend not in KERNEL_BACKENDS:
        raise ValueError(
            f"register_kernel: unknown backend {backend!r}; valid backends are {KERNEL_BACKENDS}"
        )
    if not callable(fn):
        raise TypeError(f"register_kernel: fn for {op_name!r}/{backend!r} is not callable")
    _REGISTRY[(op_name, backend)] = Kernel(fn, supports)


def unregister_kernel(op_name: str, backend: str) -> None:
    """Remove a registered kernel (no error if none is registered)."""
    _REGISTRY.pop((op_name, backend), None)


def registered_kernel(op_name: str, backend: str) -> Callable[..., Any] | None:
    k = _REGISTRY.get((op_name, backend))
    return None if k is None else k.fn


def _log_once(op: str, choice: str, why: str) -> None:
    key = (op, choice, why)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("%s: impl='auto' chose %s (%s)", op, choice, why)


def resolve_impl(
    op: str,
    impl: str,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    interpret: Any = False,
    block_v: int | None = None,
) -> str | Callable[[], Any]:
    """Pick the implementation of one call: "scan", "xla", or a zero-argument callable that
    runs the registered kernel on ``args`` / ``kwargs``.

    "auto" takes the kernel registered for ``jax.default_backend()`` when it supports the call,
    else "xla", and logs the choice once. "pallas_tpu" / "pallas_gpu" use that backend's kernel
    whatever the host (so kernels can be exported from a CPU machine) and raise
    NotImplementedError naming what is unsupported. ``interpret`` (True, or
    ``pltpu.InterpretParams(...)`` for TPU kernels) runs the kernel in Pallas interpret mode and
    needs an explicit Pallas impl."""
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(impl, str) or impl not in VALID_IMPLS:
        raise ValueError(f"{op}: unknown impl {impl!r}; valid impls are {', '.join(VALID_IMPLS)}")
    if interpret is not False and interpret is not None and not impl.startswith("pallas_"):
        raise ValueError(
            f"{op}: interpret=... runs a Pallas kernel in interpret mode; it needs "
            f"impl='pallas_tpu' or 'pallas_gpu', got impl={impl!r}"
        )
    if block_v is not None and (isinstance(block_v, bool) or not isinstance(block_v, int)):
        raise ValueError(f"{op}: block_v must be a positive integer or None, got {block_v!r}")
    if block_v is not None and block_v < 1:
        raise ValueError(f"{op}: block_v must be a positive integer or None, got {block_v!r}")
    if impl in ("scan", "xla"):
        return impl
    extra: dict[str, Any] = {}
    if interpret is not False and interpret is not None:
        extra["interpret"] = interpret
    if block_v is not None:
        extra["block_v"] = block_v
    if impl == "auto":
        backend = jax.default_backend()
        kernel = _REGISTRY.get((op, backend))
        if kernel is None:
            _log_once(op, "xla", f"no Pallas kernel for backend {backend!r}")
            return "xla"
        reason = kernel.unsupported(args, kwargs)
        if reason is not None:
            _log_once(op, "xla", f"the {backend} kernel does not support this call: {reason}")
            return "xla"
        _log_once(op, f"pallas_{backend}", "kernel supports the call")
        return lambda: kernel.fn(*args, **kwargs, **extra)
    backend = impl[len("pallas_") :]
    kernel = _REGISTRY.get((op, backend))
    if kernel is None:
        raise NotImplementedError(
            f"{op}: no Pallas kernel is registered for backend {backend!r} (impl={impl!r}); "
            f"register one with register_kernel({op!r}, {backend!r}, fn) or use impl='xla', "
            "'scan' or 'auto'"
        )
    reason = kernel.unsupported(args, kwargs)
    if reason is not None:
        raise NotImplementedError(
            f"{op}: impl={impl!r} does not support this call: {reason}; use impl='xla' "
            "(or 'auto', which falls back to it)"
        )
    return lambda: kernel.fn(*args, **kwargs, **extra)


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


INV_BLOCK = 8  # diagonal block of the triangular inverse (a power of two)


def unit_lower_inverse(
    a: jax.Array,
    block: int = INV_BLOCK,
    mm: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """(I + A)^{-1} for strictly lower-triangular A [..., C, C], by blocked forward substitution.

    The ``block`` x ``block`` diagonal blocks D (``block`` a power of two) are nilpotent of
    order ``block``, so their inverse is the doubling product (I - D)(I + D^2)(I + D^4)...,
    whose partial sums grow at most like binomial(block - 1, i) (harmless at 8). The block
    rows below are then solved in order, T = T_D - (T_D E) T (E = A off the diagonal blocks):
    one C x C matmul per block row, its result kept on that row only (row block i of
    (T_D E) T needs only the finished rows < i). Matmuls, iotas and masks only (no slicing,
    no integer division), so the same code runs in XLA, Mosaic TPU and Triton kernels;
    ``mm`` is the matmul (default: ``jnp.matmul`` at HIGHEST precision, batched over the
    leading dims; kernels pass their 2-D fp32-accumulating dot).

    choice: not the doubling product over the whole chunk: the powers of A in its partial sums
    grow like binomial(C - 1, i) and cancel catastrophically in fp32 when keys repeat inside a
    chunk (C = 64, two distinct unit keys, eta = 0.99: y off by ~10x). Not
    jax.scipy.linalg.solve_triangular either, whose gradient intermittently deadlocked on the
    CPU backend of jaxlib 0.10.2 in the train step, and which Pallas kernels cannot call.
    """
    if block < 1 or block & (block - 1):
        raise ValueError(f"unit_lower_inverse: block must be a power of two, got {block}")
    if mm is None:

        def mm(x, y):
            return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)

    c = a.shape[-1]
    shift = block.bit_length() - 1
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    rb = jax.lax.shift_right_logical(rows, shift)
    diag = rb == jax.lax.shift_right_logical(cols, shift)

    def doubling(d, span_max):
        t = jnp.where(rows == cols, 1.0, 0.0).astype(d.dtype) - d
        p = mm(d, d)
        span = 2
        while span < span_max:
            t = t + mm(p, t)
            span *= 2
            if span < span_max:
                p = mm(p, p)
        return t

    if c <= block:
        return doubling(a, c)
    t_d = doubling(jnp.where(diag, a, 0.0), block)
    t_de = mm(t_d, jnp.where(diag, 0.0, a))
    t = t_d
    for i in range(1, -(-c // block)):
        t = jnp.where(rb == i, t_d - mm(t_de, t), t)
    return t
