"""The dense-layer operations of ``fastdl.nn`` on either device (``fastdl._dispatch``'s pattern):
matrix products, bias, ReLU and tanh. NumPy (BLAS) on the CPU; on the GPU, cuBLAS through CuPy
when CuPy is installed, else fastdl's own kernels (``kernels/dense_cuda.py``). Arrays are
C-contiguous and of one device; every operation writes into ``out`` (allocated by the layers
through the ops' allocation helpers) and returns it.

``ops(device)`` gives the operations of "cpu" or "cuda" (one shared instance each: they hold no
state); a layer keeps its own, or takes the one of where its input lives.
"""

import math

import numpy as np

from . import _dispatch
from ._dispatch import CudaOps, HostOps


def _t(a, transpose):
    return a.swapaxes(-1, -2) if transpose else a


# Products of at most this many multiply-adds per model run on fastdl's kernels, larger ones on
# BLAS (NumPy). Both paths sum differently, so the rule depends only on the per-model shape:
# model k of a population and the same model alone take the same path, and train to the same
# bits. 2**24 covers the demo network (2.1M per product in training, 11.8M on the dev split);
# a 784-1024 layer at batch 256 (205M) goes to BLAS, 2x faster there than kernels/dense.py.
OWN_PRODUCT_MAX_MACS = 1 << 24


def blas_product(macs):
    """Whether a CPU product of ``macs`` multiply-adds per model runs on BLAS (NumPy)."""
    return macs > OWN_PRODUCT_MAX_MACS


class _DenseCpu(HostOps):
    """NumPy on host arrays; small products on fastdl's kernels (kernels/dense.py)."""

    def __init__(self):
        from fastdl.kernels import config, dense

        self._dense = dense
        # BLAS's threads spin after a product: fastdl's parallel kernels wait for a while
        self._note_blas_product = config.note_blas_product

    def matmul(self, a, b, out, transpose_a=False, transpose_b=False):
        """out = op(a) @ op(b), op = transpose of the last two axes where asked. 2-D, or 3-D for
        a population (K, ., .); a 2-D operand is shared by the K models.

        Up to OWN_PRODUCT_MAX_MACS per model: kernels/dense.py, the K models (or one model's
        rows) split across numba's threads; a population's products ran 1.2-1.9x faster so
        than through NumPy's loop of one 2-thread BLAS call per model, whose spinning threads
        also slowed the fastdl kernels after them (the module says more). Larger: NumPy."""
        depth = a.shape[-2] if transpose_a else a.shape[-1]
        if not blas_product(out.shape[-2] * out.shape[-1] * depth):
            if out.ndim == 2:
                self._dense.matmul(a, b, out[None], transpose_a, transpose_b)
                return out
            return self._dense.matmul(a, b, out, transpose_a, transpose_b)
        np.matmul(_t(a, transpose_a), _t(b, transpose_b), out=out)
        self._note_blas_product()
        return out

    @staticmethod
    def add_bias(y, b, feature_axis):
        """y += b along ``feature_axis`` (-1: y (N, n); 0: y (n, m)); with a population y has a
        leading K axis and b is (K, n)."""
        y += b[..., :, None] if feature_axis == 0 else b[..., None, :]
        return y

    @staticmethod
    def bias_grad(dy, feature_axis, out):
        """out = dy summed over the examples axis (per model for a population)."""
        return np.sum(dy, axis=-1 if feature_axis == 0 else -2, out=out)

    @staticmethod
    def activation(kind, x, out):
        """out = relu(x) or tanh(x)."""
        if kind == "relu":
            return np.maximum(x, 0, out=out)
        return np.tanh(x, out=out)

    @staticmethod
    def activation_backward(kind, dy, saved, out):
        """ReLU: out = dy * (x > 0), ``saved`` = x; tanh: out = dy * (1 - y**2), ``saved`` =
        y."""
        if kind == "relu":
            return np.multiply(dy, saved > 0, out=out)
        np.multiply(saved, saved, out=out)
        np.subtract(1, out, out=out)
        out *= dy
        return out

    @staticmethod
    def scale(a, factor):
        """a *= factor, in place (factor a host number)."""
        a *= a.dtype.type(factor)
        return a


class _DenseCuda(CudaOps):
    """Device arrays: cuBLAS through CuPy for the products when CuPy is installed (it reads the
    numba arrays in place), else fastdl's kernels; the elementwise passes are fastdl's."""

    def __init__(self):
        super().__init__()
        from fastdl.kernels import dense_cuda as kernels

        self.kernels = kernels
        try:
            import cupy
        except ImportError:
            cupy = None
        self.cupy = cupy

    def matmul(self, a, b, out, transpose_a=False, transpose_b=False):
        if self.cupy is not None:
            a_, b_, out_ = (self.cupy.asarray(v) for v in (a, b, out))
            self.cupy.matmul(_t(a_, transpose_a), _t(b_, transpose_b), out=out_)
        else:
            self.kernels.matmul(a, b, out, transpose_a, transpose_b)
        return out

    def add_bias(self, y, b, feature_axis):
        shape = tuple(y.shape)  # a tuple: the simulator's shapes take no negative index
        n_features = tuple(b.shape)[-1]
        inner = shape[-1] if feature_axis == 0 else 1
        per_model = math.prod(shape[1:] if len(shape) == 3 else shape)
        self.kernels.add_bias(self.flat(y), self.flat(b), n_features, inner, per_model)
        return y

    def bias_grad(self, dy, feature_axis, out):
        out_ = self.flat(out)
        if feature_axis == 0:  # (.., F, m): one row of m per (model, feature)
            self.kernels.row_sums(self.flat(dy), self.full(out_.shape[0], 1, dy.dtype), out_)
        else:
            self.kernels.column_sums(dy, out_)
        return out

    def activation(self, kind, x, out):
        self.kernels.activation(kind, self.flat(x), self.flat(out))
        return out

    def activation_backward(self, kind, dy, saved, out):
        self.kernels.activation_backward(kind, self.flat(dy), self.flat(saved), self.flat(out))
        return out

    def scale(self, a, factor):
        self.kernels.scale(self.flat(a), factor)
        return a


_FAMILY = {"cpu": _DenseCpu, "cuda": _DenseCuda}


def ops(device):
    """The dense operations of ``device`` ("cpu" or "cuda")."""
    return _dispatch.shared(_FAMILY, device)
