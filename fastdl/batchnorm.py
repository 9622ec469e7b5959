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

Synchronized across W processes (``comm=``, data-parallel training): each rank sums n,
sum(x - c) and sum((x - c)**2) per channel in float64, shifted by c = the running mean (the
same on every rank; the kernels sum shifted by a sample, moved to c in float64), and one
SUM-allreduce gives the global mean and variance; backward
allreduces the per-channel sums of dy and dy * xhat, so dx is the gradient of the global batch's
statistics, while dgamma and dbeta stay the rank's own (the gradient allreduce adds them).
"""

from typing import NamedTuple

import numpy as np

from . import _dispatch, _validate
from ._dispatch import CudaOps, HostOps


class BatchNormCache(NamedTuple):
    """What backward needs; ``x`` is held by reference (do not modify it before backward)."""

    x: object
    mean: np.ndarray  # float64, (C,) or (K, C): batch mean (training) or running mean
    inv_std: np.ndarray  # float64, 1 / sqrt(var + eps)
    gamma: object  # None means 1
    training: bool
    channel_axis: int
    population: bool
    m: int  # values per channel (over every rank when synchronized)
    ops: object  # the device's kernels, with their work plan for this shape
    comm: object = None  # synchronized batch norm: what the backward sums are reduced over


class _BatchNormCpu(HostOps):
    """The CPU kernels (``kernels/batchnorm.py``) on NumPy arrays of the (K, outer, C, inner)
    ``view``, with their work plan (cached per shape in the kernel module)."""

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
        """(sum(dy), sum(dy * (x - mean))), float64 (K, C)."""
        return self.kernels.channel_comoments(self.plan, self._as_view(dy), self._as_view(x),
                                              mean)

    def affine(self, x, mean, scale, shift, y):
        """y = (x - mean) * scale + shift, per-channel coefficients."""
        self.kernels.affine(self.plan, self._as_view(x), mean, scale, shift, self._as_view(y))

    def input_grad(self, dy, x, a, b, mean, c0, dx):
        """dx = a * dy + b * (x - mean) + c0, per-channel coefficients."""
        self.kernels.input_grad(self.plan, self._as_view(dy), self._as_view(x), a, b, mean, c0,
                                self._as_view(dx))

    def affine_relu_dropout(self, x, mean, scale, shift, draw, y):
        """y = dropout(relu((x - mean) * scale + shift)), ``draw`` a fastdl.dropout.MaskDraw
        (rows plans only: kernels/block.py)."""
        from fastdl.kernels import block

        block.affine_relu_dropout(self.plan, self._as_view(x), mean, scale, shift, *draw,
                                  self._as_view(y))

    # coefficients(values, dtype): per-channel host values (K, C) as the kernels take them,
    # (K, C) arrays of dtype (no copy when they already are)
    coefficients = staticmethod(HostOps.from_host)


class _BatchNormCuda(CudaOps):
    """The CUDA kernels (``kernels/batchnorm_cuda.py``) on device arrays, passed flat: two
    launches a pass-pair (a reduction, then the elementwise pass); per-channel values cross to
    the host, where the statistics and coefficients are computed in float64."""

    def __init__(self, view):
        super().__init__()
        from fastdl.kernels import batchnorm_cuda as kernels

        self.kernels = kernels
        self.view = view

    def moments(self, x):
        n_models, _, channels, _ = self.view
        x = self.flat(x)
        shift = self.zeros(n_models * channels, x.dtype)  # written by the kernel: a sample
        s1, s2 = self.kernels.channel_sums(x, x, shift, shift, self.view, sample_shift=True)
        return shift.copy_to_host().reshape(n_models, channels).astype(np.float64), s1, s2

    def comoments(self, dy, x, mean):
        return self.kernels.channel_sums(self.flat(dy), self.flat(x),
                                         self.zeros(mean.size, mean.dtype),
                                         self.coefficients(mean, mean.dtype), self.view,
                                         sample_shift=False)

    def affine(self, x, mean, scale, shift, y):
        self.kernels.affine(self.flat(x), self.view, mean, scale, shift, self.flat(y))

    def input_grad(self, dy, x, a, b, mean, c0, dx):
        self.kernels.input_grad(self.flat(dy), self.flat(x), self.view, a, b, mean, c0,
                                self.flat(dx))

    def coefficients(self, values, dtype):
        """Per-channel host values (K, C) as the kernels take them: flat (K * C) device
        arrays of ``dtype``."""
        return self.from_host(np.reshape(values, -1), dtype)


_FAMILY = {"cpu": _BatchNormCpu, "cuda": _BatchNormCuda}


def _split_mean(mean, dtype):
    """The float64 mean as the nearest float of the storage dtype, and the (float64) rest."""
    near = mean.astype(dtype)
    return near, mean - near


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training=True, momentum=0.1,
                       eps=1e-5, channel_axis=1, population=False, out=None, comm=None):
    """Normalize ``x`` per channel; returns ``(y, cache)``.

    x: float32/float64, C-contiguous, rank 2-5 (with ``population=True`` a leading axis of K
    models is added and statistics are per model and channel). gamma, beta, running_mean,
    running_var: (C,) arrays of x's dtype ((K, C) for a population); gamma / beta None mean
    1 / 0; running statistics None are not tracked in training and are required at test time.
    Training updates the running statistics in place, with ``momentum`` (a scalar, or (K,)
    values for a population). ``out``: where to write y. An input
    with no values (an empty batch, or C = 0) gives an empty y and leaves the running
    statistics alone, as torch.nn.functional.batch_norm.

    ``comm``: synchronized batch norm (the module docstring) over the ranks of a
    ``fastdl.distributed`` communicator (or any object with ``size`` and an in-place
    ``allreduce(float64 array)`` giving every rank the same bits); the training statistics are
    the global batch's. A rank may hold no rows; with one rank it is the plain batch norm, bit
    for bit. Every rank calls it (a collective)."""
    return _forward(x, gamma, beta, running_mean, running_var, training, momentum, eps,
                    channel_axis, population, out, comm=comm)


def _forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, channel_axis,
             population, out, relu_dropout=None, comm=None):
    """:func:`batch_norm_forward`; with ``relu_dropout`` (a ``fastdl.dropout.MaskDraw``, CPU
    and the rows layout only: fastdl._block checks) y is ``dropout(relu(batch norm))`` in one
    pass (kernels/block.py), the block's output."""
    population = _validate.population_flag(population)
    device = _validate.float_array(x, "x", population, ranks=(2, 5))
    rank = len(x.shape) - int(population)
    axis = _validate.axis(channel_axis, rank, "channel_axis")
    view = _validate.view_shape(tuple(x.shape), axis, population)
    n_models, outer, channels, inner = view
    per_channel = (n_models, channels) if population else (channels,)
    training = _validate.flag(training, "training")
    for name, a in [("gamma", gamma), ("beta", beta)]:
        _validate.per_model_array(a, name, per_channel, x.dtype, device)
    for name, a in [("running_mean", running_mean), ("running_var", running_var)]:
        _validate.per_model_array(a, name, per_channel, x.dtype, device, writable=training)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var go together: give both or neither")
    if not training and running_mean is None:
        raise ValueError("training=False normalizes with the running statistics: "
                         "running_mean and running_var are required (got None)")
    m = outer * inner
    sync = training and comm is not None and comm.size > 1
    if training and m == 1 and not sync:
        raise ValueError(f"training needs more than one value per channel (x of shape "
                         f"{x.shape} has 1 per channel at channel_axis={channel_axis})")
    # (K, 1): one momentum per model (a scalar, or K values with a population)
    momentum = _validate.hyperparameter(momentum, "momentum", n_models if population else None,
                                        _validate.closed_unit_interval)[:, None]
    eps = _validate.number(eps, "eps", _validate.positive)
    _validate.check_out(out, "out", x, device, forbid_overlap=x,
                        reason="x: backward reads x from the cache")
    if sync and channels > 0:  # (no channels on any rank: nothing to reduce)
        return _synchronized_forward(x, gamma, beta, running_mean, running_var, momentum, eps,
                                     axis, population, view, per_channel, device, out, comm,
                                     relu_dropout)
    if 0 in view:  # an empty batch or no channels: PyTorch's empty y, statistics untouched
        return _empty_forward(x, gamma, training, axis, population, m, device, per_channel,
                              out)

    ops = _dispatch.select(_FAMILY, device, view)
    if training:
        shift, s1, s2 = ops.moments(x)
        centered_mean = s1 / m
        mean = shift + centered_mean
        var = np.maximum(s2 / m - centered_mean * centered_mean, 0.0)
        if running_mean is not None:
            _update_running(ops, running_mean, running_var, mean, var, m, momentum)
    else:
        mean = ops.to_host(running_mean).reshape(n_models, channels).astype(np.float64)
        var = ops.to_host(running_var).reshape(n_models, channels).astype(np.float64)
    return _normalize(ops, x, mean, var, gamma, beta, eps, training, axis, population, m,
                      per_channel, out, relu_dropout)


