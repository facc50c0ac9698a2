"""Logical axis names for parameters and activations (NNX partitioning metadata).

Every parameter carries one logical name (or ``None``) per dimension in its ``out_sharding``
metadata, e.g. a SwiGLU up-projection kernel ``("embed", "mlp")``. Logical names are mapped to
mesh axes by the rules in the config (``mesh.rules``, see ``configs/base.yaml`` and
:mod:`memzoo.train.sharding`), so models never name mesh axes themselves.

The metadata is set with ``eager_sharding=False``: building a model needs no mesh, and its
parameters are placed by the training loop (``memzoo.train.sharding.param_shardings``).

Logical names (``memzoo.config.ShardingRules`` holds the default rule of each):

=============  =============================================================================
``batch``      activation rows (data parallel: data x fsdp)
``length``     activation time (not sharded: every memory's chunked recurrence is sequential
               over chunks; sharding time needs state passing between shards, kernel work)
``embed``      d_model (FSDP: the model dimension of every weight is sharded over ``fsdp``)
``vocab``      the vocabulary (embedding rows, output head)
``mlp``        the feed-forward hidden dimension
``heads``      fused heads x head-dim projection outputs (q, memory q/k/v, output gates, the
               short conv's channels, output projections' inputs)
``kv_heads``   attention key/value projections (GQA: num_kv_heads x head_dim)
``head_dim``   per-head vectors (the gated output norm's scale)
``gates``      small per-head gate projections (write strength, decay, momentum, ...)
``low_rank``   low-rank bottlenecks of gate projections
``norm``       d_model norm scales and biases
``conv``       short-conv taps
``memories``   MoM routed memories (router outputs)
``slots``      GAM's key(=value) bank slots
``state``      learned initial memory weights of gradient memories (per head)
``persistent`` Titans persistent tokens
``position``   absolute position embedding rows
=============  =============================================================================

Activations are constrained at block boundaries by :func:`constrain` under an
:func:`activation_sharding` context (set by the train step at trace time); outside it
``constrain`` is the identity, so models run unchanged on one device.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Axes = tuple[str | None, ...]


def meta(*names: str | None) -> dict[str, Any]:
    """Variable metadata giving each dimension a logical name (no eager placement)."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


def param(value: jax.Array, *names: str | None) -> nnx.Param:
    """``nnx.Param(value)`` with logical axis names, one per dimension."""
    if len(names) != value.ndim:
        raise ValueError(f"{len(names)} logical axis names for a parameter of shape {value.shape}")
    return nnx.Param(value, **meta(*names))


def dense(in_axis: str | None, out_axis: str | None) -> dict[str, Any]:
    """``nnx.Linear`` keyword arguments naming the kernel ``(in, out)`` and bias ``(out,)``."""
    return {"kernel_metadata": meta(in_axis, out_axis), "bias_metadata": meta(out_axis)}


def logical_axes(var: Any) -> Axes | None:
    """The logical names of a Variable (None when it has none)."""
    get = getattr(var, "get_metadata", None)
    if get is None:
        return None
    names = get().get("out_sharding")
    return tuple(names) if names is not None else None


def resolve(names: Sequence[str | None], rules: Mapping[str, Any]) -> P:
    """PartitionSpec of logical ``names`` under ``rules`` (logical -> None | axis | [axes]).

    A logical name without a rule is replicated."""
    out: list[Any] = []
    for n in names:
        target = None if n is None else rules.get(n)
        if target is None:
            out.append(None)
        elif isinstance(target, str):
            out.append(target)
        else:
            t = tuple(target)
            out.append(None if not t else t[0] if len(t) == 1 else t)
    return P(*out)


class _Active(threading.local):
    mesh: Any = None
    rules: Mapping[str, Any] | None = None


_ACTIVE = _Active()


