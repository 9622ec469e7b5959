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

import math
from typing import NamedTuple

import numpy as np

from . import _checks
from .device import is_device_array


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
    plan: object  # the kernels' work plan for this shape


def _view_shape(shape, axis, population):
    """(K, outer, C, inner) of an input shape (axis counted on the per-model shape)."""
    n_models = shape[0] if population else 1
    per_model = shape[1:] if population else shape
    return (n_models, math.prod(per_model[:axis]), per_model[axis],
            math.prod(per_model[axis + 1:]))


def _check_input(x, name, population):
    if is_device_array(x):
        raise NotImplementedError(f"{name} is a GPU array; the CUDA batch norm is not built yet")
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array; got {_checks.describe(x)}")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64; got {x.dtype}")
    rank = x.ndim - (1 if population else 0)
    if not 2 <= rank <= 5:
        what = "per-model rank" if population else "rank"
        raise ValueError(f"{name} must have {what} 2 to 5; got shape {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (never copied); pass "
                         f"np.ascontiguousarray({name})")


def _check_channel_axis(channel_axis, rank):
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise TypeError(f"channel_axis must be an int; got {_checks.describe(channel_axis)}")
    if not -rank <= channel_axis < rank:
        raise ValueError(f"channel_axis must be in [{-rank}, {rank}) for a rank-{rank} input; "
                         f"got {channel_axis}")
    return int(channel_axis) % rank


def _check_per_channel(a, name, shape, dtype, writable=False):
    if a is None:
        return
    if is_device_array(a):
        raise TypeError(f"{name} is a GPU array but x is a NumPy array: all arrays of a call "
                        "must live on one device")
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array of shape {shape}; got "
                        f"{_checks.describe(a)}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} like x; got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (one value per channel"
                         f"{' and model' if len(shape) == 2 else ''}); got {a.shape}")
    if writable and not (a.flags.writeable and a.flags.c_contiguous):
        raise ValueError(f"{name} is updated in place: it must be writable and C-contiguous")


def _check_out(out, name, like, forbid_overlap=None):
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array; got {_checks.describe(out)}")
    if out.dtype != like.dtype or out.shape != like.shape:
        raise ValueError(f"{name} must have shape {like.shape} and dtype {like.dtype}; got "
                         f"{_checks.describe(out)}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"{name} must be writable and C-contiguous")
    if forbid_overlap is not None and np.may_share_memory(out, forbid_overlap):
        raise ValueError(f"{name} must not overlap x: backward reads x from the cache")


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
    _check_input(x, "x", population)
    rank = x.ndim - (1 if population else 0)
    axis = _check_channel_axis(channel_axis, rank)
    view = _view_shape(x.shape, axis, population)
    n_models, outer, channels, inner = view
    per_channel = (n_models, channels) if population else (channels,)
    for name, a in [("gamma", gamma), ("beta", beta)]:
        _check_per_channel(a, name, per_channel, x.dtype)
    for name, a in [("running_mean", running_mean), ("running_var", running_var)]:
        _check_per_channel(a, name, per_channel, x.dtype, writable=training)
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
    _check_out(out, "out", x, forbid_overlap=x)

    from fastdl.kernels import batchnorm as kernels

    plan = kernels.plan(*view)
    x_view = x.reshape(plan.view_shape)
    if training:
        shift = np.ascontiguousarray(x.reshape(view)[:, 0, :, 0])  # one sample per channel
        s1, s2 = kernels.channel_moments(plan, x_view, shift)
        centered_mean = s1 / m
        mean = shift + centered_mean
        var = np.maximum(s2 / m - centered_mean * centered_mean, 0.0)
        if running_mean is not None:
            stats = [(running_mean, mean), (running_var, var * m / (m - 1))]
            for running, batch in stats:
                running[...] = ((1 - momentum) * running.reshape(n_models, channels)
                                + momentum * batch).reshape(running.shape)
    else:
        mean = running_mean.reshape(n_models, channels).astype(np.float64)
        var = running_var.reshape(n_models, channels).astype(np.float64)
    inv_std = 1.0 / np.sqrt(var + eps)
    gamma64 = 1.0 if gamma is None else gamma.reshape(n_models, channels).astype(np.float64)
    beta64 = 0.0 if beta is None else beta.reshape(n_models, channels).astype(np.float64)
    scale = gamma64 * inv_std
    # y = (x - mean_near) * scale + (beta - (mean - mean_near) * scale)
    mean_near, mean_error = _split_mean(mean, x.dtype)
    y = np.empty_like(x) if out is None else out
    kernels.affine(plan, x_view, mean_near, scale.astype(x.dtype),
                   (beta64 - mean_error * scale).astype(x.dtype), y.reshape(plan.view_shape))
    shape = per_channel
    cache = BatchNormCache(x, mean.reshape(shape), inv_std.reshape(shape), gamma,
                           bool(training), axis, bool(population), m, plan)
    return y, cache


def batch_norm_backward(dy, cache, out=None):
    """Gradients of batch norm: returns ``(dx, dgamma, dbeta)``.

    dy: like the forward's x; ``cache`` from :func:`batch_norm_forward`; ``out``: where to
    write dx (may be dy itself). dgamma and dbeta have gamma's shape and x's dtype.
    """
    if not isinstance(cache, BatchNormCache):
        raise TypeError(f"cache must be the BatchNormCache of batch_norm_forward; got "
                        f"{type(cache).__name__}")
    x = cache.x
    _check_input(dy, "dy", cache.population)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        error = TypeError if dy.dtype != x.dtype else ValueError
        raise error(f"dy must have the forward input's shape {x.shape} and dtype {x.dtype}; "
                    f"got {_checks.describe(dy)}")
    _check_out(out, "out", x)

    from fastdl.kernels import batchnorm as kernels

    plan, m = cache.plan, cache.m
    n_models, channels = plan.view_shape[0], plan.view_shape[2]
    mean = cache.mean.reshape(n_models, channels)
    inv_std = cache.inv_std.reshape(n_models, channels)
    x_view, dy_view = x.reshape(plan.view_shape), dy.reshape(plan.view_shape)
    mean_near, mean_error = _split_mean(mean, x.dtype)
    sum_dy, sum_dy_xnear = kernels.channel_comoments(plan, dy_view, x_view, mean_near)
    dbeta = sum_dy
    dgamma = (sum_dy_xnear - mean_error * sum_dy) * inv_std  # sum(dy * (x - mean)) * inv_std
    gamma = (1.0 if cache.gamma is None
             else cache.gamma.reshape(n_models, channels).astype(np.float64))
    a = gamma * inv_std * np.ones_like(mean)
    if cache.training:
        b = -a * inv_std * dgamma / m
        c0 = -a * dbeta / m
    else:
        b = c0 = np.zeros_like(mean)
    dx = np.empty_like(x) if out is None else out
    kernels.input_grad(plan, dy_view, x_view, a.astype(x.dtype), b.astype(x.dtype), mean_near,
                       (c0 - b * mean_error).astype(x.dtype), dx.reshape(plan.view_shape))
    shape = cache.mean.shape
    return dx, dgamma.reshape(shape).astype(x.dtype), dbeta.reshape(shape).astype(x.dtype)
