"""Device mesh and shardings from the config (GSPMD: jit with in/out shardings).

Mesh axes are ``("data", "fsdp", "tensor")``. Each has a size within a slice (``mesh.data``,
``mesh.fsdp``, ``mesh.tensor``; ICI) and across slices (``mesh.dcn_data``, ...; DCN); the
axis's size is the product. One ICI size may be -1: it takes the remaining devices.

Parameters carry logical axis names (``memzoo.layers.partitioning``); ``mesh.rules`` maps
them to mesh axes (defaults: embed -> fsdp; vocab, mlp, heads, kv_heads -> tensor; batch ->
(data, fsdp); everything else replicated). Optimizer state is sharded like the parameters
it mirrors; scalars (step counts) are replicated. The batch is split over the ``batch`` rule.

There is no sequence axis: every memory's training form is a chunked recurrence that is
sequential over chunks, so sharding time would need the chunk states passed between devices
(a two-pass or ring scan inside the kernels); under GSPMD a time-sharded input is only
all-gathered. Memories run under GSPMD; :func:`kernel_partition_spec` gives the specs a
``shard_map``-wrapped kernel would use (batch over the batch rule, heads over ``heads``).

Everything is validated once, before anything is placed, with one-line errors: an unknown
mesh axis in a rule (config validation), sizes that do not multiply to the device count, a
batch that does not split, and a parameter dimension its mesh axes do not divide (named).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memzoo.config import MESH_AXES, Config, ConfigError
from memzoo.layers.partitioning import logical_axes, resolve

__all__ = [
    "MESH_AXES",
    "batch_sharding",
    "batch_spec",
    "build_mesh",
    "kernel_partition_spec",
    "mesh_sizes",
    "opt_shardings",
    "param_shardings",
    "param_specs",
    "rules",
    "shard_train_state",
    "validate_shardings",
]


def rules(cfg: Config) -> dict[str, Any]:
    """The logical -> mesh axis rules of the config, as a plain dict."""
    return {f.name: getattr(cfg.mesh.rules, f.name) for f in dataclasses.fields(cfg.mesh.rules)}


def mesh_sizes(cfg: Config, n_devices: int) -> tuple[list[int], list[int]]:
    """(ICI sizes, DCN sizes) per mesh axis for ``n_devices`` devices, the -1 filled."""
    m = cfg.mesh
    ici = [getattr(m, a) for a in MESH_AXES]
    dcn = [getattr(m, f"dcn_{a}") for a in MESH_AXES]
    if ici.count(-1) > 1:
        raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    n_dcn = math.prod(dcn)
    if n_devices % n_dcn:
        raise ConfigError(
            f"mesh: {n_devices} devices are not divisible by the DCN sizes "
            f"dcn_data*dcn_fsdp*dcn_tensor = {n_dcn}"
        )
    per_slice = n_devices // n_dcn
    known = math.prod(s for s in ici if s != -1)
    if -1 in ici:
        if per_slice % known:
            axis = MESH_AXES[ici.index(-1)]
            raise ConfigError(
                f"mesh: {per_slice} devices per slice are not divisible by {known} "
                f"(the product of the other ICI sizes), so mesh.{axis}=-1 cannot be filled"
            )
        ici[ici.index(-1)] = per_slice // known
    if math.prod(ici) != per_slice:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {math.prod(ici)} but there are {per_slice} devices per "
            f"slice ({n_devices} devices, {n_dcn} slices)"
        )
    return ici, dcn


def build_mesh(cfg: Config, devices: Sequence[Any] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default ``jax.devices()``).

    Without DCN axes: ``jax.make_mesh`` (topology-aware on TPU). With DCN axes: a hybrid mesh
    (``mesh_utils.create_hybrid_device_mesh``; slices are the devices' ``slice_index``, or the
    processes when devices have none, e.g. multi-process CPU); on a single process without
    slices (tests) the devices are laid out slice-major in their given order."""
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = mesh_sizes(cfg, len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn) == 1:
        return jax.make_mesh(tuple(ici), MESH_AXES, types, devices=devices)
    has_slices = all(getattr(d, "slice_index", None) is not None for d in devices)
    n_slices = len({d.slice_index for d in devices}) if has_slices else 1
    n_procs = len({d.process_index for d in devices})
    if n_slices > 1 or n_procs > 1:
        arr = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=n_slices <= 1
        )
    else:  # one slice, one process: simulate slices by device order (slice-major)
        arr = np.asarray(devices, dtype=object).reshape(*dcn, *ici)
        k = len(MESH_AXES)
        arr = arr.transpose([j for i in range(k) for j in (i, k + i)])
        arr = arr.reshape([d * i for d, i in zip(dcn, ici, strict=True)])
    return Mesh(arr, MESH_AXES, axis_types=types)


def batch_spec(cfg: Config | None = None) -> P:
    """PartitionSpec of a ``[batch, time]`` array (time unsharded)."""
    r = rules(cfg) if cfg is not None else {"batch": ["data", "fsdp"]}
    return resolve(("batch", "length"), r)


