"""Fused optimizer kernels.

Each optimizer's update is written once, as scalar math on one element (``*_element``); the CPU
drivers below run it over chunks of the parameters, and the CUDA drivers
(``kernels/optim_cuda.py``) run the same functions over a grid-stride loop.

A step is at most two passes over the gradients:

1. ``grad_stats`` (only when non-finite skipping or clipping is asked for): per model, the sum
   of squares of ``g / grad_scale`` and whether any of them is inf/NaN;
2. the update: :func:`coefficients` turns the hyperparameters, step counts and step 1's results
   into one row of scalars per (parameter group, model), in the parameters' dtype (bias
   corrections, ``1 - beta``, the gradient multiplier ``±clip / grad_scale``, ...), and the
   optimizer's update kernel applies the element function with those scalars.

Every table is laid out by name (:data:`CHUNK`, :data:`MODEL`, and per optimizer the
hyperparameter and coefficient columns of :data:`ALGORITHMS`): namedtuples of column numbers,
which numba reads as compile-time constants, so the host, the CPU loops and the CUDA kernels
index the same names.

Work is described by a *chunk table*, int64 of shape (n_chunks, len(CHUNK)): elements
[lo, hi) of the array whose address is ``param_addresses[ptr]`` (and ``grad_addresses[ptr]``),
belonging to model ``model``, updated with coefficient row ``row``; their optimizer state is at
[state, state + hi - lo) of the state arrays, and their EMA weights at [flat, flat + hi - lo)
of the flat EMA array (the elements' offset in all params laid end to end; ``state`` differs
from it where some tensors keep their state elsewhere: 8-bit state, kernels/quantize.py). A
flat parameter buffer is one address and many chunks; separate arrays are one address each.

State of any storage dtype (float32, float64, bfloat16 as uint16) is read and written through
``quantize.load`` / ``store``, in the params' dtype; 8-bit state has its own drivers
(:func:`update_kernel_8bit`), which work block by block.
"""

import itertools
import math
from collections import namedtuple

import numpy as np
from numba import njit, prange

from . import quantize
from .config import CPU_OPTIONS, FASTMATH, FASTMATH_REPRODUCIBLE, cpu_kernel, cpu_kernel_pair
from .floats import is_finite
from .pointers import view
from .quantize import (
    BLOCK,
    decode_block,
    encode_block,
    load,
    nearest_signed,
    nearest_unsigned,
    store,
)


def columns(names, first=0):
    """A namedtuple of column numbers: the i-th of the space-separated ``names`` is column
    ``first + i``. ``len()`` of it is the number of columns after ``first``."""
    names = names.split()
    return namedtuple("Columns", names)(*range(first, first + len(names)))


CHUNK = columns("ptr model row lo hi state flat")

# The per-model table the host fills: 1 / grad_scale, max_grad_norm (0: no clipping), skip
# non-finite steps (0 / 1), EMA decay (0: no EMA). ``advance_models`` writes grad_multiplier.
MODEL = columns("inv_scale max_norm skip ema_decay grad_multiplier")

# Coefficient rows: the columns every optimizer shares (``grad`` multiplies g: ±clip /
# grad_scale; ``weight_decay`` is L2's, 0 for AdamW), then each optimizer's own.
COMMON = "grad weight_decay ema_keep ema_gain"
SHARED = columns(COMMON)
SGD = columns(COMMON + " lr buf_keep buf_gain momentum nesterov use_buf")
MOMENTUM = columns(COMMON + " lr beta one_minus_beta")
RMSPROP = columns(COMMON + " lr alpha one_minus_alpha eps momentum centered use_buf")
ADAM = columns(COMMON + " decay beta1 one_minus_beta1 beta2 one_minus_beta2 step_size "
                        "bias_correction2_sqrt eps amsgrad")

# Hyperparameter columns of the host's float64 (groups, K, columns) table, in the order of
# each optimizer's keywords (``betas`` takes two).
SGD_HYPER = columns("lr momentum dampening weight_decay nesterov maximize")
MOMENTUM_HYPER = columns("lr beta weight_decay maximize")
RMSPROP_HYPER = columns("lr alpha eps weight_decay momentum centered maximize")
ADAM_HYPER = columns("lr beta1 beta2 eps weight_decay amsgrad maximize")


