"""Compilation settings shared by every kernel: one place to change them.

FASTMATH is numbagg's flag set, *without* ``nnan`` and ``ninf``: with those two LLVM may delete
NaN/inf checks (a loop testing for non-finite values returned False on arrays holding a NaN
under ``fastmath=True``), and non-finite skipping, ``-inf`` maxima and inf-safe softmax need them.
"""

import types

from numba import njit

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

# For the few loops whose order of operations is the point (``(z - max) - log_sum`` must not
# become ``z - (max + log_sum)``): FASTMATH without reassociation. Compile them as separate
# functions, not numba-inlined, so that their instructions keep these flags.
FASTMATH_IN_ORDER = FASTMATH - {"reassoc"}

# Below this many elements a prange kernel costs more in thread wake-up than it saves.
PARALLEL_MIN_SIZE = 16_384

CPU_OPTIONS = dict(error_model="numpy", fastmath=FASTMATH, cache=True, nogil=True)


def _renamed(fn, suffix):
    """A copy of ``fn`` with its own qualified name, hence its own on-disk cache entry.

    numba keys its cache on the function's qualified name, not on the ``parallel`` flag: a
    serial and a parallel dispatcher of one function would load each other's machine code.
    """
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix,
                             fn.__defaults__, fn.__closure__)
    new.__qualname__ = fn.__qualname__ + suffix
    new.__doc__ = fn.__doc__
    return new


def cpu_kernel_pair(fn):
    """Compile ``fn`` (whose loop is a ``prange``) as a serial and as a parallel kernel.

    Returns ``(serial, parallel)``: the serial one for small inputs, where waking the thread
    pool costs more than the work.
    """
    return njit(**CPU_OPTIONS)(fn), njit(parallel=True, **CPU_OPTIONS)(_renamed(fn, "_parallel"))

# Chunk sizes of the chunked CPU kernels are picked per optimizer within these bounds, so
# that each thread gets a few chunks (load balance) and each chunk stays cache-sized.
MIN_CHUNK_SIZE = 4_096
MAX_CHUNK_SIZE = 65_536


def threads():
    """Threads numba's parallel kernels use."""
    import numba

    return numba.get_num_threads()
