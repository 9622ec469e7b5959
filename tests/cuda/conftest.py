"""The CUDA suite: runs in the simulator (NUMBA_ENABLE_CUDASIM=1, in its own pytest process,
since the variable must be set before numba is imported) or on a real GPU; skipped otherwise.

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/reference.py


def pytest_configure(config):
    # In the simulator, dropout's generator multiplies 32-bit words held in NumPy int64 scalars:
    # the product wraps, as on a GPU, and only its low 32 bits are kept (the masks equal the
    # CPU's, which the tests check), but NumPy warns about the wrap.
    config.addinivalue_line(
        "filterwarnings", "ignore:overflow encountered in scalar multiply:RuntimeWarning")


def pytest_collection_modifyitems(config, items):
    import fastdl as fd

    if fd.cuda_available():
        return
    skip = pytest.mark.skip(reason="no GPU; run with NUMBA_ENABLE_CUDASIM=1 for the simulator")
    for item in items:
        if "tests/cuda" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_counter():
    """Each test starts with a zeroed launch counter (tests read it to prove the GPU ran)."""
    from fastdl.kernels import cudalib

    cudalib.LAUNCHES.clear()
