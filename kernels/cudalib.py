"""fastdl's one door to ``numba.cuda``: the import, launch configuration, kernel registry and
launch counter. Every CUDA kernel of fastdl is made with :func:`kernel` and launched with
:func:`launch`, so that switching CUDA front-ends (numba-cuda, numba-cuda-mlir) touches this file.

Under ``NUMBA_ENABLE_CUDASIM=1`` (the CUDA simulator: one OS thread per CUDA thread, ~150 µs
each per launch) the default launch configuration is small, so user code runs there at a
sensible speed, not only the tests.
"""

import os
import re
import subprocess
import tempfile
from collections import Counter

import numpy as np
from numba import config, cuda, types
from numba.np.numpy_support import from_dtype

SIMULATOR = bool(config.ENABLE_CUDASIM)

# Threads per block of every fastdl kernel (a compile-time constant: shared-memory reductions
# are sized by it). 256 on GPUs; 32 (one warp) in the simulator.
THREADS_PER_BLOCK = 32 if SIMULATOR else 256

# Grid-stride loops run over a capped grid: enough blocks to fill any current GPU, few in the
# simulator.
MAX_BLOCKS = 2 if SIMULATOR else 4096

# Elements per block-sized work item of the chunked kernels (32 per thread on a GPU).
CHUNK_SIZE = 64 if SIMULATOR else 8192

# Separate arrays are passed as tuples; 32 params + 32 grads take 32 * 2 * 56 bytes = 3.6 KB of
# the classic 4 KB kernel-parameter limit (a 1-D array argument is 7 machine words).
MAX_TENSORS_PER_LAUNCH = 32

# Every kernel made by kernel(): name -> (dispatcher, [signatures to verify in PTX/SASS]).
REGISTRY = {}

# Launches per kernel name, counted by launch(): lets tests prove the GPU path ran.
LAUNCHES = Counter()


def kernel(signatures):
    """Decorator: compile ``fn`` with ``cuda.jit`` (lazily, for the argument types of each
    launch) and register it with the signatures the PTX/SASS check compiles."""

    def register(fn):
        dispatcher = cuda.jit(fn)
        REGISTRY[fn.__name__] = (dispatcher, list(signatures))
        return dispatcher

    return register


def device_function(fn):
    """``fn`` (plain scalar Python) as a CUDA device function."""
    return cuda.jit(device=True)(fn)


# float32 <-> its bits as an unsigned integer, for device code that also runs in the simulator
# (bfloat16 state: kernels/optim_cuda.py): libdevice's casts on a GPU, NumPy views in the
# simulator (where libdevice's functions return None; there the bits are a Python int, so that
# rounding arithmetic on them cannot wrap).
if SIMULATOR:
    def _float32_bits(x):
        return int(np.float32(x).view(np.uint32))

    def _float32_from_bits(bits):
        return np.uint32(int(bits) & 0xFFFFFFFF).view(np.float32)
else:
    from numba.cuda import libdevice

    def _float32_bits(x):
        return np.uint32(libdevice.float_as_int(x))

    def _float32_from_bits(bits):
        return libdevice.int_as_float(np.int32(bits))

float32_bits = device_function(_float32_bits)
float32_from_bits = device_function(_float32_from_bits)


def launch(dispatcher, n_items, *args):
    """Launch ``dispatcher`` over ``n_items`` work items (grid-stride) and count it."""
    blocks = max(1, min(n_items, MAX_BLOCKS))
    dispatcher[blocks, THREADS_PER_BLOCK](*args)
    LAUNCHES[dispatcher.py_func.__name__] += 1


def array(dtype, ndim=1):
    """The numba type of a C-contiguous array argument, for registry signatures."""
    return types.Array(from_dtype(np.dtype(dtype)), ndim, "C")


def available():
    return cuda.is_available()


def is_cuda_array(x):
    return cuda.is_cuda_array(x)


def as_cuda_array(x):
    """A numba device array over the memory of ``x`` (no copy)."""
    if SIMULATOR or isinstance(x, cuda.devicearray.DeviceNDArray):
        return x
    return cuda.as_cuda_array(x)


def address(x):
    """The device address of ``x``'s first element (the simulator's: of its host buffer)."""
    if SIMULATOR:
        return x._ary.__array_interface__["data"][0]
    return x.__cuda_array_interface__["data"][0]


def span(x, n):
    """A 1-D device array of ``n`` elements starting at ``x``'s first element (no copy): the
    whole of a flat buffer whose views are consecutive. ``x`` keeps the memory alive."""
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        host = x._ary.reshape(-1)[:1]
        return FakeCUDAArray(np.lib.stride_tricks.as_strided(host, (n,), host.strides))
    interface = dict(x.__cuda_array_interface__, shape=(n,), strides=None)
    return cuda.from_cuda_array_interface(interface, owner=x)


# -- verification without a GPU: PTX from NVVM, SASS from ptxas ---------------------------------

CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")


def ptxas_path():
    """The ptxas of ``CUDA_HOME`` (default /usr/local/cuda), or None."""
    path = os.path.join(CUDA_HOME, "bin", "ptxas")
    return path if os.access(path, os.X_OK) else None


def compile_ptx(dispatcher, signature, cc):
    """PTX of a registered kernel for one signature and compute capability, without a GPU.

    numba's built-in CUDA target compiles *device* functions for the current device's compute
    capability, which needs a driver; here the requested ``cc`` stands in for that device.
    """
    from numba.cuda import dispatcher as cuda_dispatcher

    class _Device:
        compute_capability = cc

    current = cuda_dispatcher.get_current_device
    cuda_dispatcher.get_current_device = lambda: _Device
    try:
        ptx, _ = cuda.compile_ptx(dispatcher.py_func, signature, cc=cc)
    finally:
        cuda_dispatcher.get_current_device = current
    return ptx


def ptxas(ptx, cc):
    """Assemble PTX to SASS with ``ptxas -v``: (registers per thread, spill bytes)."""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas_path(), "-v", f"-arch=sm_{cc[0]}{cc[1]}", source,
                                 "-o", os.path.join(folder, "kernel.cubin")],
                                capture_output=True, text=True, check=True)
    registers = max(int(r) for r in re.findall(r"Used (\d+) registers", result.stderr))
    spills = sum(int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)",
                                            result.stderr))
    return registers, spills
