"""Fused optimizer kernels for CUDA GPUs: the element functions of ``kernels/optim.py`` run by
the same chunk tables (see that module's docstring), one block per chunk, grid-stride.

A step is one launch of ``grad_stats`` (only when skipping or clipping is asked for; it writes
one partial sum of squares and one non-finite flag per chunk, which the host adds up per model
in float64, so the result does not depend on scheduling) and one launch of the update kernel.
Params and grads arrive as tuples of 1-D arrays: one array each for a flat buffer (one launch),
up to ``MAX_TENSORS_PER_LAUNCH`` separate arrays per launch otherwise.

No float64 instruction is executed by the float32 kernels: coefficients come precomputed in
the parameters' dtype, and the partial sums are accumulated in that dtype (each thread adds at
most CHUNK_SIZE / THREADS_PER_BLOCK = 32 squares before the shared-memory tree).
"""

import math

import numpy as np
from numba import types

from . import optim as cpu
from .cudalib import (
    MAX_TENSORS_PER_LAUNCH,
    THREADS_PER_BLOCK,
    array,
    cuda,
    device_function,
    kernel,
)
from .optim import C_EMA_GAIN, C_EMA_KEEP, C_GRAD, C_WD, HI, LO, MODEL, PTR, ROW, STATE

_sgd = device_function(cpu.sgd_element)
_momentum = device_function(cpu.momentum_element)
_rmsprop = device_function(cpu.rmsprop_element)
_adam = device_function(cpu.adam_element)

DTYPES = (np.float32, np.float64)


def _signatures(n_state):
    """Registry signatures of an update kernel: both dtypes, flat (1) and batched tensors."""
    signatures = []
    for dtype in DTYPES:
        for n_tensors in (1, MAX_TENSORS_PER_LAUNCH):
            tensors = types.UniTuple(array(dtype), n_tensors)
            signatures.append((tensors, tensors, array(np.int64, 2), array(dtype, 2),
                               array(np.bool_)) + (array(dtype),) * (n_state + 1))
    return signatures


def _thread_range(chunks, c):
    """This thread's first element, the end, and the state offset of element 0."""
    lo, hi = chunks[c, LO], chunks[c, HI]
    return lo + cuda.threadIdx.x, hi, chunks[c, STATE] - lo


_thread_range = device_function(_thread_range)


@kernel(_signatures(1))
def sgd_update_cuda(params, grads, chunks, coef, active, buf, ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, MODEL]]:
            p, g, r = params[chunks[c, PTR]], grads[chunks[c, PTR]], coef[chunks[c, ROW]]
            gmul, wd, ema_keep, ema_gain = r[C_GRAD], r[C_WD], r[C_EMA_KEEP], r[C_EMA_GAIN]
            lr, buf_keep, buf_gain, momentum = r[4], r[5], r[6], r[7]
            nesterov, use_buf, use_ema = r[8] != 0, r[9] != 0, ema.shape[0] > 0
            start, stop, s = _thread_range(chunks, c)
            for i in range(start, stop, cuda.blockDim.x):
                b = buf[s + i] if use_buf else gmul
                pi, b = _sgd(p[i], g[i], b, gmul, wd, lr, buf_keep, buf_gain, momentum,
                             nesterov, use_buf)
                p[i] = pi
                if use_buf:
                    buf[s + i] = b
                if use_ema:
                    ema[s + i] = ema_keep * ema[s + i] + ema_gain * pi


@kernel(_signatures(1))
def momentum_update_cuda(params, grads, chunks, coef, active, velocity, ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, MODEL]]:
            p, g, r = params[chunks[c, PTR]], grads[chunks[c, PTR]], coef[chunks[c, ROW]]
            gmul, wd, ema_keep, ema_gain = r[C_GRAD], r[C_WD], r[C_EMA_KEEP], r[C_EMA_GAIN]
            lr, beta, one_minus_beta = r[4], r[5], r[6]
            use_ema = ema.shape[0] > 0
            start, stop, s = _thread_range(chunks, c)
            for i in range(start, stop, cuda.blockDim.x):
                pi, v = _momentum(p[i], g[i], velocity[s + i], gmul, wd, lr, beta,
                                  one_minus_beta)
                p[i] = pi
                velocity[s + i] = v
                if use_ema:
                    ema[s + i] = ema_keep * ema[s + i] + ema_gain * pi


