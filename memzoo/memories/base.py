"""The recurrence abstraction every memory shares (SPEC section 1).

A memory turns per-token queries, keys and values (already projected, convolved and activated
by the layer around it) plus per-token gates into outputs, carrying a recurrent state. It
declares three things:

* ``init_state(batch)``: the state it carries (fp32), e.g. S in R^{H x dk x dv};
* ``parallel(...)``: the training form over a whole sequence (an op from ``pallas_kernels``:
  chunked, scan reference or a kernel, picked by ``impl``);
* ``step(...)``: one token with O(1) state, what generation uses.

``features`` computes the gates from the layer input and applies the rule's feature maps
(e.g. L2-normalised q, k for delta rules). Both execution paths take the same gates, so
``parallel`` over T tokens equals T calls of ``step`` (tested in the contract suite).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

Array = jax.Array
Gates = dict[str, Array]


class Memory(nnx.Module):
    """Base class: a token mixer with a recurrent state. Subclasses fill in the four methods."""

    uses_key: bool = True

    def features(self, x: Array, q: Array, k: Array, v: Array) -> tuple[Array, Array, Array, Gates]:
        raise NotImplementedError

    def parallel(
        self,
        q: Array,
        k: Array,
        v: Array,
        gates: Gates,
        *,
        initial_state: Any = None,
        segment_ids: Array | None = None,
    ) -> tuple[Array, Any]:
        raise NotImplementedError

    def step(self, q: Array, k: Array, v: Array, gates: Gates, state: Any) -> tuple[Array, Any]:
        raise NotImplementedError

    def init_state(self, batch_size: int) -> Any:
        raise NotImplementedError


_REGISTRY: dict[str, Callable[..., Memory]] = {}


def register_memory(name: str, factory: Callable[..., Memory]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"memory '{name}' is already registered")
    _REGISTRY[name] = factory


def memory_names() -> list[str]:
    return sorted(_REGISTRY)


def build_memory(name: str, **kwargs: Any) -> Memory:
    if name not in _REGISTRY:
        raise ValueError(f"unknown memory '{name}'; known: {', '.join(memory_names())}")
    return _REGISTRY[name](**kwargs)


def kernel_kwargs(options: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """Keyword arguments for the ops from ``model.kernel_block_v`` / ``model.kernel_interpret``
    (``{"block_v": int, "interpret": bool}``); only the ones that are set, so XLA impls never
    see them. A tuple of items (a module's static attributes must be hashable)."""
    options = dict(options or {})
    unknown = set(options) - {"block_v", "interpret"}
    if unknown:
        raise ValueError(f"kernel_options: unknown keys {sorted(unknown)}")
    out: dict[str, Any] = {}
    if options.get("block_v"):
        out["block_v"] = int(options["block_v"])
    if options.get("interpret"):
        out["interpret"] = True
    return tuple(sorted(out.items()))
