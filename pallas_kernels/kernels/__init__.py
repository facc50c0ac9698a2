"""Pallas kernels behind the ops' ``impl="pallas_tpu"`` / ``"pallas_gpu"``.

One module per op and backend (``<op>_tpu.py``: Mosaic TPU, ``<op>_gpu.py``: the Triton
backend). Every module here defines ``register()``, which registers its kernel (and the
``supports`` check saying which calls it handles) with :func:`pallas_kernels.register_kernel`;
importing this package registers them all. Only jax is used here (never flax).
"""

from __future__ import annotations

import importlib
import pkgutil


def register_all() -> list[str]:
    """Import every kernel module in this package and call its ``register()``; returns the
    module names."""
    names = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register()
            names.append(info.name)
    return names


REGISTERED = register_all()