def _update_running(ops, running_mean, running_var, mean, var, m, momentum):
    """The running statistics' EWA step with the batch's mean and (unbiased) variance."""
    n_models, channels = mean.shape
    for running, batch in [(running_mean, mean), (running_var, var * m / (m - 1))]:
        old = ops.to_host(running).reshape(n_models, channels).astype(np.float64)
        ops.write(running, ((1 - momentum) * old + momentum * batch).reshape(running.shape))


def _normalize(ops, x, mean, var, gamma, beta, eps, training, axis, population, m, per_channel,
               out, relu_dropout=None, comm=None):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with float64 (K, C) statistics (then
    relu and dropout with ``relu_dropout``); returns (y, cache)."""
    n_models, channels = mean.shape
    inv_std = 1.0 / np.sqrt(var + eps)
    gamma64 = _per_channel_host(ops, gamma, n_models, channels, 1.0)
    beta64 = _per_channel_host(ops, beta, n_models, channels, 0.0)
    scale = gamma64 * inv_std
    # y = (x - mean_near) * scale + (beta - (mean - mean_near) * scale)
    mean_near, mean_error = _split_mean(mean, x.dtype)
    y = ops.empty_like(x) if out is None else out
    coefficients = (ops.coefficients(mean_near, x.dtype), ops.coefficients(scale, x.dtype),
                    ops.coefficients(beta64 - mean_error * scale, x.dtype))
    if relu_dropout is None:
        ops.affine(x, *coefficients, y)
    else:
        ops.affine_relu_dropout(x, *coefficients, relu_dropout, y)
    cache = BatchNormCache(x, mean.reshape(per_channel), inv_std.reshape(per_channel), gamma,
                           training, axis, population, m, ops, comm)
    return y, cache


def _synchronized_forward(x, gamma, beta, running_mean, running_var, momentum, eps, axis,
                          population, view, per_channel, device, out, comm, relu_dropout):
    """Training batch norm over every rank's rows: float64 sums shifted by the running mean,
    one allreduce of (n, sum(x - c), sum((x - c)**2)) per (model, channel)."""
    n_models, outer, channels, inner = view
    empty = 0 in view  # a rank may hold no rows: no kernels, but its part in the allreduce
    ops = _dispatch.arrays(device) if empty else _dispatch.select(_FAMILY, device, view)
    # The sums over this rank's rows, shifted by a sample (accurate in the storage dtype
    # whatever the mean), are moved in float64 to the common shift c = the running mean (the
    # same on every rank): sum(x - c) = s1 + n d and sum((x - c)**2) = s2 + 2 d s1 + n d**2,
    # d = sample - c. Summing float32 (x - c)**2 with c = 0 (the first step) lost the variance
    # of inputs of mean 1e2; float64 keeps (mean - c)**2 / var * 1e-16 of it.
    if running_mean is not None:
        common = ops.to_host(running_mean).reshape(n_models, channels).astype(np.float64)
    else:
        common = np.zeros((n_models, channels))
    sums = np.zeros((3, n_models, channels))
    sums[0] = n = outer * inner
    if not empty:
        sample, s1, s2 = ops.moments(x)
        d = sample - common
        sums[1], sums[2] = s1 + n * d, s2 + 2 * d * s1 + n * d * d
    comm.allreduce(sums)
    m = int(sums[0].flat[0]) if sums[0].size else 0
    if m < 2:
        raise ValueError(f"training needs more than one value per channel over all ranks; "
                         f"the {comm.size} ranks hold {m}")
    centered_mean = sums[1] / m
    mean = common + centered_mean
    var = np.maximum(sums[2] / m - centered_mean * centered_mean, 0.0)
    if running_mean is not None:
        _update_running(ops, running_mean, running_var, mean, var, m, momentum)
    if empty:  # no rows here: an empty y; the statistics above were the others'
        y = ops.empty_like(x) if out is None else out
        inv_std = 1.0 / np.sqrt(var + eps)
        return y, BatchNormCache(x, mean.reshape(per_channel), inv_std.reshape(per_channel),
                                 gamma, True, axis, population, m, _EmptyOps(device, view), comm)
    return _normalize(ops, x, mean, var, gamma, beta, eps, True, axis, population, m,
                      per_channel, out, relu_dropout, comm)


class _EmptyOps:
    """The cache's ``ops`` for an empty input: no kernels, the (K, outer, C, inner) view and
    the device's allocation helpers."""

    def __init__(self, device, view):
        self.device, self.view, self.arrays = device, view, _dispatch.arrays(device)


