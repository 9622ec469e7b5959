"""The dense-layer operations of ``fastdl.nn`` on either device: matrix products, bias, ReLU and
tanh. NumPy (BLAS) on the CPU; on the GPU, cuBLAS through CuPy when CuPy is installed, else
fastdl's own kernels (``kernels/dense_cuda.py``). Arrays are C-contiguous and of one device;
every function writes into ``out`` (allocated beside the inputs by :func:`empty`).
"""

import numpy as np

from .device import is_device_array, require_cuda


def _cuda():
    from fastdl.kernels import dense_cuda

    return dense_cuda


def _cupy():
    """CuPy, or None when it is not installed (fastdl's own matmul kernel is used then)."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def empty(shape, dtype, like):
    """An uninitialized array of ``shape`` on ``like``'s device."""
    if is_device_array(like):
        return require_cuda().device_array(shape, dtype)
    return np.empty(shape, dtype)


def zeros(shape, dtype, device):
    """A zero-filled array on ``device`` ("cpu" or "cuda")."""
    if device == "cuda":
        return require_cuda().to_device(np.zeros(shape, dtype))
    a = np.empty(shape, dtype)
    a.fill(0)  # written now: no lazily mapped pages (see _backends.CpuBackend.zeros)
    return a


def _t(a, transpose):
    return a.swapaxes(-1, -2) if transpose else a


def matmul(a, b, out, transpose_a=False, transpose_b=False):
    """out = op(a) @ op(b), op = transpose of the last two axes where asked. 2-D, or 3-D for a
    population (K, ., .) in one batched call; a 2-D operand is shared by the K models."""
    if not is_device_array(a):
        np.matmul(_t(a, transpose_a), _t(b, transpose_b), out=out)
        return out
    cupy = _cupy()
    if cupy is not None:  # cuBLAS; CuPy reads the numba arrays in place
        a_, b_, out_ = (cupy.asarray(v) for v in (a, b, out))
        cupy.matmul(_t(a_, transpose_a), _t(b_, transpose_b), out=out_)
        return out
    _cuda().matmul(a, b, out, transpose_a, transpose_b)
    return out


def add_bias(y, b, feature_axis):
    """y += b along ``feature_axis`` (-1: y (N, n); 0: y (n, m)); with a population y has a
    leading K axis and b is (K, n)."""
    if not is_device_array(y):
        y += b[..., :, None] if feature_axis == 0 else b[..., None, :]
        return y
    _cuda().add_bias(y, b, feature_axis)
    return y


def bias_grad(dy, feature_axis, out):
    """out = dy summed over the examples axis (per model for a population)."""
    if not is_device_array(dy):
        np.sum(dy, axis=-1 if feature_axis == 0 else -2, out=out)
        return out
    _cuda().bias_grad(dy, feature_axis, out)
    return out


def activation(kind, x, out):
    """out = relu(x) or tanh(x)."""
    if not is_device_array(x):
        if kind == "relu":
            np.maximum(x, 0, out=out)
        else:
            np.tanh(x, out=out)
        return out
    _cuda().activation(kind, x, out)
    return out


def activation_backward(kind, dy, saved, out):
    """ReLU: out = dy * (x > 0), ``saved`` = x; tanh: out = dy * (1 - y**2), ``saved`` = y."""
    if not is_device_array(dy):
        if kind == "relu":
            np.multiply(dy, saved > 0, out=out)
        else:
            np.multiply(saved, saved, out=out)
            np.subtract(1, out, out=out)
            out *= dy
        return out
    _cuda().activation_backward(kind, dy, saved, out)
    return out


def to_device_copy(host, device):
    """A copy of the host array ``host`` on ``device`` ("cpu" or "cuda")."""
    if device == "cuda":
        return require_cuda().to_device(np.ascontiguousarray(host))
    return np.array(host, order="C")


def scale(a, factor):
    """a *= factor, in place (factor a host number)."""
    if not is_device_array(a):
        a *= a.dtype.type(factor)
        return a
    _cuda().scale(a, factor)
    return a


def assign(a, values):
    """a[...] = values, ``values`` an array on a's device or on the host."""
    if not is_device_array(a):
        a[...] = values
        return
    from fastdl.kernels.cudalib import as_cuda_array

    if not is_device_array(values):
        values = np.ascontiguousarray(values, a.dtype)
    as_cuda_array(a).copy_to_device(values)