def batch_sharding(mesh: Mesh, cfg: Config | None = None) -> NamedSharding:
    """Sharding of ``[batch, time]`` inputs: rows over the ``batch`` rule (data x fsdp)."""
    return NamedSharding(mesh, batch_spec(cfg))


def _path_name(path: Sequence[Any]) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _spec_of(var: Any, r: Mapping[str, Any]) -> P:
    names = logical_axes(var)
    if names is None:
        return P()
    return resolve(names, r)


def param_specs(state: Any, cfg: Config) -> Any:
    """PartitionSpec per leaf of ``state`` (an ``nnx.State`` of Variables, or a tree holding
    such states, like an optax state); leaves without logical names are replicated."""
    r = rules(cfg)
    return jax.tree.map(
        lambda v: v.replace(_spec_of(v, r)) if _is_var(v) else P(), state, is_leaf=_is_var
    )


def param_shardings(mesh: Mesh, state: Any, cfg: Config) -> Any:
    """NamedSharding per leaf of ``state``, matching its structure (Variables stay Variables,
    holding the sharding), for ``jax.device_put`` and ``jax.jit`` in/out shardings."""
    r = rules(cfg)

    def one(v):
        spec = _spec_of(v, r) if _is_var(v) else P()
        sh = NamedSharding(mesh, spec)
        return v.replace(sh) if _is_var(v) else sh

    return jax.tree.map(one, state, is_leaf=_is_var)


def opt_shardings(mesh: Mesh, opt_state: Any, cfg: Config) -> Any:
    """Optimizer state sharded like the parameters it mirrors (optax keeps the Variables, and
    so their logical names, in moment trees); counts and other scalars are replicated."""
    return param_shardings(mesh, opt_state, cfg)


def validate_shardings(mesh: Mesh, state: Any, cfg: Config) -> None:
    """One-line ConfigError for a parameter dim its mesh axes do not divide, a mesh axis used
    twice by one parameter, or a batch that the batch axes do not split."""
    r = rules(cfg)
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]
    for path, v in flat:
        if not _is_var(v):
            continue
        names = logical_axes(v)
        shape = getattr(v, "shape", None) or np.shape(v[...])
        name = _path_name(path)
        if names is None:
            continue
        if len(names) != len(shape):
            raise ConfigError(
                f"parameter {name}: {len(names)} logical axis names {names} for shape {shape}"
            )
        spec = resolve(names, r)
        used: list[str] = []
        for dim, (size, axes, logical) in enumerate(zip(shape, spec, names, strict=True)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            for a in axes:
                if a in used:
                    raise ConfigError(
                        f"parameter {name}: mesh axis '{a}' shards two dimensions "
                        f"({names}); change mesh.rules"
                    )
                used.append(a)
            n = math.prod(mesh.shape[a] for a in axes)
            if size % n:
                sizes = "*".join(f"{a}={mesh.shape[a]}" for a in axes)
                raise ConfigError(
                    f"parameter {name} {tuple(shape)}: dim {dim} ('{logical}' -> "
                    f"{'/'.join(axes)}) of size {size} is not divisible by {sizes}; change the "
                    f"mesh sizes or mesh.rules.{logical}"
                )
    bspec = batch_spec(cfg)[0]
    if bspec is not None:
        axes = (bspec,) if isinstance(bspec, str) else tuple(bspec)
        n = math.prod(mesh.shape[a] for a in axes)
        if cfg.batch_size % n:
            raise ConfigError(
                f"batch_size={cfg.batch_size} is not divisible by the batch axes "
                f"{'*'.join(axes)}={n}"
            )


def shard_train_state(
    mesh: Mesh, params: Any, opt_state: Any, cfg: Config
) -> tuple[Any, Any, Any, Any]:
    """Place params and optimizer state as the rules say; returns
    ``(params, opt_state, param_shardings, opt_shardings)``."""
    p_sh = param_shardings(mesh, params, cfg)
    o_sh = opt_shardings(mesh, opt_state, cfg)
    return jax.device_put(params, p_sh), jax.device_put(opt_state, o_sh), p_sh, o_sh


def kernel_partition_spec(mesh: Mesh, cfg: Config) -> dict[str, P]:
    """Specs for a memory kernel under ``shard_map`` (from the same rules): ``qkv`` for
    ``[B, T, H, d]`` inputs, ``gates`` for ``[B, T, H]``, ``state`` for ``[B, H, dk, dv]``.
    Today memories run under GSPMD and nothing calls this; kernels that need ``shard_map``
    (Pallas) take their specs from here."""
    del mesh
    r = rules(cfg)
    return {
        "qkv": resolve(("batch", "length", "heads", None), r),
        "gates": resolve(("batch", "length", "heads"), r),
        "state": resolve(("batch", "heads", None, None), r),
    }
