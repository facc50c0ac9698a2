"""Recurrence ops for memzoo (jax / numpy only, never flax).

Layout [batch, time, heads, dim]. Every full-sequence op returns ``(y, final_state)`` and takes
``initial_state, segment_ids, chunk_size, scale, impl`` keywords; ``impl`` is one of "auto",
"scan" (exact lax.scan reference), "xla" (chunked parallel form), "pallas_tpu", "pallas_gpu"
(kernels registered with :func:`register_kernel`).
"""

from .kernels import REGISTERED as _KERNEL_MODULES  # noqa: F401  (registers the kernels)
from .ops import (
    VALID_IMPLS,
    GradientMemorySpec,
    MemoryArch,
    delta_rule,
    delta_rule_step,
    gla,
    gla_step,
    gradient_memory,
    gradient_memory_step,
    hgrn,
    hgrn_step,
    linear_memory,
    register_kernel,
    registered_kernel,
    unregister_kernel,
)

__all__ = [
    "VALID_IMPLS",
    "GradientMemorySpec",
    "MemoryArch",
    "gradient_memory",
    "gradient_memory_step",
    "linear_memory",
    "delta_rule",
    "delta_rule_step",
    "gla",
    "gla_step",
    "hgrn",
    "hgrn_step",
    "register_kernel",
    "registered_kernel",
    "unregister_kernel",
]
