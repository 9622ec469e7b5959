"""Batch normalization, forward and backward, training and test time, any channel axis.

Statistics are per channel over every other axis (m values per channel)::

    mu = mean(x) ;  var = mean((x - mu)**2)                    (biased, used to normalize)
    y = gamma * (x - mu) / sqrt(var + eps) + beta
    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)   (unbiased)

Backward, with xhat = (x - mu) * inv_std::

    dbeta = sum(dy) ;  dgamma = sum(dy * xhat)
    training:  dx = gamma * inv_std * (dy - dbeta/m - xhat * dgamma/m)
    test time: dx = gamma * inv_std * dy       (running statistics held constant, as PyTorch)

``channel_axis`` is any axis of the (per-model) input: 1 for PyTorch's (N, C) / (N, C, H, W),
0 for the notes' (features, examples), -1 for channels-last. Inputs are C-contiguous and never
copied; each layout has its own loop order (``kernels/batchnorm.py``).
"""

from typing import NamedTuple

import numpy as np

from . import _checks
from ._arrays import c_contiguous, check_out, device_of, view_shape
from .device import require_cuda


class BatchNormCache(NamedTuple):
    """What backward needs; ``x`` is held by reference (do not modify it before backward)."""

    x: object
    mean: np.ndarray  # float64, (C,) or (K, C): batch mean (training) or running mean
    inv_std: np.ndarray  # float64, 1 / sqrt(var + eps)
    gamma: object  # None means 1
    training: bool
    channel_axis: int
    population: bool
    m: int  # values per channel
    ops: object  # the device's kernels, with their work plan for this shape


def _check_input(x, name, population, device=None):
    """Check an input array; returns its device ("cpu" or "cuda")."""
    where = device_of(x)
    if device is not None and where != device:
        raise TypeError(f"{name} is on {where} but the forward input was on {device}: all "
                        "arrays of a call must live on one device")
    if where == "cuda":
        require_cuda()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy or GPU array; got {_checks.describe(x)}")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64; got {x.dtype}")
    rank = len(x.shape) - (1 if population else 0)
    if not 2 <= rank <= 5:
        what = "per-model rank" if population else "rank"
        raise ValueError(f"{name} must have {what} 2 to 5; got shape {tuple(x.shape)}")
    if not c_contiguous(x):
        raise ValueError(f"{name} must be C-contiguous (never copied); pass "
                         f"np.ascontiguousarray({name}) (or its device equivalent)")
    return where


def _check_channel_axis(channel_axis, rank):
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise TypeError(f"channel_axis must be an int; got {_checks.describe(channel_axis)}")
    if not -rank <= channel_axis < rank:
        raise ValueError(f"channel_axis must be in [{-rank}, {rank}) for a rank-{rank} input; "
                         f"got {channel_axis}")
    return int(channel_axis) % rank


def _check_per_channel(a, name, shape, dtype, device, writable=False):
    if a is None:
        return
    where = device_of(a)
    if where != device:
        raise TypeError(f"{name} is {'a GPU array' if where == 'cuda' else 'on the host'} but "
                        f"x is on {device}: all arrays of a call must live on one device")
    if where == "cpu" and not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array of shape {shape}; got "
                        f"{_checks.describe(a)}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} like x; got {a.dtype}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (one value per channel"
                         f"{' and model' if len(shape) == 2 else ''}); got {tuple(a.shape)}")
    if writable and not (c_contiguous(a) and (where == "cuda" or a.flags.writeable)):
        raise ValueError(f"{name} is updated in place: it must be writable and C-contiguous")


class _CpuOps:
    """The CPU kernels (``kernels/batchnorm.py``) on NumPy arrays."""

    device = "cpu"

    def __init__(self, view):
        from fastdl.kernels import batchnorm as kernels

        self.kernels = kernels
        self.plan = kernels.plan(*view)
        self.view = view

    def _as_view(self, a):
        return a.reshape(self.plan.view_shape)

    def moments(self, x):
        """(shift, sum(x - shift), sum((x - shift)**2)), float64 (K, C); shift: a sample."""
        shift = np.ascontiguousarray(x.reshape(self.view)[:, 0, :, 0])
        s1, s2 = self.kernels.channel_moments(self.plan, self._as_view(x), shift)
        return shift.astype(np.float64), s1, s2

    def comoments(self, dy, x, mean):
        return self.kernels.channel_comoments(self.plan, self._as_view(dy), self._as_view(x),
                                              mean)

    def affine(self, x, mean, scale, shift, y):
        self.kernels.affine(self.plan, self._as_view(x), mean, scale, shift, self._as_view(y))

    def input_grad(self, dy, x, a, b, mean, c0, dx):
        self.kernels.input_grad(self.plan, self._as_view(dy), self._as_view(x), a, b, mean, c0,
                                self._as_view(dx))

    def coefficients(self, values, dtype):
        return np.ascontiguousarray(values, dtype)

    empty_like = staticmethod(np.empty_like)

    @staticmethod
    def to_host(a):
        return a

    @staticmethod
    def write(a, values):
        a[...] = values


