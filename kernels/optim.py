"""Fused optimizer kernels.

Each optimizer's update is written once, as scalar math on one element (``*_element``); the CPU
drivers below run it over chunks of the parameters, and the CUDA drivers run the same functions
over a grid-stride loop.

A step is at most two passes over the gradients:

1. ``grad_stats`` (only when non-finite skipping or clipping is asked for): per model, the sum
   of squares of ``g / grad_scale`` and whether any of them is inf/NaN;
2. the update: ``*_coefficients`` turns the hyperparameters, step counts and step 1's results
   into one row of scalars per (parameter group, model), in the parameters' dtype (bias
   corrections, ``1 - beta``, the gradient multiplier ``±clip / grad_scale``, ...), and
   ``*_update`` applies the element function with those scalars.

Work is described by a *chunk table*, int64 of shape (n_chunks, 6), columns ``PTR, MODEL, ROW,
LO, HI, STATE``: elements [LO, HI) of the array whose address is ``param_addresses[PTR]`` (and
``grad_addresses[PTR]``), belonging to model MODEL, updated with coefficient row ROW; their
optimizer state is at [STATE, STATE + HI - LO) of the flat state arrays. A flat parameter
buffer is one address and many chunks; separate arrays are one address each.
"""

import math

import numpy as np
from numba import njit, prange

from .config import CPU_OPTIONS, cpu_kernel_pair
from .floats import is_finite
from .pointers import view

PTR, MODEL, ROW, LO, HI, STATE = range(6)

# Columns of the per-model table the host fills: 1 / grad_scale, max_grad_norm (0: no
# clipping), skip non-finite steps (0 / 1), EMA decay (0: no EMA). The kernel writes GMUL.
INV_SCALE, MAX_NORM, SKIP, EMA_DECAY, GMUL = range(5)
MODEL_COLUMNS = 5

# Leading columns of every coefficient row; each optimizer's own follow.
C_GRAD, C_WD, C_EMA_KEEP, C_EMA_GAIN = range(4)


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


_sgd = njit(inline="always", **CPU_OPTIONS)(sgd_element)
_momentum = njit(inline="always", **CPU_OPTIONS)(momentum_element)
_rmsprop = njit(inline="always", **CPU_OPTIONS)(rmsprop_element)
_adam = njit(inline="always", **CPU_OPTIONS)(adam_element)


# ---------------------------------------------------------------------------------------------
# Pass 1: gradient statistics.
# ---------------------------------------------------------------------------------------------

def _grad_stats(grad_addresses, chunks, model, like, chunk_sumsq, chunk_nonfinite):
    """Per chunk: sum of (g / grad_scale)**2 in float64, and whether any of them is inf/NaN.

    The sum itself detects non-finite values (an inf or NaN makes it inf or NaN), so the hot
    loop has no per-element test; only a chunk whose sum is not finite is scanned again, to
    tell a real inf/NaN from squares of huge float64 values overflowing.
    """
    for c in prange(chunks.shape[0]):
        g = view(grad_addresses[chunks[c, PTR]], chunks[c, LO], chunks[c, HI], like)
        inv_scale = g.dtype.type(model[chunks[c, MODEL], INV_SCALE])
        sumsq = 0.0
        for i in range(g.shape[0]):
            x = np.float64(g[i] * inv_scale)
            sumsq += x * x
        nonfinite = False
        if not is_finite(sumsq):
            for i in range(g.shape[0]):
                nonfinite |= not is_finite(g[i] * inv_scale)
        chunk_sumsq[c] = sumsq
        chunk_nonfinite[c] = nonfinite


_grad_stats_serial, _grad_stats_parallel = cpu_kernel_pair(_grad_stats)


@njit(**CPU_OPTIONS)
def _reduce_per_model(chunks, chunk_sumsq, chunk_nonfinite, sumsq, nonfinite):
    sumsq[:] = 0.0
    nonfinite[:] = False
    for c in range(chunks.shape[0]):
        k = chunks[c, MODEL]
        sumsq[k] += chunk_sumsq[c]
        nonfinite[k] |= chunk_nonfinite[c]


def grad_stats(grad_addresses, chunks, model, like, parallel, sumsq, nonfinite):
    """Fill ``sumsq`` (K,) float64 and ``nonfinite`` (K,) bool from the gradients."""
    chunk_sumsq = np.empty(chunks.shape[0])
    chunk_nonfinite = np.empty(chunks.shape[0], np.bool_)
    kernel = _grad_stats_parallel if parallel else _grad_stats_serial
    kernel(grad_addresses, chunks, model, like, chunk_sumsq, chunk_nonfinite)
    _reduce_per_model(chunks, chunk_sumsq, chunk_nonfinite, sumsq, nonfinite)