# ---------------------------------------------------------------------------------------------
# The update of one element, per optimizer (plain Python: compiled for the CPU and the GPU).
# ``d = g * gmul + wd * p`` is steps 1-5 of SPEC.md's order: unscale, clip, maximize (the sign
# of gmul) and L2 weight decay (wd = 0 for AdamW, which decays p through ``decay``).
# ---------------------------------------------------------------------------------------------

def sgd_element(p, g, buf, gmul, wd, lr, buf_keep, buf_gain, momentum, nesterov, use_buf):
    """PyTorch SGD: buf = buf_keep*buf + buf_gain*d (buf_keep=0, buf_gain=1 on the first step)."""
    d = g * gmul + wd * p
    if use_buf:
        buf = buf_keep * buf + buf_gain * d
        if nesterov:
            d = d + momentum * buf
        else:
            d = buf
    return p - lr * d, buf


def momentum_element(p, g, v, gmul, wd, lr, beta, one_minus_beta):
    """The notes' Momentum: V = beta*V + (1-beta)*d ; p -= lr*V."""
    d = g * gmul + wd * p
    v = beta * v + one_minus_beta * d
    return p - lr * v, v


def rmsprop_element(p, g, square_avg, grad_avg, buf, gmul, wd, lr, alpha, one_minus_alpha,
                    eps, momentum, centered, use_buf):
    """PyTorch RMSprop: S = alpha*S + (1-alpha)*d*d ; p -= lr * d / (sqrt(S) + eps)."""
    d = g * gmul + wd * p
    square_avg = alpha * square_avg + one_minus_alpha * d * d
    if centered:
        grad_avg = alpha * grad_avg + one_minus_alpha * d
        avg = math.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = math.sqrt(square_avg) + eps
    if use_buf:
        buf = momentum * buf + d / avg
        p = p - lr * buf
    else:
        p = p - lr * (d / avg)
    return p, square_avg, grad_avg, buf


def adam_element(p, g, m, v, vmax, gmul, wd, decay, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, step_size, bias_correction2_sqrt, eps, amsgrad):
    """Adam / AdamW: p -= step_size * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)."""
    d = g * gmul + wd * p
    p = p * decay
    m = beta1 * m + one_minus_beta1 * d
    v = beta2 * v + one_minus_beta2 * d * d
    if amsgrad:
        vmax = v if v > vmax else vmax  # not max(): a device function the PTX check can't build
        denom = math.sqrt(vmax) / bias_correction2_sqrt + eps
    else:
        denom = math.sqrt(v) / bias_correction2_sqrt + eps
    return p - step_size * (m / denom), m, v, vmax


def shared_coefficients(r):
    """The columns every coefficient row starts with: gmul, wd, ema_keep, ema_gain."""
    return r[SHARED.grad], r[SHARED.weight_decay], r[SHARED.ema_keep], r[SHARED.ema_gain]


def ema_element(ema, p, keep, gain):
    """Step 7, EMA weights: ema = d * ema + (1 - d) * p (keep = d, gain = 1 - d)."""
    return keep * ema + gain * p


_sgd = njit(inline="always", **CPU_OPTIONS)(sgd_element)
_momentum = njit(inline="always", **CPU_OPTIONS)(momentum_element)
_rmsprop = njit(inline="always", **CPU_OPTIONS)(rmsprop_element)
_adam = njit(inline="always", **CPU_OPTIONS)(adam_element)
_ema = njit(inline="always", **CPU_OPTIONS)(ema_element)
_shared = njit(inline="always", **CPU_OPTIONS)(shared_coefficients)


# ---------------------------------------------------------------------------------------------
# Pass 1: gradient statistics.
# ---------------------------------------------------------------------------------------------

@njit(inline="always")
def _sum_squares(g, inv_scale):
    """sum((g * inv_scale)**2) in float64, in a fixed order (lane i % 4, then the lanes
    pairwise). Inlined into :func:`_grad_stats`, whose flags (FASTMATH_REPRODUCIBLE: no
    reassociation, no FMA contraction) its instructions take: LLVM vectorized the reassociable
    sum differently when the parallel kernel was just compiled and when it was loaded from the
    cache (numba issue 10617), and the clipping norm differed in its last bits."""
    s0 = s1 = s2 = s3 = 0.0
    n = g.shape[0]
    i = 0
    while i + 4 <= n:
        x0, x1 = np.float64(g[i] * inv_scale), np.float64(g[i + 1] * inv_scale)
        x2, x3 = np.float64(g[i + 2] * inv_scale), np.float64(g[i + 3] * inv_scale)
        s0 += x0 * x0
        s1 += x1 * x1
        s2 += x2 * x2
        s3 += x3 * x3
        i += 4
    while i < n:
        x0 = np.float64(g[i] * inv_scale)
        s0 += x0 * x0
        i += 1
    return (s0 + s1) + (s2 + s3)


