"""Inverted dropout (SPEC.md), with a mask that depends only on (seed, element index).

``p`` is the drop probability (PyTorch's convention; the notes' keep_prob is 1 - p)::

    mask = u >= p    (u in [0, 1) from a counter-based generator keyed by (seed, index))
    y = x * mask * scale ;  dx = dy * mask * scale ;  scale = 1 / (1 - p), and 0 when p = 1

The same seed gives the same mask on the CPU and the GPU, whatever the number of threads or
blocks: ``kernels/dropout.py`` says how.
"""

import math
from typing import NamedTuple

import numpy as np

from . import _dispatch, _validate
from ._dispatch import CudaOps, HostOps
from .device import location

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


def _thresholds_and_scales(rates, dtype):
    """Integer thresholds ceil(p * 2**24) (u >= p exactly) and scales 1 / (1 - p) (0 at p=1)."""
    thresholds = np.array([math.ceil(p * UNIFORM_SCALE) for p in rates], np.int64)
    with np.errstate(divide="ignore"):
        scales = np.where(rates < 1, 1.0 / (1.0 - rates), 0.0).astype(dtype)
    return thresholds, scales


def _keys(seed, n_models, population, shape):
    """Generator keys per model (int64 (K,) low and high halves) and the model stride of the
    element index, for a checked ``seed``: one seed (an int) keys the flat index of the whole
    array; K seeds (a population's list) key model k's own index, so model k gets the mask a
    lone call with seed k would."""
    if isinstance(seed, int):
        low, high = seed_key(seed)
        return (np.full(n_models, low, np.int64), np.full(n_models, high, np.int64),
                math.prod(shape[1:]) if population else 0)
    keys = np.array([seed_key(s) for s in seed], np.int64).reshape(-1, 2)
    return np.ascontiguousarray(keys[:, 0]), np.ascontiguousarray(keys[:, 1]), 0


class _DropoutCpu(HostOps):
    """The CPU kernels (``kernels/dropout.py``) on NumPy arrays: ``forward(x, n_models,
    keys_low, keys_high, model_stride, thresholds, scales, y, mask)`` and ``backward(dy, mask,
    n_models, scales, dx)`` are the kernel module's launchers themselves (host arrays need no
    conversion)."""

    def __init__(self):
        from fastdl.kernels import dropout as kernels

        self.forward, self.backward = kernels.forward, kernels.backward


class _DropoutCuda(CudaOps):
    """The CUDA kernels (``kernels/dropout_cuda.py``) on flat device arrays; the per-model
    keys, thresholds and scales cross to the device each call (K values each)."""

    def __init__(self):
        super().__init__()
        from fastdl.kernels import dropout_cuda as kernels

        self.kernels = kernels

    def forward(self, x, n_models, keys_low, keys_high, model_stride, thresholds, scales, y,
                mask):
        x = self.flat(x)
        self.kernels.forward(x, self.from_host(keys_low), self.from_host(keys_high),
                             model_stride, self.from_host(thresholds), self.from_host(scales),
                             max(1, x.shape[0] // n_models), self.flat(y), self.flat(mask))

    def backward(self, dy, mask, n_models, scales, dx):
        dy = self.flat(dy)
        self.kernels.backward(dy, self.flat(mask), self.from_host(scales),
                              max(1, dy.shape[0] // n_models), self.flat(dx))


_FAMILY = {"cpu": _DropoutCpu, "cuda": _DropoutCuda}


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
    device, n_models, draw = mask_draw(x, p, seed, population)
    _validate.check_out(out, "out", x, device)
    _validate.check_out(mask_out, "mask_out", x, device, dtype=np.bool_)
    ops = _dispatch.shared(_FAMILY, device)
    y = ops.empty_like(x) if out is None else out
    mask = ops.empty(x.shape, np.bool_) if mask_out is None else mask_out
    ops.forward(x, n_models, *draw, y, mask)
    return y, mask


class MaskDraw(NamedTuple):
    """What the kernels need to draw a mask: per-model generator keys (int64 (K,) halves),
    the model stride of the element index, thresholds ceil(p * 2**24) (int64 (K,)) and scales
    1 / (1 - p) (x's dtype (K,))."""

    keys_low: np.ndarray
    keys_high: np.ndarray
    model_stride: int
    thresholds: np.ndarray
    scales: np.ndarray


def mask_draw(x, p, seed, population):
    """:func:`dropout_forward`'s checks of ``x``, ``p``, ``seed`` and ``population``; returns
    (x's device, K (1 without a population), :class:`MaskDraw`). fastdl._block draws the
    layers' masks with it too."""
    population = _validate.population_flag(population)
    device = _validate.float_array(x, "x", population, ranks=(0, None))
    n_models = x.shape[0] if population else 1
    rates = _validate.hyperparameter(p, "p", n_models if population else None,
                                     _validate.closed_unit_interval)
    seed = _validate.seed(seed, "seed", n_models if population else None)
    keys_low, keys_high, model_stride = _keys(seed, n_models, population, x.shape)
    return device, n_models, MaskDraw(keys_low, keys_high, model_stride,
                                      *_thresholds_and_scales(rates, x.dtype))


def dropout_backward(dy, mask, p, out=None):
    """``dx = dy * mask / (1 - p)`` (0 where p = 1): the gradient of :func:`dropout_forward`.

    dy: like the forward's x; mask: the forward's mask; p: the forward's rate(s) (a (K,)
    array means a population of K models along dy's leading axis). ``out``: where to write dx
    (may be dy itself).
    """
    device = _validate.float_array(dy, "dy", ranks=(0, None), device=location(mask),
                                   other="the mask is")
    _validate.bool_mask(mask, "mask", dy, "dy")
    population = _validate.population_of(p, "p", dy, "dy")
    n_models = dy.shape[0] if population else 1
    rates = _validate.hyperparameter(p, "p", n_models if population else None,
                                     _validate.closed_unit_interval)
    _validate.check_out(out, "out", dy, device, like_name="dy")
    _, scales = _thresholds_and_scales(rates, dy.dtype)
    ops = _dispatch.shared(_FAMILY, device)
    dx = ops.empty_like(dy) if out is None else out
    ops.backward(dy, mask, n_models, scales, dx)
    return dx