# ---------------------------------------------------------------------------------------------
# Coefficients: host-side scalar math in float64, stored in the parameters' dtype.
# ---------------------------------------------------------------------------------------------

@njit(**CPU_OPTIONS)
def _advance_models(model, sumsq, nonfinite, steps, active):
    """Decide per model whether it steps, count the step, and set its gradient multiplier."""
    for k in range(model.shape[0]):
        inv_scale = model[k, INV_SCALE]
        skip = model[k, SKIP] != 0 and nonfinite[k]
        active[k] = not skip
        clip = 1.0
        max_norm = model[k, MAX_NORM]
        if max_norm > 0:
            # PyTorch's clip_grad_norm_: clamp(max_norm / (norm + 1e-6), max=1); NaN stays NaN.
            ratio = max_norm / (math.sqrt(sumsq[k]) + 1e-6)
            clip = 1.0 if ratio >= 1.0 else ratio
        model[k, GMUL] = inv_scale * clip
        if not skip:
            steps[k] += 1


@njit(inline="always", **CPU_OPTIONS)
def _common_columns(row, model_row, maximize, l2):
    gmul = model_row[GMUL]
    row[C_GRAD] = -gmul if maximize != 0 else gmul
    row[C_WD] = l2
    ema_decay = model_row[EMA_DECAY]
    row[C_EMA_KEEP] = ema_decay
    row[C_EMA_GAIN] = 1.0 - ema_decay


# hyper (G, K, F) float64 columns, per optimizer.
SGD_HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
MOMENTUM_HYPER = ("lr", "beta", "weight_decay", "maximize")
RMSPROP_HYPER = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")
ADAM_HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize")

SGD_COLUMNS, MOMENTUM_COLUMNS, RMSPROP_COLUMNS, ADAM_COLUMNS = 10, 8, 12, 14


@njit(**CPU_OPTIONS)
def sgd_coefficients(hyper, model, sumsq, nonfinite, steps, active, coef):
    _advance_models(model, sumsq, nonfinite, steps, active)
    n_groups, n_models = hyper.shape[0], hyper.shape[1]
    for grp in range(n_groups):
        for k in range(n_models):
            lr, momentum, dampening, wd, nesterov, maximize = hyper[grp, k, :6]
            row = coef[grp * n_models + k]
            _common_columns(row, model[k], maximize, wd)
            first = steps[k] == 1
            row[4] = lr
            row[5] = 0.0 if first else momentum
            row[6] = 1.0 if first else 1.0 - dampening
            row[7] = momentum
            row[8] = nesterov
            row[9] = momentum != 0


@njit(**CPU_OPTIONS)
def momentum_coefficients(hyper, model, sumsq, nonfinite, steps, active, coef):
    _advance_models(model, sumsq, nonfinite, steps, active)
    n_groups, n_models = hyper.shape[0], hyper.shape[1]
    for grp in range(n_groups):
        for k in range(n_models):
            lr, beta, wd, maximize = hyper[grp, k, :4]
            row = coef[grp * n_models + k]
            _common_columns(row, model[k], maximize, wd)
            row[4] = lr
            row[5] = beta
            row[6] = 1.0 - beta


@njit(**CPU_OPTIONS)
def rmsprop_coefficients(hyper, model, sumsq, nonfinite, steps, active, coef):
    _advance_models(model, sumsq, nonfinite, steps, active)
    n_groups, n_models = hyper.shape[0], hyper.shape[1]
    for grp in range(n_groups):
        for k in range(n_models):
            lr, alpha, eps, wd, momentum, centered, maximize = hyper[grp, k, :7]
            row = coef[grp * n_models + k]
            _common_columns(row, model[k], maximize, wd)
            row[4] = lr
            row[5] = alpha
            row[6] = 1.0 - alpha
            row[7] = eps
            row[8] = momentum
            row[9] = centered
            row[10] = momentum > 0


@njit(**CPU_OPTIONS)
def adam_coefficients(hyper, model, sumsq, nonfinite, steps, active, coef, decoupled):
    _advance_models(model, sumsq, nonfinite, steps, active)
    n_groups, n_models = hyper.shape[0], hyper.shape[1]
    for grp in range(n_groups):
        for k in range(n_models):
            lr, beta1, beta2, eps, wd, amsgrad, maximize = hyper[grp, k, :7]
            row = coef[grp * n_models + k]
            _common_columns(row, model[k], maximize, 0.0 if decoupled else wd)
            t = steps[k]
            row[4] = 1.0 - lr * wd if decoupled else 1.0
            row[5] = beta1
            row[6] = 1.0 - beta1
            row[7] = beta2
            row[8] = 1.0 - beta2
            row[9] = lr / (1.0 - beta1 ** t)
            row[10] = math.sqrt(1.0 - beta2 ** t)
            row[11] = eps
            row[12] = amsgrad


