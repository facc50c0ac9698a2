"""Lower, export and compile kernels for a TPU or GPU target from any host (a CPU laptop or CI).

Three levels, from cheapest to most thorough:

- :func:`export_for` runs ``jax.export`` for ``platforms=["tpu"]`` or ``["cuda"]``: the kernel is
  lowered through Mosaic TPU / Triton, which checks block shapes and the kernel body's ops.
- :func:`tpu_devices` + :func:`compile_for_tpu` compile for a real TPU topology (e.g.
  ``"v5e:2x2"``) with ``libtpu``: Mosaic really compiles the kernel and reports VMEM overflows,
  and ``memory_analysis()`` gives the footprint. This needs the ``libtpu`` wheel that matches
  the installed jax (:func:`libtpu_requirement`), importable in this process; ``make tpu-tools``
  installs it into ``.venv/libtpu`` (put that directory on PYTHONPATH, see :func:`libtpu_dir`).

Only jax is used here (never flax).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
# accelerator-type names libtpu expects for the generations it can compile for
_ACCELERATOR = {"v4": "v4-8", "v5e": "v5litepod-4", "v5p": "v5p-8", "v6e": "v6e-4"}


def export_for(fn: Callable[..., Any], *args: Any, platform: str) -> jax.export.Exported:
    """``jax.export`` of ``jax.jit(fn)(*args)`` for ``platform`` ("tpu" or "cuda"); ``args`` may
    be ``jax.ShapeDtypeStruct``s. Triton custom calls carry no compatibility guarantee, so the
    cuda export disables that one check."""
    if platform not in ("tpu", "cuda"):
        raise ValueError(f"export_for: platform must be 'tpu' or 'cuda', got {platform!r}")
    checks = []
    if platform == "cuda":
        checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)


def libtpu_requirement() -> str:
    """The libtpu requirement of the installed jax's ``tpu`` extra, e.g. "libtpu==0.0.42.*"."""
    for req in importlib.metadata.requires("jax") or []:
        name, _, marker = req.partition(";")
        if name.strip().startswith("libtpu") and "tpu" in marker:
            return name.strip().replace(" ", "")
    raise RuntimeError("the installed jax declares no libtpu requirement in its 'tpu' extra")


def libtpu_dir() -> Path:
    """Where ``make tpu-tools`` installs libtpu (``$MEMZOO_LIBTPU_DIR`` or ``.venv/libtpu``
    beside the running interpreter's environment)."""
    env = os.environ.get("MEMZOO_LIBTPU_DIR")
    if env:
        return Path(env)
    import sys

    return Path(sys.prefix) / "libtpu"


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: str = "v5e:2x2") -> list[Any]:
    """The devices of a TPU topology such as "v5e:2x2", "v6e:4x4" or "v5p:4x4x4", for
    ahead-of-time compilation on a host without TPUs."""
    if not libtpu_available():
        raise RuntimeError(
            f"compiling for TPU topology {topology!r} needs the libtpu package that matches "
            f"jax {jax.__version__} ({libtpu_requirement()}); install it with `make tpu-tools` "
            f"and put {libtpu_dir()} on PYTHONPATH"
        )
    generation = topology.split(":", 1)[0]
    if generation not in _ACCELERATOR or ":" not in topology:
        raise ValueError(
            f"unknown TPU topology {topology!r}; expected <generation>:<shape> with generation "
            f"in {sorted(_ACCELERATOR)}, e.g. 'v5e:2x2' or 'v5p:4x4x4'"
        )
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _ACCELERATOR[generation])
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


def compile_for_tpu(
    fn: Callable[..., Any],
    *args: jax.ShapeDtypeStruct,
    topology: str = "v5e:2x2",
    batch_axes: Sequence[int | None] | None = None,
) -> Any:
    """Compile ``fn(*args)`` for every chip of ``topology``, each running ``fn`` on its slice of
    the batch inside ``shard_map`` (how a Pallas kernel runs on a multi-device mesh).

    ``args`` are ShapeDtypeStructs of the *global* arrays (pytrees allowed); ``batch_axes[i]``
    is the axis of argument i split over the chips (default 0; None = replicated). Outputs are
    split on axis 0. Returns the ``jax.stages.Compiled`` (``memory_analysis()``,
    ``cost_analysis()``)."""
    devices = tpu_devices(topology)
    mesh = Mesh(devices, ("chips",))
    axes = [0] * len(args) if batch_axes is None else list(batch_axes)

    def spec(axis: int | None, ndim: int) -> P:
        if axis is None:
            return P()
        return P(*([None] * axis + ["chips"] + [None] * (ndim - axis - 1)))

    in_specs = tuple(
        jax.tree.map(lambda s, a=a: spec(a, len(s.shape)), x) for x, a in zip(args, axes)
    )
    sharded = tuple(
        jax.tree.map(
            lambda s, a=a: jax.ShapeDtypeStruct(
                s.shape, s.dtype, sharding=NamedSharding(mesh, spec(a, len(s.shape)))
            ),
            x,
        )
        for x, a in zip(args, axes)
    )
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P("chips"), check_vma=False)
    return jax.jit(mapped).lower(*sharded).compile()


__all__ = [
    "TRITON_CUSTOM_CALL",
    "compile_for_tpu",
    "export_for",
    "libtpu_available",
    "libtpu_dir",
    "libtpu_requirement",
    "tpu_devices",
]