@contextlib.contextmanager
def activation_sharding(mesh: Any, rules: Mapping[str, Any] | None) -> Iterator[None]:
    """Within this context (at trace time), :func:`constrain` pins activations to ``mesh``."""
    prev = (_ACTIVE.mesh, _ACTIVE.rules)
    _ACTIVE.mesh, _ACTIVE.rules = mesh, rules
    try:
        yield
    finally:
        _ACTIVE.mesh, _ACTIVE.rules = prev


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to the logical ``names`` (identity outside
    :func:`activation_sharding`, or when a sharded dim does not divide)."""
    mesh, rules = _ACTIVE.mesh, _ACTIVE.rules
    if mesh is None or rules is None:
        return x
    spec = resolve(names, rules)
    for size, axes in zip(x.shape, spec, strict=True):
        if axes is None:
            continue
        n = 1
        for a in (axes,) if isinstance(axes, str) else axes:
            n *= mesh.shape[a]
        if size % n:
            return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# --------------------------------------------------------------------------------------------
# Pallas kernels under shard_map
# --------------------------------------------------------------------------------------------

# Which dimension of each op argument is the batch / the heads, by argument role.
_TIME = "time"  # [B, T, H, ...]: q, k, v and per-token gates
_SEG = "seg"  # [B, T]: segment ids
_STATE = "state"  # [B, H, ...]: recurrent states (and the gradient memory's weight dicts)
_POS = "pos"  # [B]: the gradient memory's position in the chunk
_PARAM = "param"  # [H, ...]: the gradient memory's reset weights


def _role_spec(role: str, ndim: int, batch: Any, heads: Any) -> P:
    lead = {
        _TIME: (batch, None, heads),
        _SEG: (batch, None),
        _STATE: (batch, heads),
        _POS: (batch,),
        _PARAM: (heads,),
    }[role]
    return P(*lead[:ndim], *([None] * max(0, ndim - len(lead))))


def _state_roles(state: Any) -> Any:
    if state is None:
        return None
    if isinstance(state, Mapping):  # the gradient memory's state dict
        return {
            k: (_POS if k == "pos" else jax.tree.map(lambda _: _STATE, v)) for k, v in state.items()
        }
    return _STATE


def _mesh_axes(rules: Mapping[str, Any], name: str, mesh: Any, size: int) -> Any:
    axes = rules.get(name)
    if axes is None:
        return None
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    n = 1
    for a in names:
        n *= mesh.shape[a]
    if n == 1 or size % n:
        return None  # replicated (or not divisible: let the kernel see the whole dim)
    return names if len(names) > 1 else names[0]


def kernel_op(op: Any, args: tuple, kwargs: dict) -> Any:
    """Call a ``pallas_kernels`` op (``gla``, ``delta_rule``, ``hgrn``, ``gradient_memory``).

    A Pallas kernel is opaque to GSPMD, so when a mesh is active (:func:`activation_sharding`)
    and the call will run a kernel (``impl`` "pallas_*", or "auto" on a backend with a kernel
    that supports the call), it runs under ``jax.shard_map``: batch rows over the ``batch``
    rule's mesh axes and heads over the ``heads`` rule's, every device running the kernel on
    its block. Otherwise (no mesh, or an XLA impl) the op is called directly and GSPMD
    partitions it."""
    from pallas_kernels.ops._common import resolve_impl

    mesh, rules = _ACTIVE.mesh, _ACTIVE.rules
    name = op.__name__
    if mesh is None or rules is None:
        return op(*args, **kwargs)
    bound = inspect.signature(op).bind(*args, **kwargs)
    bound.apply_defaults()
    full = dict(bound.arguments)
    impl = full.pop("impl")
    full.pop("interpret", None), full.pop("block_v", None)
    positional = tuple(full.pop(n) for n in list(full)[: len(args)])
    try:
        which = resolve_impl(name, impl, positional, full)
    except (ValueError, NotImplementedError):
        return op(*args, **kwargs)  # the op raises the same error with its own message
    if not callable(which):
        return op(*args, **kwargs)
    q = args[0]
    batch = _mesh_axes(rules, "batch", mesh, q.shape[0])
    heads = _mesh_axes(rules, "heads", mesh, q.shape[2])
    if batch is None and heads is None:
        return op(*args, **kwargs)

    # split arrays (sharded inputs) from static keywords (spec, chunk_size, impl, ...)
    arrays: dict[str, Any] = {}
    roles: dict[str, Any] = {}
    static: dict[str, Any] = {}
    for i, a in enumerate(args):
        arrays[f"arg{i}"], roles[f"arg{i}"] = a, None if a is None else _TIME
    for k, v in kwargs.items():
        if k == "segment_ids":
            arrays[k], roles[k] = v, None if v is None else _SEG
        elif k == "initial_state":
            arrays[k], roles[k] = v, _state_roles(v)
        elif k == "params":
            arrays[k], roles[k] = v, None if v is None else jax.tree.map(lambda _: _PARAM, v)
        elif k in ("mu", "log_a", "gamma", "delta"):
            arrays[k], roles[k] = v, None if v is None else _TIME
        else:
            static[k] = v

    def specs(tree: Any, role_tree: Any) -> Any:
        return jax.tree.map(
            lambda x, r: _role_spec(r, x.ndim, batch, heads),
            tree,
            role_tree,
            is_leaf=lambda x: x is None,
        )

    def local(arrs: dict[str, Any]) -> Any:
        pos = [arrs[f"arg{i}"] for i in range(len(args))]
        kw = {k: v for k, v in arrs.items() if not k.startswith("arg")}
        return op(*pos, **kw, **static)

    present = {k: v for k, v in arrays.items() if v is not None}
    in_specs = specs(present, {k: roles[k] for k in present})
    out_shape = jax.eval_shape(local, present)
    y_shape, state_shape = out_shape
    out_specs = (
        _role_spec(_TIME, y_shape.ndim, batch, heads),
        jax.tree.map(
            lambda x, r: _role_spec(r, x.ndim, batch, heads), state_shape, _state_roles(state_shape)
        ),
    )
    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=(in_specs,), out_specs=out_specs, check_vma=False
    )
    return mapped(present)