def _grad_stats(grad_addresses, chunks, model, like, chunk_sumsq, chunk_nonfinite, sumsq,
                nonfinite):
    """Per model k: ``sumsq[k]``, the sum of (g / grad_scale)**2 in float64, and
    ``nonfinite[k]``, whether any of them is inf/NaN; ``chunk_sumsq`` / ``chunk_nonfinite``
    (n_chunks,) hold each chunk's share.

    The sum itself detects non-finite values (an inf or NaN makes it inf or NaN), so the hot
    loop has no per-element test; only a chunk whose sum is not finite is scanned again, to
    tell a real inf/NaN from squares of huge float64 values overflowing. The chunks' shares
    are added per model after the loop, serially and in chunk order: the same bits on any
    number of threads (and one kernel to compile, not two).
    """
    for c in prange(chunks.shape[0]):
        g = view(grad_addresses[chunks[c, CHUNK.ptr]], chunks[c, CHUNK.lo], chunks[c, CHUNK.hi],
                 like)
        inv_scale = g.dtype.type(model[chunks[c, CHUNK.model], MODEL.inv_scale])
        chunk_sum = _sum_squares(g, inv_scale)
        found = False
        if not is_finite(chunk_sum):
            for i in range(g.shape[0]):
                found |= not is_finite(g[i] * inv_scale)
        chunk_sumsq[c] = chunk_sum
        chunk_nonfinite[c] = found
    for k in range(sumsq.shape[0]):
        sumsq[k] = 0.0
        nonfinite[k] = False
    for c in range(chunks.shape[0]):
        k = chunks[c, CHUNK.model]
        sumsq[k] += chunk_sumsq[c]
        nonfinite[k] |= chunk_nonfinite[c]


_grad_stats_serial, _grad_stats_parallel = cpu_kernel_pair(_grad_stats,
                                                           fastmath=FASTMATH_REPRODUCIBLE)


def _grad_nonfinite(grad_addresses, chunks, model, like, chunk_nonfinite, nonfinite):
    """Per model k: ``nonfinite[k]``, whether any g / grad_scale is inf/NaN (chunk shares in
    ``chunk_nonfinite``): :func:`_grad_stats` without the norm, for a step that skips but does
    not clip. An OR of integer tests of the exponent bits vectorizes in any order; the float64
    sum of squares did not (it ran at ~12 GB/s, a third of the whole Adam step's time)."""
    for c in prange(chunks.shape[0]):
        g = view(grad_addresses[chunks[c, CHUNK.ptr]], chunks[c, CHUNK.lo], chunks[c, CHUNK.hi],
                 like)
        inv_scale = g.dtype.type(model[chunks[c, CHUNK.model], MODEL.inv_scale])
        found = False
        for i in range(g.shape[0]):
            found |= not is_finite(g[i] * inv_scale)
        chunk_nonfinite[c] = found
    for k in range(nonfinite.shape[0]):
        nonfinite[k] = False
    for c in range(chunks.shape[0]):
        nonfinite[chunks[c, CHUNK.model]] |= chunk_nonfinite[c]


_grad_nonfinite_serial, _grad_nonfinite_parallel = cpu_kernel_pair(
    _grad_nonfinite, fastmath=FASTMATH_REPRODUCIBLE)


def grad_stats(grad_addresses, chunks, model, like, parallel, sumsq, nonfinite, norm=True):
    """Fill ``sumsq`` (K,) float64 and ``nonfinite`` (K,) bool from the gradients; with
    ``norm=False`` (no clipping: the norm is not asked for) only ``nonfinite``, ``sumsq`` set
    to 0."""
    chunk_nonfinite = np.empty(chunks.shape[0], np.bool_)
    if not norm:
        kernel = _grad_nonfinite_parallel if parallel else _grad_nonfinite_serial
        kernel(grad_addresses, chunks, model, like, chunk_nonfinite, nonfinite)
        sumsq[:] = 0.0
        return
    chunk_sumsq = np.empty(chunks.shape[0])
    kernel = _grad_stats_parallel if parallel else _grad_stats_serial
    kernel(grad_addresses, chunks, model, like, chunk_sumsq, chunk_nonfinite, sumsq, nonfinite)


