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
from .dropout import dropout_backward, dropout_forward
from .softmax import softmax_cross_entropy


class Layer:
    """The layer protocol: ``train()`` / ``eval()`` switch ``training`` (and return the layer),
    ``forward``, ``backward(dout)``, and ``params()`` / ``grads()`` (none here)."""

    training = True

    def train(self):
        self.training = True
        return self

    def eval(self):
        self.training = False
        return self

    def params(self):
        return []

    def grads(self):
        return []


class BatchNorm(Layer):
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


def _host_buffer(buffer, like):
    """``buffer`` when it can take an output like ``like`` (a NumPy array), else a new one;
    None for device arrays (the function allocates beside its input)."""
    if not isinstance(like, np.ndarray):
        return None
    if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
        return np.empty_like(like)
    return buffer


class Dropout(Layer):
    """Inverted dropout (SPEC.md): in training each element is dropped with probability ``p``
    and the rest scaled by 1 / (1 - p); in ``eval()`` mode the layer is the identity.

    Every training forward draws a new mask from (``seed``, call number), so a run is
    reproducible from its seed, on the CPU and the GPU alike. ``population=K``: inputs have a
    leading axis of K models and ``p`` may hold one rate per model.
    """

    def __init__(self, p=0.5, seed=None, population=None):
        if population is not None and (isinstance(population, bool) or population < 1):
            raise ValueError(f"population must be None or a number of models >= 1; got "
                             f"{population!r}")
        rates = _checks.hyperparameter(p, "p", population, _checks.closed_unit_interval)
        self.p = float(rates[0]) if population is None else rates  # (K,): one rate per model
        if seed is None:
            seed = int(np.random.default_rng().integers(2**32))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int or None; got {_checks.describe(seed)}")
        self.seed, self.population, self.calls = int(seed), population, 0
        self._mask = self._y = self._dx = None

    def forward(self, x):
        if not self.training:
            self._mask = None
            return x
        # distinct (seed, call) pairs give distinct generator keys (seeds below 2**32)
        seed = (self.seed << 32) + self.calls
        self.calls += 1
        self._y = _host_buffer(self._y, x)
        mask_out = None
        if isinstance(x, np.ndarray):
            if self._mask is None or self._mask.shape != x.shape:
                self._mask = np.empty(x.shape, np.bool_)
            mask_out = self._mask
        y, self._mask = dropout_forward(x, self.p, seed, population=self.population is not None,
                                        out=self._y, mask_out=mask_out)
        return y

    def backward(self, dout):
        """dx = dout * mask / (1 - p) (dout itself in eval mode)."""
        if not self.training:
            return dout
        if self._mask is None:
            raise ValueError("backward needs a training forward first")
        self._dx = _host_buffer(self._dx, dout)
        return dropout_backward(dout, self._mask, self.p, out=self._dx)

    def __repr__(self):
        return f"Dropout(p={self.p}, training={self.training})"


class SoftmaxCrossEntropy(Layer):
    """Softmax cross-entropy loss (SPEC.md): ``loss = forward(logits, target)``, then
    ``backward()`` returns dloss/dlogits, computed in the same fused pass as the loss.

    Keywords as :func:`fastdl.softmax_cross_entropy`; ``population=K`` gives per-model losses of
    shape (K,) (each model's gradient is that of its own loss).
    """

    def __init__(self, axis=-1, reduction="mean", label_smoothing=0.0, ignore_index=-100,
                 population=None):
        self.options = dict(axis=axis, reduction=reduction, label_smoothing=label_smoothing,
                            ignore_index=ignore_index, population=population is not None)
        self._grad = None

    def forward(self, logits, target):
        """The loss of ``logits`` (classes along ``axis``) against ``target`` (class indices
        or probabilities); the gradient is kept for :meth:`backward`."""
        out = _host_buffer(self._grad, logits)
        loss, self._grad = softmax_cross_entropy(logits, target, out=out, **self.options)
        return loss

    def backward(self, dout=1.0):
        """dloss/dlogits times ``dout`` (a scalar: the loss is the end of the network)."""
        if self._grad is None:
            raise ValueError("backward needs a forward first")
        if not _checks.is_real_scalar(dout):
            raise TypeError(f"dout must be a number; got {_checks.describe(dout)}")
        if dout != 1:
            self._grad *= self._grad.dtype.type(dout)
        return self._grad

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"SoftmaxCrossEntropy({options})"