class _CudaOps:
    """The CUDA kernels (``kernels/batchnorm_cuda.py``) on device arrays: two launches a
    pass-pair (a reduction, then the elementwise pass); per-channel values cross to the host,
    where the statistics and coefficients are computed in float64."""

    device = "cuda"

    def __init__(self, view):
        from fastdl.kernels import batchnorm_cuda as kernels
        from fastdl.kernels.cudalib import as_cuda_array, cuda

        self.kernels, self.cuda, self.as_cuda_array = kernels, cuda, as_cuda_array
        self.view = view
        self.plan = view

    def _flat(self, a):
        a = self.as_cuda_array(a)
        return a.reshape(a.size) if len(a.shape) != 1 else a

    def moments(self, x):
        n_models, _, channels, _ = self.view
        x = self._flat(x)
        shift = self.cuda.to_device(np.zeros(n_models * channels, x.dtype))
        s1, s2 = self.kernels.channel_sums(x, x, shift, shift, self.view, sample_shift=True)
        return shift.copy_to_host().reshape(n_models, channels).astype(np.float64), s1, s2

    def comoments(self, dy, x, mean):
        zeros = self.cuda.to_device(np.zeros(mean.size, mean.dtype))
        return self.kernels.channel_sums(self._flat(dy), self._flat(x), zeros,
                                         self.coefficients(mean, mean.dtype), self.view,
                                         sample_shift=False)

    def affine(self, x, mean, scale, shift, y):
        self.kernels.affine(self._flat(x), self.view, mean, scale, shift, self._flat(y))

    def input_grad(self, dy, x, a, b, mean, c0, dx):
        self.kernels.input_grad(self._flat(dy), self._flat(x), self.view, a, b, mean, c0,
                                self._flat(dx))

    def coefficients(self, values, dtype):
        return self.cuda.to_device(np.ascontiguousarray(values, dtype).reshape(-1))

    def empty_like(self, a):
        a = self.as_cuda_array(a)
        return self.cuda.device_array(a.shape, a.dtype)

    def to_host(self, a):
        return self.as_cuda_array(a).copy_to_host()

    def write(self, a, values):
        self.as_cuda_array(a).copy_to_device(np.ascontiguousarray(values, a.dtype))


