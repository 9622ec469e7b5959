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


def _keys(seed, n_models):
    """Generator keys per model (int64 (K,) low and high halves) for a checked ``seed``: one
    seed (an int) keys every model (which then differ by their index: the model stride); K
    seeds (a population's list) key model k's own index, so model k gets the mask a lone call
    with seed k would."""
    if isinstance(seed, int):
        low, high = seed_key(seed)
        return np.full(n_models, low, np.int64), np.full(n_models, high, np.int64)
    keys = np.array([seed_key(s) for s in seed], np.int64).reshape(-1, 2)
    return np.ascontiguousarray(keys[:, 0]), np.ascontiguousarray(keys[:, 1])


class _DropoutCpu(HostOps):
    """The CPU kernels (``kernels/dropout.py``) on NumPy arrays: ``forward(x, n_models,
    *MaskDraw, y, mask)`` and ``backward(dy, mask, n_models, scales, dx)`` are the kernel
    module's launchers themselves (host arrays need no conversion)."""

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

    def forward(self, x, n_models, keys_low, keys_high, model_stride, offset, run, run_stride,
                thresholds, scales, y, mask):
        x = self.flat(x)
        self.kernels.forward(x, self.from_host(keys_low), self.from_host(keys_high),
                             model_stride, offset, run, run_stride, self.from_host(thresholds),
                             self.from_host(scales), max(1, x.shape[0] // n_models),
                             self.flat(y), self.flat(mask))

    def backward(self, dy, mask, n_models, scales, dx):
        dy = self.flat(dy)
        self.kernels.backward(dy, self.flat(mask), self.from_host(scales),
                              max(1, dy.shape[0] // n_models), self.flat(dx))


_FAMILY = {"cpu": _DropoutCpu, "cuda": _DropoutCuda}


def dropout_forward(x, p, seed, population=False, out=None, mask_out=None, rows=None):
    """Drop each element of ``x`` with probability ``p`` and scale the rest by 1 / (1 - p):
    returns ``(y, mask)``.

    x: float32/float64, C-contiguous, any shape (with ``population=True`` a leading axis of K
    models, and p a scalar or one rate per model). seed: an int; the mask of element i
    depends only on (seed, i). With a population, seed may also be K ints: model k's mask is
    then the one a lone call on x[k] with seed[k] would draw. mask: ``np.bool_`` of x's
    shape, on x's device. ``out`` / ``mask_out``: where to write y / the mask (training loops
    reuse buffers).

    ``rows`` (data-parallel training): ``Rows(first, total, axis=0)``, x holds the examples
    ``first`` to ``first + x.shape[axis]`` of a global batch of ``total`` along ``axis`` (of
    the per-model array): each element is keyed by its position in the global batch's array,
    so W ranks draw the masks one process would on the whole batch.
    """
    device, n_models, draw = mask_draw(x, p, seed, population, rows)
    _validate.check_out(out, "out", x, device)
    _validate.check_out(mask_out, "mask_out", x, device, dtype=np.bool_)
    ops = _dispatch.shared(_FAMILY, device)
    y = ops.empty_like(x) if out is None else out
    mask = ops.empty(x.shape, np.bool_) if mask_out is None else mask_out
    ops.forward(x, n_models, *draw, y, mask)
    return y, mask


class Rows(NamedTuple):
    """Where an array's examples sit in a global batch (data-parallel training): the examples
    ``first`` to ``first + n`` of ``total``, along ``axis`` of the per-model array (0:
    batch-first; -1: the notes' (features, examples))."""

    first: int
    total: int
    axis: int = 0


class MaskDraw(NamedTuple):
    """What the kernels need to draw a mask: per-model generator keys (int64 (K,) halves),
    the element index's map (``kernels/dropout.py``: model stride, offset, run length and run
    stride), thresholds ceil(p * 2**24) (int64 (K,)) and scales 1 / (1 - p) (x's dtype
    (K,))."""

    keys_low: np.ndarray
    keys_high: np.ndarray
    model_stride: int
    offset: int
    run: int
    run_stride: int
    thresholds: np.ndarray
    scales: np.ndarray


def mask_draw(x, p, seed, population, rows=None):
    """:func:`dropout_forward`'s checks of ``x``, ``p``, ``seed``, ``population`` and
    ``rows``; returns (x's device, K (1 without a population), :class:`MaskDraw`).
    fastdl._block draws the layers' masks with it too."""
    population = _validate.population_flag(population)
    device = _validate.float_array(x, "x", population, ranks=(0, None))
    n_models = x.shape[0] if population else 1
    rates = _validate.hyperparameter(p, "p", n_models if population else None,
                                     _validate.closed_unit_interval)
    seed = _validate.seed(seed, "seed", n_models if population else None)
    shape = tuple(x.shape[1:] if population else x.shape)  # one model's
    offset, run, run_stride, per_model = _index_map(shape, rows)
    keys_low, keys_high = _keys(seed, n_models)
    model_stride = per_model if isinstance(seed, int) and population else 0
    return device, n_models, MaskDraw(keys_low, keys_high, model_stride, offset, run,
                                      run_stride, *_thresholds_and_scales(rates, x.dtype))


def _index_map(shape, rows):
    """(offset, run, run stride, size of the array keyed on) of one model's ``shape``: the
    whole array (one run), or its part of a global batch (``rows``)."""
    size = math.prod(shape)
    if rows is None:
        return 0, max(size, 1), max(size, 1), size
    if not isinstance(rows, tuple) or len(rows) not in (2, 3):
        raise TypeError(f"rows must be a Rows(first, total, axis) tuple; got "
                        f"{_validate.describe(rows)}")
    rows = Rows(*rows)
    axis = _validate.axis(rows.axis, len(shape), "rows.axis")
    first = _validate.integer(rows.first, "rows.first", minimum=0)
    total = _validate.integer(rows.total, "rows.total", minimum=0)
    if first + shape[axis] > total:
        raise ValueError(f"rows: the {shape[axis]} examples along axis {axis} from "
                         f"rows.first={first} do not fit a batch of rows.total={total}")
    inner = math.prod(shape[axis + 1:])
    run = shape[axis] * inner
    return first * inner, max(run, 1), total * inner, math.prod(shape[:axis]) * total * inner


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
