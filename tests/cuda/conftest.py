"""The CUDA suite: runs in the simulator (NUMBA_ENABLE_CUDASIM=1, in its own pytest process,
since the variable must be set before numba is imported) or on a real GPU; skipped otherwise.

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/reference.py


def pytest_collection_modifyitems(config, items):
    import fastdl as fd

    if fd.cuda_available():
        return
    skip = pytest.mark.skip(reason="no GPU; run with NUMBA_ENABLE_CUDASIM=1 for the simulator")
    for item in items:
        if "tests/cuda" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)