# ---------------------------------------------------------------------------------------------
# Coefficients: host-side scalar math in float64, stored in the parameters' dtype;
# ``decoupled`` (AdamW's weight decay) only matters to Adam's row. The flag columns (an
# optimizer's ``Algorithm.flags``: which state a row touches) change only with the
# hyperparameters: the host writes them, and the row builders leave them alone.
# ---------------------------------------------------------------------------------------------

@njit(inline="always", **CPU_OPTIONS)
def _advance_models(model, sumsq, nonfinite, steps, active):
    """Decide per model whether it steps, count the step, and set its gradient multiplier."""
    for k in range(model.shape[0]):
        skip = model[k, MODEL.skip] != 0 and nonfinite[k]
        active[k] = not skip
        clip = 1.0
        max_norm = model[k, MODEL.max_norm]
        if max_norm > 0:
            # PyTorch's clip_grad_norm_: clamp(max_norm / (norm + 1e-6), max=1); NaN stays NaN.
            ratio = max_norm / (math.sqrt(sumsq[k]) + 1e-6)
            clip = 1.0 if ratio >= 1.0 else ratio
        model[k, MODEL.grad_multiplier] = model[k, MODEL.inv_scale] * clip
        if not skip:
            steps[k] += 1


@njit(inline="always", **CPU_OPTIONS)
def _common_columns(row, model_row, maximize, l2):
    gmul = model_row[MODEL.grad_multiplier]
    row[SHARED.grad] = -gmul if maximize != 0 else gmul
    row[SHARED.weight_decay] = l2
    ema_decay = model_row[MODEL.ema_decay]
    row[SHARED.ema_keep] = ema_decay
    row[SHARED.ema_gain] = 1.0 - ema_decay


# One row per optimizer: ``h`` its hyperparameters, ``t`` the model's step count.

@njit(inline="always", **CPU_OPTIONS)
def _sgd_row(row, h, t, model_row, decoupled):
    H = SGD_HYPER
    _common_columns(row, model_row, h[H.maximize], h[H.weight_decay])
    first = t == 1
    row[SGD.lr] = h[H.lr]
    row[SGD.buf_keep] = 0.0 if first else h[H.momentum]
    row[SGD.buf_gain] = 1.0 if first else 1.0 - h[H.dampening]
    row[SGD.momentum] = h[H.momentum]
    row[SGD.nesterov] = h[H.nesterov]


@njit(inline="always", **CPU_OPTIONS)
def _momentum_row(row, h, t, model_row, decoupled):
    H = MOMENTUM_HYPER
    _common_columns(row, model_row, h[H.maximize], h[H.weight_decay])
    row[MOMENTUM.lr] = h[H.lr]
    row[MOMENTUM.beta] = h[H.beta]
    row[MOMENTUM.one_minus_beta] = 1.0 - h[H.beta]


@njit(inline="always", **CPU_OPTIONS)
def _rmsprop_row(row, h, t, model_row, decoupled):
    H = RMSPROP_HYPER
    _common_columns(row, model_row, h[H.maximize], h[H.weight_decay])
    row[RMSPROP.lr] = h[H.lr]
    row[RMSPROP.alpha] = h[H.alpha]
    row[RMSPROP.one_minus_alpha] = 1.0 - h[H.alpha]
    row[RMSPROP.eps] = h[H.eps]
    row[RMSPROP.momentum] = h[H.momentum]


@njit(inline="always", **CPU_OPTIONS)
def _adam_row(row, h, t, model_row, decoupled):
    H = ADAM_HYPER
    lr, wd = h[H.lr], h[H.weight_decay]
    _common_columns(row, model_row, h[H.maximize], 0.0 if decoupled else wd)
    row[ADAM.decay] = 1.0 - lr * wd if decoupled else 1.0
    row[ADAM.beta1] = h[H.beta1]
    row[ADAM.one_minus_beta1] = 1.0 - h[H.beta1]
    row[ADAM.beta2] = h[H.beta2]
    row[ADAM.one_minus_beta2] = 1.0 - h[H.beta2]
    # math.pow, as Python's and PyTorch's ``beta ** t`` (libm's pow); numba's float ** int is
    # repeated squaring, which can differ in the last bit and compiles for 0.05 s more
    row[ADAM.step_size] = lr / (1.0 - math.pow(h[H.beta1], np.float64(t)))
    row[ADAM.bias_correction2_sqrt] = math.sqrt(1.0 - math.pow(h[H.beta2], np.float64(t)))
    row[ADAM.eps] = h[H.eps]


