"""Compilation settings shared by every kernel: one place to change them.

FASTMATH is numbagg's flag set, *without* ``nnan`` and ``ninf``: with those two LLVM may delete
NaN/inf checks (a loop testing for non-finite values returned False on arrays holding a NaN
under ``fastmath=True``), and non-finite skipping, ``-inf`` maxima and inf-safe softmax need them.

Also here, because every kernel module imports this one before its decorators run:

* ``REGISTRY``: every compiled CPU kernel by name (``cpu_kernel`` / ``cpu_kernel_pair``), as
  ``kernels/cudalib.py`` keeps the CUDA ones; tests/test_kernel_cache.py runs them all;
* ``CACHE``: whether numba can keep compiled kernels on disk (a read-only installation with no
  writable cache directory compiles them in memory, with one warning, instead of failing);
* fork safety: a process forked after running parallel kernels on the OpenMP threading layer
  runs only the serial kernels (GNU OpenMP kills a forked child that starts a parallel region);
* GOMP_SPINCOUNT: GNU OpenMP's spin before its threads sleep, shortened (see below).
"""

import math
import os
import sys
import time
import types
import warnings

from numba import get_num_threads, njit

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

# For the few loops whose order of operations is the point (``(z - max) - log_sum`` must not
# become ``z - (max + log_sum)``): FASTMATH without reassociation. Compile them as separate
# functions, not numba-inlined, so that their instructions keep these flags.
FASTMATH_IN_ORDER = FASTMATH - {"reassoc"}

# For code whose bits must not depend on how a kernel was compiled: neither reassociated nor
# contracted into FMAs. numba issue 10617: a parallel kernel loaded from the cache is optimized
# differently from the one just compiled; reassociated sums (batch norm's moments, the gradient
# norm) and FMA contractions (the optimizers' updates) came out differently in their last bits
# (tests/test_kernel_cache.py).
FASTMATH_REPRODUCIBLE = FASTMATH - {"reassoc", "contract"}

# Below this many elements a prange kernel costs more in thread wake-up than it saves. Every
# launcher reads it at call time: a forked child sets it to inf (see _after_fork_in_child).
PARALLEL_MIN_SIZE = 16_384


def _probe():
    """Stands in for a kernel of this directory when asking numba where it would cache."""


def _cache_possible():
    """Whether numba finds a writable cache directory for the kernels of this directory.

    numba's cache locators (numba/core/caching.py, tried in order: NUMBA_CACHE_DIR, the
    ``__pycache__`` beside the source, the user-wide ``~/.cache/numba``) each create their
    directory and write a temporary file; with none writable, ``cache=True`` raises
    "cannot cache function ...: no locator available" when the kernel is defined."""
    try:
        from numba.core.caching import FunctionCache
    except ImportError:  # numba moved its private module: let cache=True decide
        return True
    try:
        FunctionCache(_probe)
    except RuntimeError:
        return False
    return True


# GNU OpenMP's threads spin for 300,000 iterations when they wait (at a parallel region's end,
# or for the next one) before they sleep (GOMP_SPINCOUNT's default). Beside another busy
# process, a waiting thread spinning on one core kept the thread the region waited for off it:
# 3 epochs of a population of 16 demo networks took 9.9 s instead of 0.28 s beside one busy
# process (PyTorch's ensemble 1.3 s instead of 0.5 s). With 10,000 spins: 1.1 s, and alone the
# same speed (10 epochs, alternating: 0.89 and 3.71 s against 0.86 and 3.78 s at K = 16 and 64).
# libgomp reads this when numba's OpenMP layer starts (the first parallel kernel); a value the
# user set is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

CACHE = _cache_possible()
if not CACHE:
    warnings.warn("fastdl: no writable directory to cache compiled kernels in (the package's "
                  "__pycache__, NUMBA_CACHE_DIR, ~/.cache/numba): they compile in memory, again "
                  "in every process; set NUMBA_CACHE_DIR to a writable directory to keep them",
                  RuntimeWarning, stacklevel=2)

CPU_OPTIONS = dict(error_model="numpy", fastmath=FASTMATH, cache=CACHE, nogil=True)

# name -> numba dispatcher of every CPU kernel (the inline="always" helpers are not kernels).
REGISTRY = {}


def register(name, dispatcher):
    """Record ``dispatcher`` (a compiled CPU kernel) in REGISTRY as ``name``; returns it."""
    if name in REGISTRY:
        raise ValueError(f"a CPU kernel named {name!r} is already registered")
    REGISTRY[name] = dispatcher
    return dispatcher


def _default_name(fn):
    return fn.__module__.rsplit(".", 1)[-1] + "." + fn.__name__.lstrip("_")


