"""Inverted dropout (SPEC.md), with a mask that depends only on (seed, element index).

``p`` is the drop probability (PyTorch's convention; the notes' keep_prob is 1 - p)::

    mask = u >= p    (u in [0, 1) from a counter-based generator keyed by (seed, index))
    y = x * mask * scale ;  dx = dy * mask * scale ;  scale = 1 / (1 - p), and 0 when p = 1

The same seed gives the same mask on the CPU and the GPU, whatever the number of threads or
blocks: ``kernels/dropout.py`` says how.
"""

import math

import numpy as np

from . import _checks
from ._arrays import c_contiguous, check_out, device_of
from .device import require_cuda

UNIFORM_SCALE = 1 << 24  # u = (24 random bits) / 2**24
MASK64 = (1 << 64) - 1


def seed_key(seed):
    """The generator's 64-bit key for ``seed`` (any int): SplitMix64's output function, so that
    neighbouring seeds give unrelated masks. Returns (low, high) 32-bit halves."""
    z = (seed + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z & 0xFFFFFFFF, z >> 32


def _drop_rates(p, n_models, population):
    """p as float64 (K,) after checking it; K = 1 without a population."""
    if type(p) is float and 0 <= p <= 1:  # the common case, checked cheaply
        return np.full(n_models if population else 1, p)
    return _checks.hyperparameter(p, "p", n_models if population else None,
                                  _checks.closed_unit_interval)


def _thresholds_and_scales(rates, dtype):
    """Integer thresholds ceil(p * 2**24) (u >= p exactly) and scales 1 / (1 - p) (0 at p=1)."""
    thresholds = np.array([math.ceil(p * UNIFORM_SCALE) for p in rates], np.int64)
    with np.errstate(divide="ignore"):
        scales = np.where(rates < 1, 1.0 / (1.0 - rates), 0.0).astype(dtype)
    return thresholds, scales


def _keys(seed, n_models, population, shape):
    """Generator keys per model (int64 (K,) low and high halves) and the model stride of the
    element index: one seed keys the flat index of the whole array; K seeds (a population)
    key model k's own index, so model k gets the mask a lone call with seed k would."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        low, high = seed_key(int(seed))
        return (np.full(n_models, low, np.int64), np.full(n_models, high, np.int64),
                math.prod(shape[1:]) if population else 0)
    if population and not isinstance(seed, (str, bytes)) and np.ndim(seed) == 1:
        seeds = np.asarray(seed)
        if len(seeds) == n_models and seeds.dtype.kind in "iu":
            keys = np.array([seed_key(int(s)) for s in seeds], np.int64).reshape(-1, 2)
            return np.ascontiguousarray(keys[:, 0]), np.ascontiguousarray(keys[:, 1]), 0
        raise ValueError(f"seed must be an int or {n_models} ints (one per model); got "
                         f"{_checks.describe(seed)}")
    raise TypeError(f"seed must be an int{' or one int per model' * population}; got "
                    f"{_checks.describe(seed)}")


def _check_x(x, name, population, device=None):
    where = device_of(x)
    if device is not None and where != device:
        raise TypeError(f"{name} is on {where} but the mask is on {device}: all arrays of a "
                        "call must live on one device")
    if where == "cuda":
        require_cuda()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy or GPU array; got {_checks.describe(x)}")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64; got {x.dtype}")
    if population and len(x.shape) < 1:
        raise ValueError(f"{name} needs a leading model axis with population=True; got a "
                         "0-d array")
    if not c_contiguous(x):
        raise ValueError(f"{name} must be C-contiguous (never copied)")
    return where


def _ops(device):
    if device == "cuda":
        from fastdl.kernels import dropout_cuda

        return dropout_cuda
    from fastdl.kernels import dropout

    return dropout


def dropout_forward(x, p, seed, population=False, out=None, mask_out=None):
    """Drop each element of ``x`` with probability ``p`` and scale the rest by 1 / (1 - p):
    returns ``(y, mask)``.

    x: float32/float64, C-contiguous, any shape (with ``population=True`` a leading axis of K
    models, and p a scalar or one rate per model). seed: an int; the mask of element i
    depends only on (seed, i). With a population, seed may also be K ints: model k's mask is
    then the one a lone call on x[k] with seed[k] would draw. mask: ``np.bool_`` of x's
    shape, on x's device. ``out`` / ``mask_out``: where to write y / the mask (training loops
    reuse buffers).
    """
    device = _check_x(x, "x", population)
    n_models = x.shape[0] if population else 1
    rates = _drop_rates(p, n_models, population)
    keys_low, keys_high, model_stride = _keys(seed, n_models, population, x.shape)
    check_out(out, "out", x, device)
    if mask_out is not None:
        if device_of(mask_out) != device or mask_out.dtype != np.bool_ or \
                tuple(mask_out.shape) != tuple(x.shape) or not c_contiguous(mask_out):
            raise ValueError(f"mask_out must be a C-contiguous bool array of x's shape "
                             f"{tuple(x.shape)} on {device}; got {_checks.describe(mask_out)}")
    thresholds, scales = _thresholds_and_scales(rates, x.dtype)
    ops = _ops(device)
    y = ops.empty_like(x) if out is None else out
    mask = ops.empty_mask(x.shape) if mask_out is None else mask_out
    ops.forward(x, n_models, keys_low, keys_high, model_stride, thresholds, scales, y, mask)
    return y, mask


def dropout_backward(dy, mask, p, out=None):
    """``dx = dy * mask / (1 - p)`` (0 where p = 1): the gradient of :func:`dropout_forward`.

    dy: like the forward's x; mask: the forward's mask; p: the forward's rate(s) (a (K,)
    array means a population of K models along dy's leading axis). ``out``: where to write dx
    (may be dy itself).
    """
    device = _check_x(dy, "dy", False, device_of(mask))
    if getattr(mask, "dtype", None) != np.bool_ or tuple(mask.shape) != tuple(dy.shape):
        raise ValueError(f"mask must be the forward's bool mask of dy's shape "
                         f"{tuple(dy.shape)}; got {_checks.describe(mask)}")
    population = np.ndim(p) == 1
    if population and (len(dy.shape) < 1 or dy.shape[0] != len(p)):
        raise ValueError(f"p has {len(p)} rates (a population) but dy has shape "
                         f"{tuple(dy.shape)}: its leading axis must be the {len(p)} models")
    n_models = dy.shape[0] if population else 1
    rates = _drop_rates(p, n_models, population)
    check_out(out, "out", dy, device, like_name="dy")
    _, scales = _thresholds_and_scales(rates, dy.dtype)
    ops = _ops(device)
    dx = ops.empty_like(dy) if out is None else out
    ops.backward(dy, mask, n_models, scales, dx)
    return dx