# ---------------------------------------------------------------------------------------------
# Pass 2: the fused updates, CPU. One prange over the chunk table. Per chunk, the coefficients
# are loaded into scalars and the loop over the chunk's elements is specialized on the flags
# that decide which state is read and written (amsgrad's vmax, EMA, ...): each ``*_chunk``
# function is inlined at call sites that pass literal True/False, so LLVM drops the branches
# and vectorizes. (With the branches left in, fused Adam ran at ~35 GB/s instead of ~55.)
# ---------------------------------------------------------------------------------------------

@njit(inline="always", **CPU_OPTIONS)
def _chunk_views(param_addresses, grad_addresses, chunks, c, like):
    lo, hi = chunks[c, LO], chunks[c, HI]
    p = view(param_addresses[chunks[c, PTR]], lo, hi, like)
    g = view(grad_addresses[chunks[c, PTR]], lo, hi, like)
    return p, g, chunks[c, STATE], chunks[c, STATE] + hi - lo


@njit(inline="always", **CPU_OPTIONS)
def _sgd_chunk(p, g, buf, e, r, use_buf, use_ema):
    gmul, wd, ema_keep, ema_gain = r[C_GRAD], r[C_WD], r[C_EMA_KEEP], r[C_EMA_GAIN]
    lr, buf_keep, buf_gain, momentum, nesterov = r[4], r[5], r[6], r[7], r[8] != 0
    for i in range(p.shape[0]):
        b = buf[i] if use_buf else gmul
        pi, b = _sgd(p[i], g[i], b, gmul, wd, lr, buf_keep, buf_gain, momentum, nesterov,
                     use_buf)
        p[i] = pi
        if use_buf:
            buf[i] = b
        if use_ema:
            e[i] = ema_keep * e[i] + ema_gain * pi


def _sgd_update(param_addresses, grad_addresses, chunks, coef, active, buf, ema):
    for c in prange(chunks.shape[0]):
        if active[chunks[c, MODEL]]:
            p, g, s0, s1 = _chunk_views(param_addresses, grad_addresses, chunks, c, coef)
            r = coef[chunks[c, ROW]]
            if r[9] != 0:
                if ema.shape[0] > 0:
                    _sgd_chunk(p, g, buf[s0:s1], ema[s0:s1], r, True, True)
                else:
                    _sgd_chunk(p, g, buf[s0:s1], ema, r, True, False)
            elif ema.shape[0] > 0:
                _sgd_chunk(p, g, buf, ema[s0:s1], r, False, True)
            else:
                _sgd_chunk(p, g, buf, ema, r, False, False)


@njit(inline="always", **CPU_OPTIONS)
def _momentum_chunk(p, g, v, e, r, use_ema):
    gmul, wd, ema_keep, ema_gain = r[C_GRAD], r[C_WD], r[C_EMA_KEEP], r[C_EMA_GAIN]
    lr, beta, one_minus_beta = r[4], r[5], r[6]
    for i in range(p.shape[0]):
        pi, v[i] = _momentum(p[i], g[i], v[i], gmul, wd, lr, beta, one_minus_beta)
        p[i] = pi
        if use_ema:
            e[i] = ema_keep * e[i] + ema_gain * pi


def _momentum_update(param_addresses, grad_addresses, chunks, coef, active, velocity, ema):
    for c in prange(chunks.shape[0]):
        if active[chunks[c, MODEL]]:
            p, g, s0, s1 = _chunk_views(param_addresses, grad_addresses, chunks, c, coef)
            r = coef[chunks[c, ROW]]
            if ema.shape[0] > 0:
                _momentum_chunk(p, g, velocity[s0:s1], ema[s0:s1], r, True)
            else:
                _momentum_chunk(p, g, velocity[s0:s1], ema, r, False)


