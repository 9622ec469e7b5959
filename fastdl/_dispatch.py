"""fastdl's one dispatch pattern: every operation family (optimizers, batch norm, softmax,
dropout, the dense layers' operations) has one small *ops* class per device, and
:func:`select` picks the one for where the arrays live.

``HostOps`` and ``CudaOps`` are the bases: they hold the allocation and copy helpers, the one
place where fastdl allocates arrays (on the host: ``np.empty`` + ``fill``, never ``np.zeros``,
whose calloc hands out lazily mapped small pages that fault on first touch and, with
transparent huge pages in "madvise" mode, stay small: TLB misses made fused Adam on 1e7
elements ~25 % slower). A family subclasses both with its launchers, e.g.
``_BatchNormCpu(HostOps)`` and ``_BatchNormCuda(CudaOps)``, and its API calls
``select({"cpu": _BatchNormCpu, "cuda": _BatchNormCuda}, device, ...)``; a family whose ops
hold no per-call state (dropout, the dense operations) takes one shared instance per device,
``shared(family, device)``. The kernels are imported inside the ops classes, on first use:
importing fastdl imports no numba.
"""

import numpy as np

from .device import require_cuda


class HostOps:
    """Arrays on the host: NumPy."""

    device = "cpu"

    @staticmethod
    def empty(shape, dtype):
        return np.empty(shape, dtype)

    @staticmethod
    def empty_like(a):
        return np.empty_like(a)

    @staticmethod
    def full(shape, value, dtype):
        """Filled with ``value`` and written now (see the module docstring)."""
        a = np.empty(shape, dtype)
        a.fill(value)
        return a

    @staticmethod
    def zeros(shape, dtype):
        """Zero-filled and written now (see the module docstring)."""
        a = np.empty(shape, dtype)
        a.fill(0)
        return a

    @staticmethod
    def copy_of(host, dtype=None):
        """A C-contiguous copy of the host array ``host`` (in ``dtype``)."""
        return np.array(host, dtype=dtype, order="C")

    @staticmethod
    def from_host(host, dtype=None):
        """The host array ``host`` (in ``dtype``, C-contiguous) on this device: ``host`` itself
        when it already is so (no copy)."""
        return np.ascontiguousarray(host, dtype)

    @staticmethod
    def to_host(a):
        """The host array itself (no copy)."""
        return a

    @staticmethod
    def host_copy(a):
        return np.array(a)

    @staticmethod
    def write(a, values):
        """``a[...] = values`` (values on the host or beside ``a``)."""
        a[...] = values

    @staticmethod
    def flat(a):
        return a.reshape(-1)


class CudaOps:
    """Arrays on the GPU: numba device arrays, or any ``__cuda_array_interface__`` object,
    used in place."""

    device = "cuda"

    def __init__(self):
        require_cuda()
        from fastdl.kernels import cudalib

        self.cudalib, self.cuda = cudalib, cudalib.cuda

    def as_device(self, a):
        """A numba device array over ``a``'s memory (no copy)."""
        return self.cudalib.as_cuda_array(a)

    def empty(self, shape, dtype):
        return self.cuda.device_array(shape, dtype)

    def empty_like(self, a):
        a = self.as_device(a)
        return self.cuda.device_array(a.shape, a.dtype)

    def full(self, shape, value, dtype):
        return self.cuda.to_device(np.full(shape, value, dtype))

    def zeros(self, shape, dtype):
        return self.full(shape, 0, dtype)

    def copy_of(self, host, dtype=None):
        return self.cuda.to_device(np.ascontiguousarray(host, dtype))

    from_host = copy_of

    def to_host(self, a):
        return self.as_device(a).copy_to_host()

    host_copy = to_host

    def write(self, a, values):
        a = self.as_device(a)
        if isinstance(values, np.ndarray) or not hasattr(values, "__cuda_array_interface__"):
            values = np.ascontiguousarray(values, a.dtype)
        a.copy_to_device(values)

    def flat(self, a):
        a = self.as_device(a)
        return a.reshape(a.size) if len(a.shape) != 1 else a


def select(family, device, *args):
    """The ops object of ``family`` ({"cpu": class, "cuda": class}) for ``device``, built with
    ``args`` (e.g. the shape plan of one call)."""
    return family[device](*args)


_SHARED = {}


def shared(family, device):
    """One shared instance of ``family[device]``, built on first use: for families whose ops
    hold no per-call state (no plan), so that a call costs no object."""
    cls = family[device]
    ops = _SHARED.get(cls)
    if ops is None:
        ops = _SHARED[cls] = cls()
    return ops


_ARRAYS = {"cpu": HostOps, "cuda": CudaOps}


def arrays(device):
    """The allocation helpers of ``device`` ("cpu" or "cuda"), one shared instance each."""
    return shared(_ARRAYS, device)
