"""Suite-wide setup: make a libtpu installed by `make tpu-tools` importable, so tests marked
``tpu_compile`` can compile for real TPU topologies from this CPU host (they skip otherwise)."""

import sys

from pallas_kernels.aot import libtpu_available, libtpu_dir

if not libtpu_available() and (libtpu_dir() / "libtpu").is_dir():
    sys.path.insert(0, str(libtpu_dir()))


def pytest_collection_modifyitems(config, items):
    import pytest

    if libtpu_available():
        return
    skip = pytest.mark.skip(reason="libtpu is not installed (make tpu-tools)")
    for item in items:
        if "tpu_compile" in item.keywords:
            item.add_marker(skip)