SGD_KIND, MOMENTUM_KIND, RMSPROP_KIND, ADAM_KIND, ADAMW_KIND = range(5)
KIND_NAMES = ("sgd", "momentum", "rmsprop", "adam", "adamw")


def _coefficient_builder(kind):
    """:func:`coefficients` of optimizer ``kind`` alone: a closure whose ``kind`` numba folds
    (the other optimizers' rows are pruned before typing), so that a run compiles only the row
    of the optimizer it uses (with ``kind`` a run-time argument, all five compiled: 1.1 s of a
    cold demo's first epoch)."""

    def build(hyper, model, sumsq, nonfinite, steps, active, coef):
        _advance_models(model, sumsq, nonfinite, steps, active)
        n_groups, n_models = hyper.shape[0], hyper.shape[1]
        for grp in range(n_groups):
            for k in range(n_models):
                row, h, t = coef[grp * n_models + k], hyper[grp, k], steps[k]
                if kind == SGD_KIND:
                    _sgd_row(row, h, t, model[k], False)
                elif kind == MOMENTUM_KIND:
                    _momentum_row(row, h, t, model[k], False)
                elif kind == RMSPROP_KIND:
                    _rmsprop_row(row, h, t, model[k], False)
                else:
                    _adam_row(row, h, t, model[k], kind == ADAMW_KIND)

    return build


# kind -> its compiled coefficient builder, registered as "optim.coefficients.<kind name>"
COEFFICIENT_KERNELS = tuple(cpu_kernel(_coefficient_builder(kind), name=f"optim.coefficients.{n}")
                            for kind, n in enumerate(KIND_NAMES))


def coefficients(kind, hyper, model, sumsq, nonfinite, steps, active, coef):
    """Advance the models (skip, count, gradient multiplier), then fill coefficient row
    g * K + k of every group g and model k for optimizer ``kind``: hyper (G, K, F) float64,
    coef (G * K, columns) in the parameters' dtype. Runs ``COEFFICIENT_KERNELS[kind]``."""
    COEFFICIENT_KERNELS[kind](hyper, model, sumsq, nonfinite, steps, active, coef)


# ---------------------------------------------------------------------------------------------
# Pass 2: the fused updates, CPU. One prange over the chunk table. Per chunk, the coefficients
# are loaded into scalars and the loop over the chunk's elements runs the element function.
# The flags that decide which state is read and written (amsgrad's vmax, EMA, ...) are
# compile-time constants of each update: ``update_kernel`` makes one per combination (a
# closure over the flags), so LLVM drops the branches and vectorizes. (With the branches
# left in, fused Adam ran at ~35 GB/s instead of ~55.) The host runs, per step, the driver of
# each combination its coefficient rows have (one, unless groups or models differ in them);
# unused state arrays are zero-length placeholders, sliced but never read.
# ---------------------------------------------------------------------------------------------

@njit(inline="always", **CPU_OPTIONS)
def _chunk_views(param_addresses, grad_addresses, chunks, c, like):
    lo, hi = chunks[c, CHUNK.lo], chunks[c, CHUNK.hi]
    p = view(param_addresses[chunks[c, CHUNK.ptr]], lo, hi, like)
    g = view(grad_addresses[chunks[c, CHUNK.ptr]], lo, hi, like)
    return p, g, chunks[c, CHUNK.state], chunks[c, CHUNK.flat]


@njit(inline="always", **CPU_OPTIONS)
def _store(p, e, i, pi, ema_keep, ema_gain, use_ema):
    """p[i] = pi, and step 7 (the EMA weights) on it when ``use_ema``."""
    p[i] = pi
    if use_ema:
        e[i] = _ema(e[i], pi, ema_keep, ema_gain)


