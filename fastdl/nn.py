"""Layers for the training toolkit: PyTorch's habits without autograd.

Every layer has ``train()`` / ``eval()``, ``forward(x)``, ``backward(dout)`` (returning the
gradient for the input and storing those of its parameters), ``params()`` and ``grads()``
(lists of arrays in the same order, ready for ``fastdl.optim``). Output buffers are reused from
call to call when shapes repeat (a fresh 32 MB array costs page faults), so keep a copy of an
output you need past the next call.
"""

import numpy as np

from . import _checks
from .batchnorm import batch_norm_backward, batch_norm_forward


class BatchNorm:
    """Batch normalization over ``num_features`` channels at ``channel_axis`` (SPEC.md).

    ``gamma`` (ones) and ``beta`` (zeros) are learned; running statistics (mean 0, variance 1)
    are tracked in training and used in ``eval()`` mode. ``population=K`` keeps K models'
    parameters and statistics, shape (K, num_features), for inputs with a leading K axis.
    ``storage`` / ``grad_storage``: two arrays each (gamma, beta) to hold the parameters and
    their gradients, e.g. views of a container's flat buffer; they are filled here.
    """

    def __init__(self, num_features, momentum=0.1, eps=1e-5, channel_axis=1, dtype=np.float32,
                 population=None, storage=None, grad_storage=None):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int; got "
                            f"{_checks.describe(num_features)}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1; got {num_features}")
        self.dtype = _checks.float_dtype(dtype, "dtype")
        if population is not None and (isinstance(population, bool) or population < 1):
            raise ValueError(f"population must be None or a number of models >= 1; got "
                             f"{population!r}")
        self.population = population
        shape = (num_features,) if population is None else (population, num_features)
        self.gamma, self.beta = self._buffers(storage, shape, "storage", (1.0, 0.0))
        self.dgamma, self.dbeta = self._buffers(grad_storage, shape, "grad_storage", (0.0, 0.0))
        self.running_mean = np.zeros(shape, self.dtype)
        self.running_var = np.ones(shape, self.dtype)
        self.momentum, self.eps, self.channel_axis = momentum, eps, channel_axis
        self.training = True
        self._cache = self._y = self._dx = None

    def _buffers(self, given, shape, name, values):
        if given is None:
            return [np.full(shape, v, self.dtype) for v in values]
        given = list(given)
        if len(given) != 2:
            raise ValueError(f"{name} must hold two arrays (gamma, beta); got {len(given)}")
        for i, a in enumerate(given):
            if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != self.dtype:
                raise ValueError(f"{name}[{i}] must be an array of shape {shape} and dtype "
                                 f"{self.dtype}; got {_checks.describe(a)}")
            a[...] = values[i]
        return given

    def train(self):
        self.training = True
        return self

    def eval(self):
        self.training = False
        return self

    def forward(self, x):
        """Normalize ``x`` (batch statistics in training, running ones in eval mode)."""
        if self._y is None or self._y.shape != x.shape or self._y.dtype != x.dtype:
            self._y = np.empty_like(x)
        y, self._cache = batch_norm_forward(
            x, self.gamma, self.beta, self.running_mean, self.running_var,
            training=self.training, momentum=self.momentum, eps=self.eps,
            channel_axis=self.channel_axis, population=self.population is not None,
            out=self._y)
        return y

    def backward(self, dout):
        """Store dgamma and dbeta; return the gradient for the input."""
        if self._cache is None:
            raise ValueError("backward needs a forward first")
        if self._dx is None or self._dx.shape != dout.shape or self._dx.dtype != dout.dtype:
            self._dx = np.empty_like(dout)
        dx, dgamma, dbeta = batch_norm_backward(dout, self._cache, out=self._dx)
        self.dgamma[...] = dgamma
        self.dbeta[...] = dbeta
        return dx

    def params(self):
        return [self.gamma, self.beta]

    def grads(self):
        return [self.dgamma, self.dbeta]

    def __repr__(self):
        return (f"BatchNorm({self.gamma.shape[-1]}, channel_axis={self.channel_axis}, "
                f"momentum={self.momentum}, eps={self.eps}, training={self.training})")
