"""Every CUDA kernel compiles to PTX and SASS (sm_80, sm_90) without a GPU: no float64
instruction in float32 kernels, no register spills. Skipped where the CUDA tools are absent.

Also: the registry covers every CUDA kernel in kernels/, and the ``__cuda_array_interface__``
path (CuPy, PyTorch CUDA tensors) is exercised with a stub, since the simulator's arrays lack it.
"""

import ast
import pathlib

import numpy as np
import pytest

from fastdl._validate import c_contiguous
from fastdl.device import is_device_array
from fastdl.kernels import (  # noqa: F401  (importing registers the kernels)
    batchnorm_cuda,
    cudalib,
    dense_cuda,
    dropout_cuda,
    optim_cuda,
    softmax_cuda,
)

KERNELS = pathlib.Path(cudalib.__file__).parent


def kernel_functions():
    """Names of the functions under a ``@kernel(...)`` decorator, and direct cuda.jit uses."""
    names, direct = [], []
    for path in KERNELS.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for d in node.decorator_list:
                    call = d.func if isinstance(d, ast.Call) else d
                    if getattr(call, "id", None) == "kernel":
                        names.append(node.name)
            if (isinstance(node, ast.Attribute) and node.attr == "jit"
                    and getattr(node.value, "id", None) == "cuda" and path.name != "cudalib.py"):
                direct.append(f"{path.name}:{node.lineno}")
    return names, direct


def test_registry_covers_every_cuda_kernel():
    names, direct = kernel_functions()
    assert not direct, f"cuda.jit used outside kernels/cudalib.py (not registered): {direct}"
    assert sorted(names) == sorted(cudalib.REGISTRY)
    assert all(signatures for _, signatures in cudalib.REGISTRY.values())


def registry_cases():
    for name, (dispatcher, signatures) in sorted(cudalib.REGISTRY.items()):
        for i, signature in enumerate(signatures):
            yield pytest.param(name, dispatcher, signature, id=f"{name}-{i}")


@pytest.mark.skipif(cudalib.SIMULATOR, reason="PTX needs numba's real CUDA target")
@pytest.mark.skipif(cudalib.ptxas_path() is None, reason="no CUDA toolkit (ptxas)")
@pytest.mark.parametrize("cc", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("name, dispatcher, signature", list(registry_cases()))
def test_kernel_compiles_to_sass_without_f64_or_spills(name, dispatcher, signature, cc,
                                                       record_property):
    ptx = cudalib.compile_ptx(dispatcher, signature, cc)
    float32 = "float64" not in str(signature)
    if float32:
        f64 = [line.strip() for line in ptx.splitlines() if ".f64" in line]
        assert not f64, f"float32 kernel {name} uses float64: {f64[:3]}"
    registers, spills = cudalib.ptxas(ptx, cc)
    record_property("registers", registers)
    assert spills == 0, f"{name} spills {spills} bytes on sm_{cc[0]}{cc[1]}"
    assert registers <= 255


class StubCudaArray:
    """What CuPy arrays and PyTorch CUDA tensors show fastdl: the CUDA array interface."""

    def __init__(self, shape, dtype, address=0x7F0000000000, strides=None):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.__cuda_array_interface__ = {"shape": shape, "typestr": self.dtype.str,
                                         "data": (address, False), "strides": strides,
                                         "version": 3}


def test_cuda_array_interface_objects_are_device_arrays():
    stub = StubCudaArray((4, 3), np.float32)
    assert is_device_array(stub)
    assert c_contiguous(stub)
    assert c_contiguous(StubCudaArray((4, 3), np.float32, strides=(12, 4)))
    assert not c_contiguous(StubCudaArray((4, 3), np.float32, strides=(4, 16)))
    assert c_contiguous(StubCudaArray((1, 3), np.float32, strides=(999, 4)))


@pytest.mark.skipif(cudalib.SIMULATOR, reason="the simulator has its own addressing")
def test_cuda_array_interface_addresses_and_spans(monkeypatch):
    """Flat-buffer detection reads addresses from the interface, and a span over a flat buffer
    is built from it (numba's from_cuda_array_interface, stubbed: it needs a GPU)."""
    a = StubCudaArray((4, 3), np.float32, address=4096)
    assert cudalib.address(a) == 4096
    made = {}
    monkeypatch.setattr(cudalib.cuda, "from_cuda_array_interface",
                        lambda interface, owner: made.update(interface=interface, owner=owner))
    cudalib.span(a, 20)
    assert made["owner"] is a
    assert made["interface"]["shape"] == (20,) and made["interface"]["data"] == (4096, False)
    assert made["interface"]["strides"] is None