@njit(inline="always", **CPU_OPTIONS)
def _sgd_chunk(p, g, buf, e, r, use_buf, use_ema):
    gmul, wd, ema_keep, ema_gain = _shared(r)
    lr, buf_keep, buf_gain, momentum = r[SGD.lr], r[SGD.buf_keep], r[SGD.buf_gain], \
        r[SGD.momentum]
    nesterov = r[SGD.nesterov] != 0
    for i in range(p.shape[0]):
        b = load(buf, i, p) if use_buf else gmul
        pi, b = _sgd(p[i], g[i], b, gmul, wd, lr, buf_keep, buf_gain, momentum, nesterov,
                     use_buf)
        if use_buf:
            store(buf, i, b)
        _store(p, e, i, pi, ema_keep, ema_gain, use_ema)


@njit(inline="always", **CPU_OPTIONS)
def _momentum_chunk(p, g, v, e, r, use_ema):
    gmul, wd, ema_keep, ema_gain = _shared(r)
    lr, beta, one_minus_beta = r[MOMENTUM.lr], r[MOMENTUM.beta], r[MOMENTUM.one_minus_beta]
    for i in range(p.shape[0]):
        pi, vi = _momentum(p[i], g[i], load(v, i, p), gmul, wd, lr, beta, one_minus_beta)
        store(v, i, vi)
        _store(p, e, i, pi, ema_keep, ema_gain, use_ema)


@njit(inline="always", **CPU_OPTIONS)
def _rmsprop_chunk(p, g, sq, ga, buf, e, r, centered, use_buf, use_ema):
    gmul, wd, ema_keep, ema_gain = _shared(r)
    lr, alpha, one_minus_alpha = r[RMSPROP.lr], r[RMSPROP.alpha], r[RMSPROP.one_minus_alpha]
    eps, momentum = r[RMSPROP.eps], r[RMSPROP.momentum]
    for i in range(p.shape[0]):
        a = load(ga, i, p) if centered else gmul
        b = load(buf, i, p) if use_buf else gmul
        pi, s, a, b = _rmsprop(p[i], g[i], load(sq, i, p), a, b, gmul, wd, lr, alpha,
                                   one_minus_alpha, eps, momentum, centered, use_buf)
        store(sq, i, s)
        if centered:
            store(ga, i, a)
        if use_buf:
            store(buf, i, b)
        _store(p, e, i, pi, ema_keep, ema_gain, use_ema)


@njit(inline="always", **CPU_OPTIONS)
def _adam_chunk(p, g, m, v, vmax, e, r, amsgrad, use_ema):
    gmul, wd, ema_keep, ema_gain = _shared(r)
    decay, beta1, one_minus_beta1 = r[ADAM.decay], r[ADAM.beta1], r[ADAM.one_minus_beta1]
    beta2, one_minus_beta2 = r[ADAM.beta2], r[ADAM.one_minus_beta2]
    step_size, bias_correction2_sqrt = r[ADAM.step_size], r[ADAM.bias_correction2_sqrt]
    eps = r[ADAM.eps]
    for i in range(p.shape[0]):
        vm = load(vmax, i, p) if amsgrad else gmul
        pi, mi, vi, vm = _adam(p[i], g[i], load(m, i, p), load(v, i, p), vm, gmul, wd, decay, beta1,
                                   one_minus_beta1, beta2, one_minus_beta2, step_size,
                                   bias_correction2_sqrt, eps, amsgrad)
        store(m, i, mi)
        store(v, i, vi)
        if amsgrad:
            store(vmax, i, vm)
        _store(p, e, i, pi, ema_keep, ema_gain, use_ema)


def _driver(kind, flag0, flag1, use_ema):
    """The CPU update of optimizer ``kind`` with its flags (``Algorithm.flags``, padded with
    False to two) and ``use_ema`` fixed: a closure whose constants numba folds (the branches
    of the other optimizers are pruned before typing), so only the chosen optimizer's loop is
    compiled, without the flags' branches. ``state``: the optimizer's state arrays, in
    ``Algorithm.state`` order (zero-length placeholders for those no row needs)."""

    def update(param_addresses, grad_addresses, chunks, coef, active, ema, *state):
        for c in prange(chunks.shape[0]):
            if active[chunks[c, CHUNK.model]]:
                p, g, s0, f0 = _chunk_views(param_addresses, grad_addresses, chunks, c, coef)
                s1 = s0 + p.shape[0]
                r, e = coef[chunks[c, CHUNK.row]], ema[f0:f0 + p.shape[0]]
                if kind == SGD_KIND:
                    _sgd_chunk(p, g, state[0][s0:s1], e, r, flag0, use_ema)
                elif kind == MOMENTUM_KIND:
                    _momentum_chunk(p, g, state[0][s0:s1], e, r, use_ema)
                elif kind == RMSPROP_KIND:
                    _rmsprop_chunk(p, g, state[0][s0:s1], state[1][s0:s1], state[2][s0:s1], e,
                                   r, flag0, flag1, use_ema)
                else:
                    _adam_chunk(p, g, state[0][s0:s1], state[1][s0:s1], state[2][s0:s1], e, r,
                                flag0, use_ema)

    return update


