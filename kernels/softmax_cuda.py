"""Softmax, log-softmax and softmax cross-entropy for CUDA GPUs, beside ``kernels/softmax.py``
(same modes, same formulas, same loss written relative to the row max).

Arrays are flat (1-D, C-contiguous), viewed as (rows, C, inner):

* ``softmax_rows_cuda`` (inner == 1): a block per row. Its threads stride over the row's
  classes (coalesced), merge the max and the sums through shared memory, and write the result
  in a second sweep; one read of the logits from memory (the row stays in L1/L2), one write.
* ``softmax_tiles_cuda`` (inner > 1, e.g. the notes' (C, m)): a thread per position; neighbour
  threads take neighbour positions, so each class's values are read coalesced.

Losses are written per position in the logits' dtype and reduced per model by
``sum_per_model_cuda``. Every sum over classes (and over positions) is a per-thread Kahan sum
merged by a pairwise tree in shared memory, accurate in float32 at C = 1e6 (SPEC.md).

A float32 kernel runs no float64 instruction: every constant comes in the logits' dtype
(``smoothing``; ``w`` = grad_scale, 1 for the softmax modes), never as a Python literal or an
integer divisor, which would promote the expression.
"""

import math

import numpy as np
from numba import types

from .cudalib import THREADS_PER_BLOCK, array, cuda, device_function, kernel, launch
from .softmax import LOG_SOFTMAX, SOFTMAX, XENT_INDEX, XENT_PROB

DTYPES = (np.float32, np.float64)
I64 = types.int64


def _block_reduce(shared, value, tid, take_max):
    """Sum (or max) of ``value`` over the block's threads, returned to every thread."""
    shared[tid] = value
    cuda.syncthreads()
    width = THREADS_PER_BLOCK // 2
    while width > 0:
        if tid < width:
            other = shared[tid + width]
            if take_max:
                if other > shared[tid]:
                    shared[tid] = other
            else:
                shared[tid] += other
        cuda.syncthreads()
        width //= 2
    total = shared[0]
    cuda.syncthreads()  # shared is reused by the next reduction
    return total


_block_reduce = device_function(_block_reduce)


def _kahan_add(total, compensation, value):
    """Kahan's compensated ``total + value``: returns the new (total, compensation), where
    ``compensation`` holds the low bits that ``total`` lost (subtracted from the next value).
    A thread's running sum over C / threads classes (all C in the tiles kernel) stays accurate
    in float32 at C = 1e6 without float64 instructions; no fast-math here, so the compiler
    keeps the order (it never reassociates without it)."""
    corrected = value - compensation
    new_total = total + corrected
    return new_total, (new_total - total) - corrected


_kahan_add = device_function(_kahan_add)


def _signatures(tiles):
    extra = (I64,) if tiles else ()
    return [(array(d), array(np.int64), array(d), array(d), I64, array(d), I64, I64, I64, I64)
            + extra + (array(d), array(d)) for d in DTYPES]