def _empty_forward(x, gamma, training, axis, population, m, device, per_channel, out):
    """Batch norm of an input with no values (m = 0 or C = 0), as torch.nn.functional.
    batch_norm: an empty y, and running statistics left as they are (no batch to average)."""
    arrays = _dispatch.arrays(device)
    y = arrays.empty_like(x) if out is None else out
    view = _validate.view_shape(tuple(x.shape), axis, population)
    cache = BatchNormCache(x, np.zeros(per_channel), np.ones(per_channel), gamma, training, axis,
                           population, m, _EmptyOps(device, view))
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
    device = _validate.float_array(dy, "dy", cache.population, ranks=(2, 5),
                                   device=cache.ops.device, other="the forward input was")
    if tuple(dy.shape) != tuple(x.shape) or dy.dtype != x.dtype:
        error = TypeError if dy.dtype != x.dtype else ValueError
        raise error(f"dy must have the forward input's shape {x.shape} and dtype {x.dtype}; "
                    f"got {_validate.describe(dy)}")
    _validate.check_out(out, "out", x, device)
    if isinstance(cache.ops, _EmptyOps):  # no values: an empty dx, sums over nothing are 0
        if cache.comm is not None:  # the other ranks' backward reduces with this one's zeros
            view = cache.ops.view
            cache.comm.allreduce(np.zeros((2, view[0], view[2])))
        arrays = cache.ops.arrays
        return (arrays.empty_like(x) if out is None else out,
                arrays.zeros(cache.mean.shape, x.dtype), arrays.zeros(cache.mean.shape, x.dtype))

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
        total_dbeta, total_dgamma = dbeta, dgamma
        if cache.comm is not None:  # dx follows the global batch's sums; dgamma, dbeta stay
            total_dbeta, total_dgamma = cache.comm.allreduce(np.stack([dbeta, dgamma]))
        b = -a * inv_std * total_dgamma / m
        c0 = -a * total_dbeta / m
    else:
        b = c0 = np.zeros_like(mean)
    dx = ops.empty_like(x) if out is None else out
    ops.input_grad(dy, x, ops.coefficients(a, x.dtype), ops.coefficients(b, x.dtype),
                   ops.coefficients(mean_near, x.dtype),
                   ops.coefficients(c0 - b * mean_error, x.dtype), dx)
    shape = cache.mean.shape
    return dx, ops.from_host(dgamma.reshape(shape), x.dtype), \
        ops.from_host(dbeta.reshape(shape), x.dtype)