# ---------------------------------------------------------------------------------------------
# Pass 2 with 8-bit state (kernels/quantize.py). A chunk starts at a block boundary (the host
# cuts a tensor's chunks at multiples of BLOCK from each model's first element, and pads each
# model's codes to whole blocks, so block b of the codes is elements [b * BLOCK, (b+1) * BLOCK)
# and has absmax b). Per block, three loops that each vectorize: decode the codes into
# BLOCK-sized float32 buffers; run the optimizer's float chunk function over the block with
# the buffers as its state (the params and EMA are written from the unquantized new state, as
# bitsandbytes does); encode each buffer on its new absmax. (One loop doing all three ran 8x
# slower: with seven arrays in it, LLVM gave up its alias checks and did not vectorize.)
# ---------------------------------------------------------------------------------------------

SIGNED_CODES, UNSIGNED_CODES = quantize.SIGNED_CODES, quantize.UNSIGNED_CODES


def _driver_8bit(kind, flag0, use_ema):
    """The CPU update of optimizer ``kind`` with 8-bit state (``flag0``: SGD's and RMSprop's
    momentum buffer; ``use_ema`` fixed, as :func:`_driver`). ``codes`` / ``absmax``: tuples of
    the uint8 codes and float32 absmax of each state buffer, in ``Algorithm.state`` order
    (zero-length placeholders for those no row needs); Adam's second buffer (exp_avg_sq) is on
    the unsigned map, every other on the signed one."""

    def update(param_addresses, grad_addresses, chunks, coef, active, ema, codes, absmax):
        for c in prange(chunks.shape[0]):
            if not active[chunks[c, CHUNK.model]]:
                continue
            p, g, s0, f0 = _chunk_views(param_addresses, grad_addresses, chunks, c, coef)
            r = coef[chunks[c, CHUNK.row]]
            state0 = np.empty(BLOCK, np.float32)  # one block of decoded state
            state1 = np.empty(BLOCK, np.float32)
            for b0 in range(0, p.shape[0], BLOCK):
                b1 = min(b0 + BLOCK, p.shape[0])
                s, n, blk = s0 + b0, b1 - b0, (s0 + b0) // BLOCK
                pb, gb, e = p[b0:b1], g[b0:b1], ema[f0 + b0:f0 + b1]
                x0, x1 = state0[:n], state1[:n]
                if kind == SGD_KIND:
                    if flag0:
                        decode_block(codes[0][s:s + n], SIGNED_CODES, absmax[0][blk], x0)
                    _sgd_chunk(pb, gb, x0, e, r, flag0, use_ema)
                    if flag0:
                        absmax[0][blk] = encode_block(x0, codes[0][s:s + n], nearest_signed)
                elif kind == MOMENTUM_KIND:
                    decode_block(codes[0][s:s + n], SIGNED_CODES, absmax[0][blk], x0)
                    _momentum_chunk(pb, gb, x0, e, r, use_ema)
                    absmax[0][blk] = encode_block(x0, codes[0][s:s + n], nearest_signed)
                elif kind == RMSPROP_KIND:
                    decode_block(codes[0][s:s + n], SIGNED_CODES, absmax[0][blk], x0)
                    if flag0:
                        decode_block(codes[2][s:s + n], SIGNED_CODES, absmax[2][blk], x1)
                    _rmsprop_chunk(pb, gb, x0, x0, x1, e, r, False, flag0, use_ema)
                    absmax[0][blk] = encode_block(x0, codes[0][s:s + n], nearest_signed)
                    if flag0:
                        absmax[2][blk] = encode_block(x1, codes[2][s:s + n], nearest_signed)
                else:
                    decode_block(codes[0][s:s + n], SIGNED_CODES, absmax[0][blk], x0)
                    decode_block(codes[1][s:s + n], UNSIGNED_CODES, absmax[1][blk], x1)
                    _adam_chunk(pb, gb, x0, x1, x1, e, r, False, use_ema)
                    absmax[0][blk] = encode_block(x0, codes[0][s:s + n], nearest_signed)
                    absmax[1][blk] = encode_block(x1, codes[1][s:s + n], nearest_unsigned)

    return update


