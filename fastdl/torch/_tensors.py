"""Tensors handed to fastdl's kernels without a copy: a CPU tensor as a NumPy view
(``tensor.numpy()``), a CUDA tensor as a Numba device array over its
``__cuda_array_interface__``. Arrays made by the kernels go back the same way
(``torch.from_numpy``, ``torch.as_tensor``), sharing memory.

The CUDA path exists for machines with a GPU; it is untested here (no GPU, and the CUDA
simulator does not take torch tensors).
"""

import collections
import sys
import threading

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_float(t, name):
    """``t`` must be a dense (strided) float32 or float64 tensor: TypeError otherwise, naming
    ``name`` (bfloat16, float16, integer and sparse tensors are not taken, never cast)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {t.layout} "
                        "(fastdl's kernels take no sparse tensors)")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64; got {t.dtype} (fastdl's kernels "
                        "take no other dtype: cast it, or use torch's own module)")


def array(t):
    """The memory of tensor ``t`` as an array, without a copy: NumPy for a CPU tensor, a Numba
    device array for a CUDA one (``t`` is detached first; its autograd history is untouched)."""
    t = t.detach()
    if t.is_cuda:
        from numba import cuda

        return cuda.as_cuda_array(t)
    return t.numpy()


def tensor(a, like):
    """The array ``a`` (from :func:`array`, or made by a kernel) as a tensor on ``like``'s
    device, sharing memory."""
    if like.is_cuda:
        return torch.as_tensor(a, device=like.device)
    return torch.from_numpy(a)


def kernel_layout(t, dim):
    """``t`` as the kernels read it, in place when its memory allows: ``(view, k)`` with
    ``view = t.movedim(dim, k)`` C-contiguous. k = dim for a contiguous tensor; k = the last
    axis for channels-last ones ((N, H, W, C) for an (N, C, H, W) tensor); any other
    position whose moved view is contiguous (e.g. k = 0: (C, N), the notes' layout). Other
    layouts are copied to a contiguous tensor (as torch's own kernels do): ``(t.contiguous(),
    dim)``. Moving one axis keeps the order of the others, so per-position targets and
    statistics over "every other axis" need no change."""
    if t.is_contiguous():
        return t, dim
    for k in reversed(range(t.dim())):
        if k != dim:
            view = t.movedim(dim, k)
            if view.is_contiguous():
                return view, k
    return t.contiguous(), dim


def _moved(seq, src, dst):
    """``seq`` (a shape or strides) with entry ``src`` moved to position ``dst``."""
    seq = list(seq)
    seq.insert(dst, seq.pop(src))
    return tuple(seq)


NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.bool: np.bool_}


def _refcounts(buffers):
    """``sys.getrefcount`` of each buffer, seen from here: :data:`_FREE` for a buffer that
    only the pool's list references (the baseline is measured by this very function, so the
    interpreter's own temporary references are counted the same way)."""
    return [sys.getrefcount(b) for b in buffers]


_FREE = _refcounts([np.empty(0)])[0]


class BufferPool:
    """Reused output memory for CPU tensors: a fresh array of tens of MB costs ~10 ms of page
    faults on first touch, more than a batch-norm kernel, so a module hands out the same few
    NumPy buffers step after step.

    A buffer is free when no tensor made from it is alive: ``torch.from_numpy(buf)`` gives a
    storage that holds a reference to ``buf`` (or to a NumPy view of it, whose base is
    ``buf``) until the storage dies, so ``sys.getrefcount(buf)`` stays above the pool's own
    baseline while any tensor, view, ``.numpy()`` array, autograd-saved tensor or ``.grad``
    over that memory lives (tests/test_torch_nn.py checks each case). At most ``per_key``
    buffers are kept per (shape, dtype) and ``keys`` keys (least recently used dropped);
    beyond that, outputs are fresh arrays. CUDA tensors use torch's caching allocator
    instead. Copies and pickles of a pool are empty pools.
    """

    def __init__(self, per_key=4, keys=8):
        self.per_key, self.keys = per_key, keys
        self._buffers = collections.OrderedDict()  # (shape, dtype) -> [np.ndarray]
        self._lock = threading.Lock()  # two threads must not take one free buffer

    def __reduce__(self):
        return type(self), (self.per_key, self.keys)

    def output(self, shape, dtype, like, k=0, dim=0):
        """An uninitialized tensor on ``like``'s device and the array the kernel writes it
        through: ``(t, a)``. ``shape`` is the kernel's (C-contiguous) view and ``a`` that view;
        ``t`` is it with axis ``k`` moved to ``dim`` (:func:`kernel_layout`'s inverse), made
        as a base tensor with those strides, not a view (autograd forbids in-place ops on
        views made inside a custom Function, e.g. a ReLU(inplace=True) after BatchNorm2d)."""
        shape = tuple(shape)
        if like.is_cuda:
            strides = [1] * len(shape)
            for i in range(len(shape) - 2, -1, -1):
                strides[i] = strides[i + 1] * max(shape[i + 1], 1)
            t = torch.empty_strided(_moved(shape, k, dim), _moved(strides, k, dim),
                                    dtype=dtype, device=like.device)
            return t, array(t.movedim(dim, k))
        with self._lock:
            buf = self._take(shape, NUMPY_DTYPES[dtype])
            t = torch.from_numpy(buf if k == dim else np.moveaxis(buf, k, dim))
        return t, buf

    def _take(self, shape, dtype):
        key = (shape, np.dtype(dtype))
        buffers = self._buffers.get(key)
        if buffers is None:
            buffers = self._buffers[key] = []
            if len(self._buffers) > self.keys:
                self._buffers.popitem(last=False)
        else:
            self._buffers.move_to_end(key)
        for buf, count in zip(buffers, _refcounts(buffers)):
            if count == _FREE:
                return buf
        buf = np.empty(shape, dtype)
        if len(buffers) < self.per_key:
            buffers.append(buf)
        return buf