@kernel(_signatures(3))
def rmsprop_update_cuda(params, grads, chunks, coef, active, square_avg, grad_avg, buf, ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, MODEL]]:
            p, g, r = params[chunks[c, PTR]], grads[chunks[c, PTR]], coef[chunks[c, ROW]]
            gmul, wd, ema_keep, ema_gain = r[C_GRAD], r[C_WD], r[C_EMA_KEEP], r[C_EMA_GAIN]
            lr, alpha, one_minus_alpha, eps, momentum = r[4], r[5], r[6], r[7], r[8]
            centered, use_buf, use_ema = r[9] != 0, r[10] != 0, ema.shape[0] > 0
            start, stop, s = _thread_range(chunks, c)
            for i in range(start, stop, cuda.blockDim.x):
                a = grad_avg[s + i] if centered else gmul
                b = buf[s + i] if use_buf else gmul
                pi, sq, a, b = _rmsprop(p[i], g[i], square_avg[s + i], a, b, gmul, wd, lr,
                                        alpha, one_minus_alpha, eps, momentum, centered,
                                        use_buf)
                p[i] = pi
                square_avg[s + i] = sq
                if centered:
                    grad_avg[s + i] = a
                if use_buf:
                    buf[s + i] = b
                if use_ema:
                    ema[s + i] = ema_keep * ema[s + i] + ema_gain * pi


@kernel(_signatures(3))
def adam_update_cuda(params, grads, chunks, coef, active, exp_avg, exp_avg_sq, max_exp_avg_sq,
                     ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, MODEL]]:
            p, g, r = params[chunks[c, PTR]], grads[chunks[c, PTR]], coef[chunks[c, ROW]]
            gmul, wd, ema_keep, ema_gain = r[C_GRAD], r[C_WD], r[C_EMA_KEEP], r[C_EMA_GAIN]
            decay, beta1, one_minus_beta1, beta2 = r[4], r[5], r[6], r[7]
            one_minus_beta2, step_size, bias_correction2_sqrt, eps = r[8], r[9], r[10], r[11]
            amsgrad, use_ema = r[12] != 0, ema.shape[0] > 0
            start, stop, s = _thread_range(chunks, c)
            for i in range(start, stop, cuda.blockDim.x):
                vm = max_exp_avg_sq[s + i] if amsgrad else gmul
                pi, m, v, vm = _adam(p[i], g[i], exp_avg[s + i], exp_avg_sq[s + i], vm, gmul,
                                     wd, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                                     step_size, bias_correction2_sqrt, eps, amsgrad)
                p[i] = pi
                exp_avg[s + i] = m
                exp_avg_sq[s + i] = v
                if amsgrad:
                    max_exp_avg_sq[s + i] = vm
                if use_ema:
                    ema[s + i] = ema_keep * ema[s + i] + ema_gain * pi


UPDATES = {"sgd": sgd_update_cuda, "momentum": momentum_update_cuda,
           "rmsprop": rmsprop_update_cuda, "adam": adam_update_cuda}


def _stats_signatures():
    signatures = []
    for dtype in DTYPES:
        for n_tensors in (1, MAX_TENSORS_PER_LAUNCH):
            signatures.append((types.UniTuple(array(dtype), n_tensors), array(np.int64, 2),
                               array(dtype), array(dtype), array(np.int32)))
    return signatures


@kernel(_stats_signatures())
def grad_stats_cuda(grads, chunks, inv_scale, chunk_sumsq, chunk_nonfinite):
    """Per chunk (one block): sum of (g * inv_scale[model])**2 and whether any is inf/NaN,
    reduced in shared memory."""
    tid = cuda.threadIdx.x
    sums = cuda.shared.array(THREADS_PER_BLOCK, chunk_sumsq.dtype)
    flags = cuda.shared.array(THREADS_PER_BLOCK, types.int32)
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        g = grads[chunks[c, PTR]]
        scale = inv_scale[chunks[c, MODEL]]
        total = scale - scale  # zero in the dtype (a literal 0.0 would be float64)
        bad = 0
        for i in range(chunks[c, LO] + tid, chunks[c, HI], cuda.blockDim.x):
            x = g[i] * scale
            total += x * x
            if not math.isfinite(x):
                bad = 1
        sums[tid] = total
        flags[tid] = bad
        cuda.syncthreads()
        width = THREADS_PER_BLOCK // 2
        while width > 0:
            if tid < width:
                sums[tid] += sums[tid + width]
                flags[tid] |= flags[tid + width]
            cuda.syncthreads()
            width //= 2
        if tid == 0:
            chunk_sumsq[c] = sums[0]
            chunk_nonfinite[c] = flags[0]
        cuda.syncthreads()  # sums / flags are reused by this block's next chunk


@kernel([(array(dtype), array(dtype)) for dtype in DTYPES])
def fill_cuda(out, value):
    """``out[:] = value[0]`` (grid-stride): zeroed state without a host-to-device copy."""
    v = value[0]
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = v
