"""Memories: token mixers with a recurrent state, registered by config name."""

from memzoo.memories import gam as _gam  # noqa: F401  (registers gam)
from memzoo.memories import gradient as _gradient  # noqa: F401  (registers the presets)
from memzoo.memories import linear as _linear  # noqa: F401  (registers the presets)
from memzoo.memories import mom as _mom  # noqa: F401  (registers mom)
from memzoo.memories.base import Memory, build_memory, memory_names, register_memory
from memzoo.memories.linear import PRESETS, LinearMemory, LinearMemorySpec

MEMORY_NAMES = tuple(memory_names())

__all__ = [
    "MEMORY_NAMES",
    "PRESETS",
    "LinearMemory",
    "LinearMemorySpec",
    "Memory",
    "build_memory",
    "memory_names",
    "register_memory",
]