@kernel(_signatures(tiles=False))
def softmax_rows_cuda(z, labels, probs, grad_scale, rows_per_model, smoothing, ignore_index,
                      mode, n_rows, n_classes, out, loss):
    """Rows of n_classes contiguous values; see the module docstring and kernels/softmax.py."""
    tid = cuda.threadIdx.x
    shared = cuda.shared.array(THREADS_PER_BLOCK, z.dtype)
    keep, eps, uniform = smoothing[0], smoothing[1], smoothing[2]
    zero = eps - eps
    for r in range(cuda.blockIdx.x, n_rows, cuda.gridDim.x):
        base = r * n_classes
        label = labels[r] if mode == XENT_INDEX else 0
        if mode == XENT_INDEX and label == ignore_index:
            for j in range(tid, n_classes, THREADS_PER_BLOCK):
                out[base + j] = zero
            if tid == 0:
                loss[r] = zero
            continue
        top = z[base]
        for j in range(tid, n_classes, THREADS_PER_BLOCK):
            if z[base + j] > top or z[base + j] != z[base + j]:  # NaN wins, as on the CPU
                top = z[base + j]
        top = _block_reduce(shared, top, tid, True)
        # what the loss needs of z, read before out (which may be z) is written
        label_gap = top - z[base + label] if mode == XENT_INDEX else zero
        # per-thread Kahan sums, then the pairwise tree of _block_reduce
        target_dot_z = target_sum = z_sum = zero
        dot_c = mass_c = z_c = zero
        if mode >= XENT_INDEX:
            for j in range(tid, n_classes, THREADS_PER_BLOCK):
                shifted = z[base + j] - top
                z_sum, z_c = _kahan_add(z_sum, z_c, shifted)
                if mode == XENT_PROB:
                    target_dot_z, dot_c = _kahan_add(target_dot_z, dot_c,
                                                     probs[base + j] * shifted)
                    target_sum, mass_c = _kahan_add(target_sum, mass_c, probs[base + j])
            if eps != zero:
                z_sum = _block_reduce(shared, z_sum, tid, False)
            if mode == XENT_PROB:
                target_dot_z = _block_reduce(shared, target_dot_z, tid, False)
                target_sum = _block_reduce(shared, target_sum, tid, False)
        cuda.syncthreads()  # every thread has read z before any writes out
        total = total_c = zero
        for j in range(tid, n_classes, THREADS_PER_BLOCK):
            e = math.exp(z[base + j] - top)
            total, total_c = _kahan_add(total, total_c, e)
            if mode != LOG_SOFTMAX:
                out[base + j] = e
        total = _block_reduce(shared, total, tid, False)
        log_total = math.log(total)
        w = grad_scale[r // rows_per_model]
        if mode == LOG_SOFTMAX:
            for j in range(tid, n_classes, THREADS_PER_BLOCK):
                out[base + j] = (z[base + j] - top) - log_total
        elif mode == SOFTMAX:
            inverse = w / total  # w = 1 here
            for j in range(tid, n_classes, THREADS_PER_BLOCK):
                out[base + j] *= inverse
        elif mode == XENT_INDEX:
            a, b = w / total, w * uniform
            for j in range(tid, n_classes, THREADS_PER_BLOCK):
                out[base + j] = out[base + j] * a - b
            cuda.syncthreads()
            if tid == 0:
                out[base + label] -= w * keep
                loss[r] = keep * (log_total + label_gap) + eps * log_total - uniform * z_sum
        else:
            mass = keep * target_sum + eps
            a, b, c = w * mass / total, w * uniform, w * keep
            for j in range(tid, n_classes, THREADS_PER_BLOCK):
                out[base + j] = out[base + j] * a - (c * probs[base + j] + b)
            if tid == 0:
                loss[r] = mass * log_total - keep * target_dot_z - uniform * z_sum
        cuda.syncthreads()


@kernel(_signatures(tiles=True))
def softmax_tiles_cuda(z, labels, probs, grad_scale, rows_per_model, smoothing, ignore_index,
                       mode, n_rows, n_classes, inner, out, loss):
    """(rows, n_classes, inner) with inner > 1: a thread per (row, position)."""
    keep, eps, uniform = smoothing[0], smoothing[1], smoothing[2]
    zero = eps - eps
    for item in range(cuda.grid(1), n_rows * inner, cuda.gridsize(1)):
        r, i = item // inner, item % inner
        base = r * n_classes * inner + i  # class c at base + c * inner
        label = labels[item] if mode == XENT_INDEX else 0
        if mode == XENT_INDEX and label == ignore_index:
            for c in range(n_classes):
                out[base + c * inner] = zero
            loss[item] = zero
            continue
        top = z[base]
        for c in range(n_classes):
            v = z[base + c * inner]
            if v > top or v != v:
                top = v
        label_gap = top - z[base + label * inner] if mode == XENT_INDEX else zero
        # Kahan sums: one thread runs over all C classes
        target_dot_z = target_sum = z_sum = dot_c = mass_c = z_c = zero
        if mode >= XENT_INDEX:
            for c in range(n_classes):
                shifted = z[base + c * inner] - top
                z_sum, z_c = _kahan_add(z_sum, z_c, shifted)
                if mode == XENT_PROB:
                    target_dot_z, dot_c = _kahan_add(target_dot_z, dot_c,
                                                     probs[base + c * inner] * shifted)
                    target_sum, mass_c = _kahan_add(target_sum, mass_c, probs[base + c * inner])
        total = total_c = zero
        for c in range(n_classes):
            e = math.exp(z[base + c * inner] - top)
            total, total_c = _kahan_add(total, total_c, e)
            if mode != LOG_SOFTMAX:
                out[base + c * inner] = e
        log_total = math.log(total)
        w = grad_scale[r // rows_per_model]
        if mode == LOG_SOFTMAX:
            for c in range(n_classes):
                out[base + c * inner] = (z[base + c * inner] - top) - log_total
        elif mode == SOFTMAX:
            inverse = w / total  # w = 1 here
            for c in range(n_classes):
                out[base + c * inner] *= inverse
        elif mode == XENT_INDEX:
            a, b = w / total, w * uniform
            for c in range(n_classes):
                out[base + c * inner] = out[base + c * inner] * a - b
            out[base + label * inner] -= w * keep
            loss[item] = keep * (log_total + label_gap) + eps * log_total - uniform * z_sum
        else:
            mass = keep * target_sum + eps
            a, b, c_ = w * mass / total, w * uniform, w * keep
            for c in range(n_classes):
                out[base + c * inner] = (out[base + c * inner] * a
                                         - (c_ * probs[base + c * inner] + b))
            loss[item] = mass * log_total - keep * target_dot_z - uniform * z_sum


@kernel([(array(d), I64, array(d), array(d)) for d in DTYPES])
def sum_per_model_cuda(values, per_model, scale, out):
    """out[k] = scale[k] * sum(values[k * per_model:(k + 1) * per_model]): a block per model
    (a NaN scale, the mean over no position, gives NaN)."""
    tid = cuda.threadIdx.x
    shared = cuda.shared.array(THREADS_PER_BLOCK, values.dtype)
    for k in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
        total = compensation = values[0] - values[0]
        for i in range(k * per_model + tid, (k + 1) * per_model, THREADS_PER_BLOCK):
            total, compensation = _kahan_add(total, compensation, values[i])
        total = _block_reduce(shared, total, tid, False)
        if tid == 0:
            out[k] = total * scale[k]


@kernel([(array(np.int64), I64, I64, I64, array(np.int64), array(np.int64))])
def label_counts_cuda(labels, per_model, n_classes, ignore_index, counts, bad):
    """counts[k] += labels of model k not ignored; bad[0] = 1, bad[1] = a label out of range."""
    for i in range(cuda.grid(1), labels.shape[0], cuda.gridsize(1)):
        label = labels[i]
        if label != ignore_index:
            cuda.atomic.add(counts, i // per_model, 1)
            if label < 0 or label >= n_classes:
                bad[0] = 1
                bad[1] = label


# -- launchers (flat device arrays, checked by fastdl.softmax) ----------------------------------


def _items(size):
    return -(-size // THREADS_PER_BLOCK)


def run(mode, z, labels, probs, grad_scale, rows_per_model, smoothing, ignore_index, view,
        out, loss):
    """One launch of the kernel of ``view`` = (K, outer, C, inner) (rows = K * outer): writes
    ``out`` and the per-position losses ``loss``, a device array (rows * inner,) of z's dtype
    (written for the cross-entropy modes only). ``labels`` / ``probs`` are flat device arrays
    or 1-element stand-ins; ``grad_scale`` (K,) and ``smoothing`` (3,) device arrays of z's
    dtype."""
    n_models, outer, n_classes, inner = view
    n_rows = n_models * outer
    if inner == 1:
        launch(softmax_rows_cuda, n_rows, z, labels, probs, grad_scale, rows_per_model,
               smoothing, ignore_index, mode, n_rows, n_classes, out, loss)
    else:
        launch(softmax_tiles_cuda, _items(n_rows * inner), z, labels, probs, grad_scale,
               rows_per_model, smoothing, ignore_index, mode, n_rows, n_classes, inner, out,
               loss)


def sum_per_model(values, n_models, scale, out):
    """out[k] (a (K,) device array) = scale[k] * the sum of model k's share of ``values``."""
    launch(sum_per_model_cuda, n_models, values, values.shape[0] // n_models, scale, out)


def label_counts(labels, n_models, n_classes, ignore_index, counts, bad):
    """Labels not ignored per model (host int64 (K,)) and the first label found out of
    [0, n_classes) that is not ``ignore_index`` (or None): the one sync of the GPU path.
    ``counts`` (K,) and ``bad`` (2,): zeroed int64 device arrays the kernel writes."""
    launch(label_counts_cuda, _items(labels.shape[0]), labels, labels.shape[0] // n_models,
           n_classes, ignore_index, counts, bad)
    bad = bad.copy_to_host()
    return counts.copy_to_host(), (int(bad[1]) if bad[0] else None)