def _split_mean(mean, dtype):
    """The float64 mean as the nearest float of the storage dtype, and the (float64) rest."""
    near = mean.astype(dtype)
    return near, mean - near


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training=True, momentum=0.1,
                       eps=1e-5, channel_axis=1, population=False, out=None):
    """Normalize ``x`` per channel; returns ``(y, cache)``.

    x: float32/float64, C-contiguous, rank 2-5 (with ``population=True`` a leading axis of K
    models is added and statistics are per model and channel). gamma, beta, running_mean,
    running_var: (C,) arrays of x's dtype ((K, C) for a population); gamma / beta None mean
    1 / 0; running statistics None are not tracked in training and are required at test time.
    Training updates the running statistics in place. ``out``: where to write y.
    """
    device = _check_input(x, "x", population)
    rank = len(x.shape) - (1 if population else 0)
    axis = _check_channel_axis(channel_axis, rank)
    view = view_shape(tuple(x.shape), axis, population)
    n_models, outer, channels, inner = view
    per_channel = (n_models, channels) if population else (channels,)
    for name, a in [("gamma", gamma), ("beta", beta)]:
        _check_per_channel(a, name, per_channel, x.dtype, device)
    for name, a in [("running_mean", running_mean), ("running_var", running_var)]:
        _check_per_channel(a, name, per_channel, x.dtype, device, writable=training)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var go together: give both or neither")
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a bool; got {_checks.describe(training)}")
    if not training and running_mean is None:
        raise ValueError("training=False normalizes with the running statistics: "
                         "running_mean and running_var are required (got None)")
    m = outer * inner
    if training and m == 1:
        raise ValueError(f"training needs more than one value per channel (x of shape "
                         f"{x.shape} has 1 per channel at channel_axis={channel_axis})")
    if not _checks.is_real_scalar(momentum) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1]; got {momentum!r}")
    if not _checks.is_real_scalar(eps) or not eps > 0:
        raise ValueError(f"eps must be a number > 0; got {eps!r}")
    check_out(out, "out", x, device, forbid_overlap=x,
              reason="x: backward reads x from the cache")

    ops = _CudaOps(view) if device == "cuda" else _CpuOps(view)
    if training:
        shift, s1, s2 = ops.moments(x)
        centered_mean = s1 / m
        mean = shift + centered_mean
        var = np.maximum(s2 / m - centered_mean * centered_mean, 0.0)
        if running_mean is not None:
            for running, batch in [(running_mean, mean), (running_var, var * m / (m - 1))]:
                old = ops.to_host(running).reshape(n_models, channels).astype(np.float64)
                ops.write(running, ((1 - momentum) * old + momentum * batch).reshape(
                    running.shape))
    else:
        mean = ops.to_host(running_mean).reshape(n_models, channels).astype(np.float64)
        var = ops.to_host(running_var).reshape(n_models, channels).astype(np.float64)
    inv_std = 1.0 / np.sqrt(var + eps)
    gamma64 = _per_channel_host(ops, gamma, n_models, channels, 1.0)
    beta64 = _per_channel_host(ops, beta, n_models, channels, 0.0)
    scale = gamma64 * inv_std
    # y = (x - mean_near) * scale + (beta - (mean - mean_near) * scale)
    mean_near, mean_error = _split_mean(mean, x.dtype)
    y = ops.empty_like(x) if out is None else out
    ops.affine(x, ops.coefficients(mean_near, x.dtype), ops.coefficients(scale, x.dtype),
               ops.coefficients(beta64 - mean_error * scale, x.dtype), y)
    cache = BatchNormCache(x, mean.reshape(per_channel), inv_std.reshape(per_channel), gamma,
                           bool(training), axis, bool(population), m, ops)
    return y, cache


def _per_channel_host(ops, a, n_models, channels, default):
    if a is None:
        return np.full((n_models, channels), default)
    return ops.to_host(a).reshape(n_models, channels).astype(np.float64)


def batch_norm_backward(dy, cache, out=None):
    """Gradients of batch norm: returns ``(dx, dgamma, dbeta)``.

    dy: like the forward's x; ``cache`` from :func:`batch_norm_forward`; ``out``: where to
    write dx (may be dy itself). dgamma and dbeta have gamma's shape and x's dtype.
    """
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"cache must be the BatchNormCache of batch_norm_forward; got "
                        f"{type(cache).__name__}")
    x = cache.x
    device = _check_input(dy, "dy", cache.population, cache.ops.device)
    if tuple(dy.shape) != tuple(x.shape) or dy.dtype != x.dtype:
        error = TypeError if dy.dtype != x.dtype else ValueError
        raise error(f"dy must have the forward input's shape {x.shape} and dtype {x.dtype}; "
                    f"got {_checks.describe(dy)}")
    check_out(out, "out", x, device)

    ops, m = cache.ops, cache.m
    n_models, channels = ops.view[0], ops.view[2]
    mean = cache.mean.reshape(n_models, channels)
    inv_std = cache.inv_std.reshape(n_models, channels)
    mean_near, mean_error = _split_mean(mean, x.dtype)
    sum_dy, sum_dy_xnear = ops.comoments(dy, x, mean_near)
    dbeta = sum_dy
    dgamma = (sum_dy_xnear - mean_error * sum_dy) * inv_std  # sum(dy * (x - mean)) * inv_std
    a = _per_channel_host(ops, cache.gamma, n_models, channels, 1.0) * inv_std
    if cache.training:
        b = -a * inv_std * dgamma / m
        c0 = -a * dbeta / m
    else:
        b = c0 = np.zeros_like(mean)
    dx = ops.empty_like(x) if out is None else out
    ops.input_grad(dy, x, ops.coefficients(a, x.dtype), ops.coefficients(b, x.dtype),
                   ops.coefficients(mean_near, x.dtype),
                   ops.coefficients(c0 - b * mean_error, x.dtype), dx)
    shape = cache.mean.shape
    dgamma, dbeta = dgamma.reshape(shape).astype(x.dtype), dbeta.reshape(shape).astype(x.dtype)
    if ops.device == "cuda":
        dgamma, dbeta = ops.cuda.to_device(dgamma), ops.cuda.to_device(dbeta)
    return dx, dgamma, dbeta
