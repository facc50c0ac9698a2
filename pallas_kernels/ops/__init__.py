"""Recurrence ops: regime A (gla), regime B (delta_rule) and HGRN, with step / scan / chunked
implementations and a dispatcher for registered Pallas kernels."""

from ._common import VALID_IMPLS, register_kernel, registered_kernel, unregister_kernel
from .delta_rule import delta_rule, delta_rule_step
from .gla import gla, gla_step
from .hgrn import hgrn, hgrn_step

__all__ = [
    "VALID_IMPLS",
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
