"""Device selection: where kernels run and where new buffers go.

Where an array lives decides where a kernel runs; what is derived from it (outputs, optimizer
state) is allocated beside it. The selected device only decides where buffers with nothing to
follow go (layer weights, :func:`to_device`, :func:`fastdl.optim.flat_params`).

The default comes from the environment variable ``FASTDL_DEVICE`` ("auto", "cpu" or "cuda";
"auto" when unset). "auto" means "cuda" when a GPU is usable, else "cpu". Asking for "cuda"
without a usable GPU is an error when something is put there, never at import.

``numba.cuda`` is imported only when first needed, through ``fastdl.kernels.cudalib``.
"""

import contextlib
import os

import numpy as np

DEVICES = ("auto", "cpu", "cuda")

_requested = None  # set by set_device; None: not yet read from FASTDL_DEVICE
_cuda_usable = None  # cached answer of cuda_available()


def _check_device_name(name, argument):
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str, one of {DEVICES}; got {type(name).__name__}")
    if name not in DEVICES:
        raise ValueError(f"{argument} must be one of {DEVICES}; got {name!r}")
    return name


def cuda_module():
    """``numba.cuda``, imported on first use (it costs ~0.15 s) through fastdl's one door to
    it, ``fastdl.kernels.cudalib``."""
    from fastdl.kernels.cudalib import cuda

    return cuda


def cuda_available():
    """True when numba can use a CUDA GPU here (or its simulator, NUMBA_ENABLE_CUDASIM=1)."""
    global _cuda_usable
    if _cuda_usable is None:
        try:
            _cuda_usable = bool(cuda_module().is_available())
        except Exception:  # no driver, no toolkit, broken install: all mean "not usable"
            _cuda_usable = False
    return _cuda_usable


def _requested_device():
    global _requested
    if _requested is None:
        _requested = _check_device_name(os.environ.get("FASTDL_DEVICE", "auto").lower(),
                                        "FASTDL_DEVICE")
    return _requested


def get_device():
    """The selected device, "cpu" or "cuda" ("auto" resolved)."""
    requested = _requested_device()
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    return requested


def set_device(device):
    """Select "auto", "cpu" or "cuda" for buffers that have no array to follow."""
    global _requested
    _requested = _check_device_name(device, "device")


@contextlib.contextmanager
def use_device(device):
    """``with fd.use_device("cpu"): ...`` selects a device for the block, then restores."""
    global _requested
    previous = _requested_device()
    set_device(device)
    try:
        yield
    finally:
        _requested = previous


def require_cuda():
    """``numba.cuda``, or a RuntimeError saying why the GPU cannot be used."""
    if not cuda_available():
        raise RuntimeError(
            "device 'cuda' was selected but no usable CUDA GPU was found (numba.cuda."
            "is_available() is False); install NVIDIA's driver and `pip install "
            "fastdl[cuda]`, or select the CPU with fd.set_device('cpu')")
    return cuda_module()


def is_device_array(x):
    """True for GPU arrays: numba device arrays or objects with ``__cuda_array_interface__``."""
    if isinstance(x, np.ndarray):
        return False
    return type(x).__module__.startswith("numba.cuda") or hasattr(x, "__cuda_array_interface__")


def location(x):
    """"cuda" for a GPU array, "cpu" for a NumPy array."""
    return "cuda" if is_device_array(x) else "cpu"


def to_device(x):
    """Put ``x`` on the selected device: a NumPy array on "cpu", a numba device array on "cuda".

    Arrays already there are returned as they are (no copy).
    """
    if get_device() == "cuda":
        cuda = require_cuda()
        if is_device_array(x):
            return x
        return cuda.to_device(np.asarray(x))
    if is_device_array(x):
        return to_host(x)
    return np.asarray(x)


def to_host(x):
    """A NumPy array with the data of ``x`` (``x`` itself when it already is one)."""
    if isinstance(x, np.ndarray):
        return x
    if is_device_array(x):
        if hasattr(x, "copy_to_host"):
            return x.copy_to_host()
        return cuda_module().as_cuda_array(x).copy_to_host()
    return np.asarray(x)


@contextlib.contextmanager
def cpu_threads(n):
    """``with fd.cpu_threads(1): ...``: fastdl's CPU kernels use at most ``n`` threads in the
    block (numba's thread count, restored after).

    Why: next to NumPy's matrix products the two thread pools fight over the cores. OpenBLAS's
    threads spin for a while after each product, and a parallel fastdl kernel launched then
    waits for them: on 2 cores a training step of ``fastdl.nn`` layers ran 35x slower.
    ``Sequential`` runs one model's forward and backward in ``cpu_threads(1)``, leaving the
    cores to BLAS, and for 0.2 s after a BLAS product of fastdl's layers every kernel (an
    optimizer step included) runs serially anyway (``fastdl.kernels.config.BLAS_SPIN_SECONDS``).
    (A population whose products are fastdl's own kernels, kernels/dense.py, has no BLAS pool
    beside it: ``Sequential`` and ``fastdl.training`` leave its kernels every core.)
    """
    import numba

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1; got {n!r}")
    previous = numba.get_num_threads()
    numba.set_num_threads(min(int(n), numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def threads_beside_blas(like):
    """``cpu_threads(1)`` when ``like`` is a host array (fastdl's kernels run single-threaded
    between BLAS products, which take the cores: :func:`cpu_threads` says why); nothing for a
    GPU array."""
    return contextlib.nullcontext() if is_device_array(like) else cpu_threads(1)
