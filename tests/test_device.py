"""Device selection: the thin API that decides where buffers go."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastdl as fd
from fastdl import device


@pytest.fixture(autouse=True)
def restore_device():
    previous = device._requested
    yield
    device._requested = previous


def run_python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_cpu_selection_and_context_manager():
    fd.set_device("cpu")
    assert fd.get_device() == "cpu"
    with fd.use_device("auto"):
        assert fd.get_device() == ("cuda" if fd.cuda_available() else "cpu")
    assert fd.get_device() == "cpu"


def test_context_manager_restores_after_an_error():
    fd.set_device("cpu")
    with pytest.raises(RuntimeError), fd.use_device("auto"):
        raise RuntimeError("inside")
    assert fd.get_device() == "cpu"


def test_unknown_device_names():
    with pytest.raises(ValueError, match="one of"):
        fd.set_device("gpu")
    with pytest.raises(TypeError, match="str"):
        fd.set_device(0)


def test_to_device_and_to_host_on_the_cpu():
    fd.set_device("cpu")
    x = np.arange(5.0)
    assert fd.to_device(x) is x
    assert fd.to_host(x) is x
    np.testing.assert_array_equal(fd.to_device([1, 2]), [1, 2])


@pytest.mark.skipif(fd.cuda_available(), reason="a usable GPU is present")
def test_cuda_without_a_gpu_fails_when_used_not_when_selected():
    fd.set_device("cuda")  # selecting is fine
    assert fd.get_device() == "cuda"
    with pytest.raises(RuntimeError, match="no usable CUDA GPU"):
        fd.to_device(np.zeros(3))
    with pytest.raises(RuntimeError, match="no usable CUDA GPU"):
        fd.optim.flat_params([(3,)])


def test_environment_variable_sets_the_default():
    assert run_python("import fastdl; print(fastdl.get_device())", FASTDL_DEVICE="cpu") == "cpu"
    # cuda is accepted at import even without a GPU
    out = run_python("import fastdl; print(fastdl.get_device())", FASTDL_DEVICE="cuda")
    assert out == "cuda"


def test_import_is_light():
    """import fastdl compiles nothing and does not even import numba."""
    out = run_python("import sys, time; t = time.perf_counter(); import fastdl; "
                     "print(time.perf_counter() - t, 'numba' in sys.modules)")
    seconds, numba_loaded = out.split()
    assert numba_loaded == "False"
    assert float(seconds) < 2.0  # generous: shared CI machines; measured ~0.1 s


def test_device_array_detection_uses_the_cuda_array_interface():
    class Stub:
        __cuda_array_interface__ = {}

    assert device.is_device_array(Stub())
    assert not device.is_device_array(np.zeros(2))
    assert device.location(Stub()) == "cuda"
