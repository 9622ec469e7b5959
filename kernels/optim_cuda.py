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
from .optim import ADAM, CHUNK, MOMENTUM, RMSPROP, SGD

_sgd = device_function(cpu.sgd_element)
_momentum = device_function(cpu.momentum_element)
_rmsprop = device_function(cpu.rmsprop_element)
_adam = device_function(cpu.adam_element)
_ema = device_function(cpu.ema_element)
_shared = device_function(cpu.shared_coefficients)

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
    lo, hi = chunks[c, CHUNK.lo], chunks[c, CHUNK.hi]
    return lo + cuda.threadIdx.x, hi, chunks[c, CHUNK.state] - lo


_thread_range = device_function(_thread_range)


def _operands(params, grads, chunks, coef, c):
    """Chunk c's parameter and gradient arrays and its coefficient row."""
    ptr = chunks[c, CHUNK.ptr]
    return params[ptr], grads[ptr], coef[chunks[c, CHUNK.row]]


_operands = device_function(_operands)


@kernel(_signatures(1))
def sgd_update_cuda(params, grads, chunks, coef, active, buf, ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            lr, buf_keep, buf_gain, momentum = r[SGD.lr], r[SGD.buf_keep], r[SGD.buf_gain], \
                r[SGD.momentum]
            nesterov, use_buf = r[SGD.nesterov] != 0, r[SGD.use_buf] != 0
            use_ema = ema.shape[0] > 0
            start, stop, s = _thread_range(chunks, c)
            for i in range(start, stop, cuda.blockDim.x):
                b = buf[s + i] if use_buf else gmul
                pi, b = _sgd(p[i], g[i], b, gmul, wd, lr, buf_keep, buf_gain, momentum,
                             nesterov, use_buf)
                p[i] = pi
                if use_buf:
                    buf[s + i] = b
                if use_ema:
                    ema[s + i] = _ema(ema[s + i], pi, ema_keep, ema_gain)


@kernel(_signatures(1))
def momentum_update_cuda(params, grads, chunks, coef, active, velocity, ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            lr, beta = r[MOMENTUM.lr], r[MOMENTUM.beta]
            one_minus_beta = r[MOMENTUM.one_minus_beta]
            use_ema = ema.shape[0] > 0
            start, stop, s = _thread_range(chunks, c)
            for i in range(start, stop, cuda.blockDim.x):
                pi, v = _momentum(p[i], g[i], velocity[s + i], gmul, wd, lr, beta,
                                  one_minus_beta)
                p[i] = pi
                velocity[s + i] = v
                if use_ema:
                    ema[s + i] = _ema(ema[s + i], pi, ema_keep, ema_gain)


@kernel(_signatures(3))
def rmsprop_update_cuda(params, grads, chunks, coef, active, square_avg, grad_avg, buf, ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            lr, alpha, one_minus_alpha = r[RMSPROP.lr], r[RMSPROP.alpha], \
                r[RMSPROP.one_minus_alpha]
            eps, momentum = r[RMSPROP.eps], r[RMSPROP.momentum]
            centered, use_buf = r[RMSPROP.centered] != 0, r[RMSPROP.use_buf] != 0
            use_ema = ema.shape[0] > 0
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
                    ema[s + i] = _ema(ema[s + i], pi, ema_keep, ema_gain)


@kernel(_signatures(3))
def adam_update_cuda(params, grads, chunks, coef, active, exp_avg, exp_avg_sq, max_exp_avg_sq,
                     ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            decay, beta1, one_minus_beta1 = r[ADAM.decay], r[ADAM.beta1], r[ADAM.one_minus_beta1]
            beta2, one_minus_beta2 = r[ADAM.beta2], r[ADAM.one_minus_beta2]
            step_size, bias_correction2_sqrt = r[ADAM.step_size], r[ADAM.bias_correction2_sqrt]
            eps, amsgrad = r[ADAM.eps], r[ADAM.amsgrad] != 0
            use_ema = ema.shape[0] > 0
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
                    ema[s + i] = _ema(ema[s + i], pi, ema_keep, ema_gain)


UPDATES = {"sgd": sgd_update_cuda, "momentum": momentum_update_cuda,
           "rmsprop": rmsprop_update_cuda, "adam": adam_update_cuda,
           "adamw": adam_update_cuda}


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
        g = grads[chunks[c, CHUNK.ptr]]
        scale = inv_scale[chunks[c, CHUNK.model]]
        total = scale - scale  # zero in the dtype (a literal 0.0 would be float64)
        bad = 0
        for i in range(chunks[c, CHUNK.lo] + tid, chunks[c, CHUNK.hi], cuda.blockDim.x):
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