@njit(inline="always", **CPU_OPTIONS)
def _rmsprop_chunk(p, g, sq, ga, buf, e, r, centered, use_buf, use_ema):
    gmul, wd, ema_keep, ema_gain = r[C_GRAD], r[C_WD], r[C_EMA_KEEP], r[C_EMA_GAIN]
    lr, alpha, one_minus_alpha, eps, momentum = r[4], r[5], r[6], r[7], r[8]
    for i in range(p.shape[0]):
        a = ga[i] if centered else gmul
        b = buf[i] if use_buf else gmul
        pi, sq[i], a, b = _rmsprop(p[i], g[i], sq[i], a, b, gmul, wd, lr, alpha,
                                   one_minus_alpha, eps, momentum, centered, use_buf)
        p[i] = pi
        if centered:
            ga[i] = a
        if use_buf:
            buf[i] = b
        if use_ema:
            e[i] = ema_keep * e[i] + ema_gain * pi


def _rmsprop_update(param_addresses, grad_addresses, chunks, coef, active, square_avg,
                    grad_avg, buf, ema):
    for c in prange(chunks.shape[0]):
        if active[chunks[c, MODEL]]:
            p, g, s0, s1 = _chunk_views(param_addresses, grad_addresses, chunks, c, coef)
            r = coef[chunks[c, ROW]]
            sq = square_avg[s0:s1]
            ga = grad_avg[s0:s1] if r[9] != 0 else grad_avg
            b = buf[s0:s1] if r[10] != 0 else buf
            e = ema[s0:s1] if ema.shape[0] > 0 else ema
            if r[9] != 0:
                if r[10] != 0:
                    if ema.shape[0] > 0:
                        _rmsprop_chunk(p, g, sq, ga, b, e, r, True, True, True)
                    else:
                        _rmsprop_chunk(p, g, sq, ga, b, e, r, True, True, False)
                elif ema.shape[0] > 0:
                    _rmsprop_chunk(p, g, sq, ga, b, e, r, True, False, True)
                else:
                    _rmsprop_chunk(p, g, sq, ga, b, e, r, True, False, False)
            elif r[10] != 0:
                if ema.shape[0] > 0:
                    _rmsprop_chunk(p, g, sq, ga, b, e, r, False, True, True)
                else:
                    _rmsprop_chunk(p, g, sq, ga, b, e, r, False, True, False)
            elif ema.shape[0] > 0:
                _rmsprop_chunk(p, g, sq, ga, b, e, r, False, False, True)
            else:
                _rmsprop_chunk(p, g, sq, ga, b, e, r, False, False, False)


@njit(inline="always", **CPU_OPTIONS)
def _adam_chunk(p, g, m, v, vmax, e, r, amsgrad, use_ema):
    gmul, wd, ema_keep, ema_gain = r[C_GRAD], r[C_WD], r[C_EMA_KEEP], r[C_EMA_GAIN]
    decay, beta1, one_minus_beta1, beta2 = r[4], r[5], r[6], r[7]
    one_minus_beta2, step_size, bias_correction2_sqrt, eps = r[8], r[9], r[10], r[11]
    for i in range(p.shape[0]):
        vm = vmax[i] if amsgrad else gmul
        pi, m[i], v[i], vm = _adam(p[i], g[i], m[i], v[i], vm, gmul, wd, decay, beta1,
                                   one_minus_beta1, beta2, one_minus_beta2, step_size,
                                   bias_correction2_sqrt, eps, amsgrad)
        p[i] = pi
        if amsgrad:
            vmax[i] = vm
        if use_ema:
            e[i] = ema_keep * e[i] + ema_gain * pi


def _adam_update(param_addresses, grad_addresses, chunks, coef, active, exp_avg, exp_avg_sq,
                 max_exp_avg_sq, ema):
    for c in prange(chunks.shape[0]):
        if active[chunks[c, MODEL]]:
            p, g, s0, s1 = _chunk_views(param_addresses, grad_addresses, chunks, c, coef)
            r = coef[chunks[c, ROW]]
            m, v = exp_avg[s0:s1], exp_avg_sq[s0:s1]
            if r[12] != 0:
                if ema.shape[0] > 0:
                    _adam_chunk(p, g, m, v, max_exp_avg_sq[s0:s1], ema[s0:s1], r, True, True)
                else:
                    _adam_chunk(p, g, m, v, max_exp_avg_sq[s0:s1], ema, r, True, False)
            elif ema.shape[0] > 0:
                _adam_chunk(p, g, m, v, max_exp_avg_sq, ema[s0:s1], r, False, True)
            else:
                _adam_chunk(p, g, m, v, max_exp_avg_sq, ema, r, False, False)


sgd_update = cpu_kernel_pair(_sgd_update)
momentum_update = cpu_kernel_pair(_momentum_update)
rmsprop_update = cpu_kernel_pair(_rmsprop_update)
adam_update = cpu_kernel_pair(_adam_update)
