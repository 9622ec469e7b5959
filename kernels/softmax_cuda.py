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

Class weights: class j of model k weighs ``weight[(k % weight_rows) * C * weight_step + j *
weight_step]``; without weights the launcher passes one weight of 1 with ``weight_step = 0``,
so both cases run one code path (the weight read is a broadcast from cache), with the same
formulas as the CPU kernels (kernels/softmax.py's docstring).

A float32 kernel runs no float64 instruction: every constant comes in the logits' dtype
(``smoothing``; ``g`` = grad_scale, 1 for the softmax modes; the weights), never as a Python
literal or an integer divisor, which would promote the expression.
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
    return [(array(d), array(np.int64), array(d), array(d), I64, I64, array(d), I64, array(d),
             I64, I64, I64, I64) + extra + (array(d), array(d)) for d in DTYPES]


@kernel(_signatures(tiles=False))
def softmax_rows_cuda(z, labels, probs, weight, weight_rows, weight_step, grad_scale,
                      rows_per_model, smoothing, ignore_index, mode, n_rows, n_classes, out,
                      loss):
    """Rows of n_classes contiguous values; see the module docstring and kernels/softmax.py."""
    tid = cuda.threadIdx.x
    shared = cuda.shared.array(THREADS_PER_BLOCK, z.dtype)
    keep, eps, uniform = smoothing[0], smoothing[1], smoothing[2]
    zero = eps - eps
    for r in range(cuda.blockIdx.x, n_rows, cuda.gridDim.x):
        base = r * n_classes
        model = r // rows_per_model
        w_base = (model % weight_rows) * n_classes * weight_step  # class j at + j * weight_step
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
        w_label = weight[w_base + label * weight_step]
        # per-thread Kahan sums, then the pairwise tree of _block_reduce: sum_j w_j (z_j - max)
        # and W = sum_j w_j for smoothing, sum_j w_j y_j (z_j - max) and sum_j w_j y_j
        target_dot_z = target_sum = z_sum = w_sum = zero
        dot_c = mass_c = z_c = w_c = zero
        if mode >= XENT_INDEX:
            for j in range(tid, n_classes, THREADS_PER_BLOCK):
                shifted = z[base + j] - top
                w = weight[w_base + j * weight_step]
                z_sum, z_c = _kahan_add(z_sum, z_c, w * shifted)
                w_sum, w_c = _kahan_add(w_sum, w_c, w)
                if mode == XENT_PROB:
                    t = w * probs[base + j]
                    target_dot_z, dot_c = _kahan_add(target_dot_z, dot_c, t * shifted)
                    target_sum, mass_c = _kahan_add(target_sum, mass_c, t)
            if eps != zero:
                z_sum = _block_reduce(shared, z_sum, tid, False)
                w_sum = _block_reduce(shared, w_sum, tid, False)
            else:  # no smoothing term (uniform = 0): leave out even non-finite weights
                z_sum = w_sum = zero
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
        g = grad_scale[model]
        if mode == LOG_SOFTMAX:
            for j in range(tid, n_classes, THREADS_PER_BLOCK):
                out[base + j] = (z[base + j] - top) - log_total
        elif mode == SOFTMAX:
            inverse = g / total  # g = 1 here
            for j in range(tid, n_classes, THREADS_PER_BLOCK):
                out[base + j] *= inverse
        elif mode == XENT_INDEX:
            keep_w = keep * w_label
            a, b = g * (keep_w + uniform * w_sum) / total, g * uniform
            for j in range(tid, n_classes, THREADS_PER_BLOCK):
                out[base + j] = out[base + j] * a - b * weight[w_base + j * weight_step]
            cuda.syncthreads()
            if tid == 0:
                out[base + label] -= g * keep_w
                loss[r] = keep_w * (log_total + label_gap) + uniform * (w_sum * log_total
                                                                        - z_sum)
        else:
            mass = keep * target_sum + uniform * w_sum
            a, b, c = g * mass / total, g * uniform, g * keep
            for j in range(tid, n_classes, THREADS_PER_BLOCK):
                out[base + j] = (out[base + j] * a
                                 - weight[w_base + j * weight_step] * (c * probs[base + j] + b))
            if tid == 0:
                loss[r] = mass * log_total - keep * target_dot_z - uniform * z_sum
        cuda.syncthreads()


@kernel(_signatures(tiles=True))
def softmax_tiles_cuda(z, labels, probs, weight, weight_rows, weight_step, grad_scale,
                       rows_per_model, smoothing, ignore_index, mode, n_rows, n_classes, inner,
                       out, loss):
    """(rows, n_classes, inner) with inner > 1: a thread per (row, position)."""
    keep, eps, uniform = smoothing[0], smoothing[1], smoothing[2]
    zero = eps - eps
    for item in range(cuda.grid(1), n_rows * inner, cuda.gridsize(1)):
        r, i = item // inner, item % inner
        base = r * n_classes * inner + i  # class c at base + c * inner
        model = r // rows_per_model
        w_base = (model % weight_rows) * n_classes * weight_step  # class c at + c * weight_step
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
        w_label = weight[w_base + label * weight_step]
        # Kahan sums: one thread runs over all C classes
        target_dot_z = target_sum = z_sum = w_sum = dot_c = mass_c = z_c = w_c = zero
        if mode >= XENT_INDEX:
            for c in range(n_classes):
                shifted = z[base + c * inner] - top
                w = weight[w_base + c * weight_step]
                if eps != zero:
                    z_sum, z_c = _kahan_add(z_sum, z_c, w * shifted)
                    w_sum, w_c = _kahan_add(w_sum, w_c, w)
                if mode == XENT_PROB:
                    t = w * probs[base + c * inner]
                    target_dot_z, dot_c = _kahan_add(target_dot_z, dot_c, t * shifted)
                    target_sum, mass_c = _kahan_add(target_sum, mass_c, t)
        total = total_c = zero
        for c in range(n_classes):
            e = math.exp(z[base + c * inner] - top)
            total, total_c = _kahan_add(total, total_c, e)
            if mode != LOG_SOFTMAX:
                out[base + c * inner] = e
        log_total = math.log(total)
        g = grad_scale[model]
        if mode == LOG_SOFTMAX:
            for c in range(n_classes):
                out[base + c * inner] = (z[base + c * inner] - top) - log_total
        elif mode == SOFTMAX:
            inverse = g / total  # g = 1 here
            for c in range(n_classes):
                out[base + c * inner] *= inverse
        elif mode == XENT_INDEX:
            keep_w = keep * w_label
            a, b = g * (keep_w + uniform * w_sum) / total, g * uniform
            for c in range(n_classes):
                out[base + c * inner] = (out[base + c * inner] * a
                                         - b * weight[w_base + c * weight_step])
            out[base + label * inner] -= g * keep_w
            loss[item] = keep_w * (log_total + label_gap) + uniform * (w_sum * log_total - z_sum)
        else:
            mass = keep * target_sum + uniform * w_sum
            a, b, c_ = g * mass / total, g * uniform, g * keep
            for c in range(n_classes):
                out[base + c * inner] = (out[base + c * inner] * a
                                         - weight[w_base + c * weight_step]
                                         * (c_ * probs[base + c * inner] + b))
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


@kernel([(array(np.int64), I64, array(d), I64, I64, array(d)) for d in DTYPES])
def label_weights_cuda(labels, per_model, weight, n_classes, ignore_index, sums):
    """sums[k] = the sum of weight[(k % weight_rows) * n_classes + label] over model k's labels
    not ignored (all in range): a block per model, Kahan per thread, then the tree. ``sums``
    comes zeroed (its zeros start the sums: ``weight[0] - weight[0]`` is NaN for an infinite
    weight)."""
    tid = cuda.threadIdx.x
    shared = cuda.shared.array(THREADS_PER_BLOCK, weight.dtype)
    weight_rows = weight.shape[0] // n_classes
    for k in range(cuda.blockIdx.x, sums.shape[0], cuda.gridDim.x):
        w_base = (k % weight_rows) * n_classes
        total = compensation = sums[k]
        for i in range(k * per_model + tid, (k + 1) * per_model, THREADS_PER_BLOCK):
            if labels[i] != ignore_index:
                total, compensation = _kahan_add(total, compensation, weight[w_base + labels[i]])
        total = _block_reduce(shared, total, tid, False)
        if tid == 0:
            sums[k] = total


# -- launchers (flat device arrays, checked by fastdl.softmax) ----------------------------------


def _items(size):
    return -(-size // THREADS_PER_BLOCK)


def run(mode, z, labels, probs, weight, grad_scale, rows_per_model, smoothing, ignore_index,
        view, out, loss):
    """One launch of the kernel of ``view`` = (K, outer, C, inner) (rows = K * outer): writes
    ``out`` and the per-position losses ``loss``, a device array (rows * inner,) of z's dtype
    (written for the cross-entropy modes only). ``labels`` / ``probs`` are flat device arrays
    or 1-element stand-ins; ``weight`` a flat (C,) or (K * C,) device array or None;
    ``grad_scale`` (K,) and ``smoothing`` (3,) device arrays of z's dtype."""
    n_models, outer, n_classes, inner = view
    n_rows = n_models * outer
    if weight is None:  # one weight of 1 for every class (weight_step 0)
        weight, weight_rows, weight_step = _ones(z.dtype), 1, 0
    else:
        weight_rows, weight_step = weight.shape[0] // n_classes, 1
    weights = (weight, weight_rows, weight_step)
    if inner == 1:
        launch(softmax_rows_cuda, n_rows, z, labels, probs, *weights, grad_scale,
               rows_per_model, smoothing, ignore_index, mode, n_rows, n_classes, out, loss)
    else:
        launch(softmax_tiles_cuda, _items(n_rows * inner), z, labels, probs, *weights,
               grad_scale, rows_per_model, smoothing, ignore_index, mode, n_rows, n_classes,
               inner, out, loss)


_ONES = {}  # dtype -> a 1-element device array holding 1, the weight of unweighted classes


def _ones(dtype):
    ones = _ONES.get(np.dtype(dtype))
    if ones is None:
        ones = _ONES[np.dtype(dtype)] = cuda.to_device(np.ones(1, dtype))
    return ones


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


def label_weights(labels, n_models, weight, n_classes, ignore_index, sums):
    """Per model, the sum of the class weights of its labels not ignored (all in range), as
    host float64 (K,): the divisor of a weighted "mean" (a second sync). ``weight``: flat (C,)
    or (K * C,); ``sums``: a zeroed (K,) device array of the weights' dtype."""
    launch(label_weights_cuda, n_models, labels, labels.shape[0] // n_models, weight, n_classes,
           ignore_index, sums)
    return sums.copy_to_host().astype(np.float64)
