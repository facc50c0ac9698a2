"""Recurrence ops: regime A (gla), regime B (delta_rule), HGRN and regime C
(gradient_memory), with step / scan / chunked implementations and a dispatcher for
registered Pallas kernels."""

from ._common import VALID_IMPLS, register_kernel, registered_kernel, unregister_kernel
from .delta_rule import delta_rule, delta_rule_step
from .gla import gla, gla_step
from .gradient_memory import (
    GradientMemorySpec,
    MemoryArch,
    gradient_memory,
    gradient_memory_step,
    linear_memory,
)
from .hgrn import hgrn, hgrn_step

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