def cpu_kernel(fn=None, *, name=None, **options):
    """``@cpu_kernel`` or ``@cpu_kernel(parallel=True)``: ``njit(**CPU_OPTIONS, **options)``,
    registered in REGISTRY as ``name`` (default ``"<module>.<function>"``)."""
    def decorate(fn):
        return register(name or _default_name(fn), njit(**{**CPU_OPTIONS, **options})(fn))

    return decorate if fn is None else decorate(fn)


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


def cpu_kernel_pair(fn, name=None, **options):
    """Compile ``fn`` (whose loop is a ``prange``) as a serial and as a parallel kernel
    (``njit(**CPU_OPTIONS, **options)``), registered as ``name + ".serial"`` and
    ``name + ".parallel"`` (default name ``"<module>.<function>"``).

    Returns ``(serial, parallel)``: the serial one for small inputs, where waking the thread
    pool costs more than the work.
    """
    name, options = name or _default_name(fn), {**CPU_OPTIONS, **options}
    return (register(name + ".serial", njit(**options)(fn)),
            register(name + ".parallel", njit(parallel=True, **options)(_renamed(fn, "_parallel"))))


def cached_on_disk(names):
    """Whether every kernel of ``names`` (REGISTRY names) has its cache index on disk: False
    means that their first calls in this process compile (seconds each), as on a first run.

    Reads numba's private cache attributes; where they are missing it answers True (says
    nothing rather than something wrong)."""
    if not CACHE:
        return False
    for name in names:
        cache = getattr(REGISTRY[name], "_cache", None)
        index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
        if index is not None and not os.path.exists(index):
            return False
    return True


# Chunk sizes of the chunked CPU kernels are picked per optimizer within these bounds, so
# that each thread gets a few chunks (load balance) and each chunk stays cache-sized.
MIN_CHUNK_SIZE = 4_096
MAX_CHUNK_SIZE = 65_536


def threads():
    """Threads numba's parallel kernels use (in this thread: ``fastdl.cpu_threads`` sets it)."""
    return get_num_threads()


# OpenBLAS's threads spin for up to ~0.1 s after a matrix product before they sleep, holding
# the cores: a parallel kernel launched in that window waits for them. Measured on 2 cores
# (AMD EPYC): a parallel Adam step of 1e6 elements took 23 ms right after a (16, 64, 256) x
# (16, 256, 128) product, 0.98 ms serially and 0.79 ms in parallel with BLAS asleep; of 1.6e7
# elements 37 ms, 27 ms and 13 ms. fastdl's dense layers note their products
# (:func:`note_blas_product`), and for BLAS_SPIN_SECONDS after one every launcher picks its
# serial kernel: a training loop of fastdl layers steps its optimizer without fighting BLAS,
# with no ``fastdl.cpu_threads(1)`` to remember.
BLAS_SPIN_SECONDS = 0.2
_last_blas_product = -math.inf


def note_blas_product():
    """Record that a BLAS product ran now (see BLAS_SPIN_SECONDS)."""
    global _last_blas_product
    _last_blas_product = time.perf_counter()


def use_parallel(size):
    """Whether a kernel over ``size`` elements runs its parallel variant: at least
    PARALLEL_MIN_SIZE elements, more than one thread to run on (with one, as beside BLAS in
    ``fastdl.nn``, the serial variant does the same work without the pool's wake-up, and a run
    that only ever needs it compiles half the kernels), and no BLAS product of fastdl's layers
    in the last BLAS_SPIN_SECONDS (its threads still hold the cores)."""
    return (size >= PARALLEL_MIN_SIZE and get_num_threads() > 1
            and time.perf_counter() - _last_blas_product > BLAS_SPIN_SECONDS)


# -- fork safety --------------------------------------------------------------------------------

FORKED_AFTER_OPENMP = False  # True in a child forked after the parent ran a parallel kernel


def _after_fork_in_child():
    """In a child forked (multiprocessing's default on Linux) from a process whose OpenMP
    thread pool is running, a parallel kernel would be killed ("fork() called from a process
    already using GNU OpenMP, this is unsafe"): serial kernels are safe and give the same
    results, so from here on every launcher picks them (its size test against inf fails)."""
    global PARALLEL_MIN_SIZE, FORKED_AFTER_OPENMP
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is not None and getattr(parallel, "_is_initialized", False) \
            and getattr(parallel, "_threading_layer", None) == "omp":
        PARALLEL_MIN_SIZE = math.inf
        FORKED_AFTER_OPENMP = True


os.register_at_fork(after_in_child=_after_fork_in_child)