_UPDATE_KERNELS_8BIT = {}


def update_kernel_8bit(algorithm, flags, use_ema, parallel):
    """:func:`update_kernel` for 8-bit state (``flags``: SGD's use_buf, or RMSprop's
    (centered, use_buf) with centered False: the host refuses 8-bit centered RMSprop)."""
    key = (algorithm, tuple(flags), use_ema)
    pair = _UPDATE_KERNELS_8BIT.get(key)
    if pair is None:
        layout = ALGORITHMS[algorithm]
        buffer_flag = bool(flags[-1]) if algorithm in ("sgd", "rmsprop") else False
        name = f"optim.update8.{algorithm}{''.join('_' + str(int(f)) for f in flags)}" \
            f"_ema{int(use_ema)}"
        pair = _UPDATE_KERNELS_8BIT[key] = cpu_kernel_pair(
            _driver_8bit(layout.kind, buffer_flag, use_ema), name,
            fastmath=FASTMATH - {"contract"})
    return pair[1] if parallel else pair[0]


# ---------------------------------------------------------------------------------------------
# The table of optimizers: what the host needs to run each one.
# ---------------------------------------------------------------------------------------------

Algorithm = namedtuple("Algorithm", "hyper coef kind flags state")
Algorithm.__doc__ = """One optimizer's kernels and layout.

``hyper`` / ``coef``: its hyperparameter and coefficient columns; ``kind``: its number for
:func:`coefficients` and the CPU update; ``flags``: the names of its flag columns in ``coef``
(per row: which state the row touches; :func:`update_kernel` specializes on them);
``state``: (name, flag) of each state buffer, in the update kernel's argument order
(PyTorch's names), the flag None for a buffer every row needs.
"""

ALGORITHMS = {
    "sgd": Algorithm(SGD_HYPER, SGD, SGD_KIND, ("use_buf",),
                     (("momentum_buffer", "use_buf"),)),
    "momentum": Algorithm(MOMENTUM_HYPER, MOMENTUM, MOMENTUM_KIND, (), (("velocity", None),)),
    "rmsprop": Algorithm(RMSPROP_HYPER, RMSPROP, RMSPROP_KIND, ("centered", "use_buf"),
                         (("square_avg", None), ("grad_avg", "centered"),
                          ("momentum_buffer", "use_buf"))),
    "adam": Algorithm(ADAM_HYPER, ADAM, ADAM_KIND, ("amsgrad",),
                      (("exp_avg", None), ("exp_avg_sq", None), ("max_exp_avg_sq", "amsgrad"))),
}
# AdamW: Adam's tables and update; its coefficients decouple the weight decay.
ALGORITHMS["adamw"] = ALGORITHMS["adam"]._replace(kind=ADAMW_KIND)

_UPDATE_KERNELS = {}


def update_kernel(algorithm, flags, use_ema, parallel):
    """The CPU update of ``algorithm`` specialized on ``flags`` (bools, in the order of its
    ``Algorithm.flags``) and ``use_ema``: serial or parallel. Compiled on first use (and cached
    on disk: each specialization is a closure over its flags, which numba's cache keys on)."""
    key = (algorithm, tuple(flags), use_ema)
    pair = _UPDATE_KERNELS.get(key)
    if pair is None:
        flag0, flag1 = (tuple(flags) + (False, False))[:2]
        name = f"optim.update.{algorithm}{''.join('_' + str(int(f)) for f in flags)}" \
            f"_ema{int(use_ema)}"
        # without FMA contraction: contracted, a cached parallel update gave other bits than
        # the one just compiled (config.FASTMATH_REPRODUCIBLE)
        pair = _UPDATE_KERNELS[key] = cpu_kernel_pair(
            _driver(ALGORITHMS[algorithm].kind, flag0, flag1, use_ema), name,
            fastmath=FASTMATH - {"contract"})
    return pair[1] if parallel else pair[0]


def flag_combinations(algorithm):
    """Every combination of ``algorithm``'s flags, in a fixed order."""
    return list(itertools.product((False, True), repeat=len(ALGORITHMS[algorithm].flags)))
