"""Softmax, log-softmax and fused softmax cross-entropy on the CPU.

Logits are viewed as (rows, C, inner): the class axis has C values ``inner`` elements apart.
One kernel per memory order, each reading the logits in order:

* ``inner == 1`` (``(m, C)``, class axis last): a row's C values are contiguous. Per row, pass A
  takes the max (on :func:`ordered_bits`, so that it vectorizes) and what the loss needs of the
  logits, pass B writes ``e = exp(z - max)`` into the output and sums it, pass C turns ``e``
  into the result in place. The row stays in L1/L2 between passes, so the logits are read from
  memory once and the output written once; no probability array is ever made.
* ``inner > 1`` (the notes' ``(C, m)``, or ``(N, C, H, W)``): a tile of TILE neighbouring
  positions is processed class by class, each pass vectorized across the tile, with the
  per-position max and sums in a scratch block per worker.

``mode`` picks the result: SOFTMAX, LOG_SOFTMAX, or the gradient of the cross-entropy with
index targets (XENT_INDEX) or probability targets (XENT_PROB), plus each position's loss::

    index:  loss = (1-eps) * (lse - z_y) + eps * (lse - mean_j z_j)
            grad = w * (softmax(z) - (1-eps) * onehot(y) - eps/C)
    prob:   t = (1-eps) * y + eps/C ;  T = sum_j t_j
            loss = T * lse - sum_j t_j z_j ;  grad = w * (softmax(z) * T - t)

with ``lse = max + log(sum_j e_j)`` and ``w = grad_scale[model]`` (1 / count for "mean", 1 else);
ignored positions get loss 0 and gradient 0. ``smoothing`` holds (1 - eps, eps, eps / C) in the
logits' dtype, made on the host so that no float64 enters the vector loops. Unused target
arrays are passed as 1-element dummies. Losses are written in float64 for the host to reduce.
"""

import math

import numpy as np
from numba import njit, prange

from .config import CPU_OPTIONS, FASTMATH_IN_ORDER, cpu_kernel_pair
from .floats import exp_fast, from_ordered_bits, ordered_bits, ordered_bits_empty

SOFTMAX, LOG_SOFTMAX, XENT_INDEX, XENT_PROB = range(4)

# Positions per tile of the inner > 1 kernel: long enough that the per-class loops run mostly
# vectorized (shorter tiles measured slower), short enough that a tile of C ~ 2000 float32
# classes stays in L2 between its passes.
TILE = 128


@njit(inline="always")
def _row_max(z):
    top = ordered_bits(z[0])
    for j in range(z.shape[0]):
        top = max(top, ordered_bits(z[j]))
    return from_ordered_bits(top, z[0])


@njit(inline="always")
def _row_sum(z, shift):
    """sum(z - shift): the logits enter the loss relative to their max, exact near it."""
    total = z.dtype.type(0)
    for j in range(z.shape[0]):
        total += z[j] - shift
    return total


@njit(fastmath=FASTMATH_IN_ORDER, error_model="numpy", cache=True)
def _shift_row(z, top, log_total, out):
    """out = (z - top) - log_total, in that order: exact where z is near top (z - lse is not,
    once top is large: 3e4 + log_total rounds to 0.002 in float32)."""
    for j in range(z.shape[0]):
        out[j] = (z[j] - top) - log_total


@njit(fastmath=FASTMATH_IN_ORDER, error_model="numpy", cache=True)
def _shift_tile(z, top, log_total, out):
    """out = (z - top) - log_total per position of a tile (see _shift_row)."""
    for j in range(z.shape[0]):
        out[j] = (z[j] - top[j]) - log_total[j]


@njit(inline="always")
def _log_softmax_row(zr, outr):
    top = _row_max(zr)
    total = zr.dtype.type(0)
    for j in range(zr.shape[0]):
        total += exp_fast(zr[j] - top)
    _shift_row(zr, top, np.log(total), outr)


@njit(inline="always")
def _exp_row(zr, top, outr):
    """outr = exp(zr - top); returns the sum of outr."""
    total = zr.dtype.type(0)
    for j in range(zr.shape[0]):
        e = exp_fast(zr[j] - top)
        outr[j] = e
        total += e
    return total


@njit(inline="always")
def _softmax_row(zr, outr):
    total = _exp_row(zr, _row_max(zr), outr)
    inverse = 1 / total
    for j in range(zr.shape[0]):
        outr[j] *= inverse


@njit(inline="always")
def _index_xent_row(zr, label, w, keep, eps, uniform, outr):
    """Write the gradient of row ``zr`` with class ``label`` into ``outr``; return the loss."""
    n_classes = zr.shape[0]
    top = _row_max(zr)
    # what the loss needs of z, read before outr (which may be zr) is written
    label_gap = np.float64(top - zr[label])
    z_sum = np.float64(_row_sum(zr, top)) if eps != 0 else 0.0
    total = _exp_row(zr, top, outr)
    log_total = math.log(np.float64(total))
    a, b = w / total, w * uniform
    for j in range(n_classes):
        outr[j] = outr[j] * a - b
    outr[label] -= w * keep
    # lse - z_j = log_total + (top - z_j)
    return keep * (log_total + label_gap) + eps * (log_total - z_sum / n_classes)


@njit(inline="always")
def _prob_xent_row(zr, tr, w, keep, eps, uniform, outr):
    """Write the gradient of row ``zr`` with target probabilities ``tr`` into ``outr``; return
    the loss."""
    n_classes = zr.shape[0]
    top = _row_max(zr)
    target_dot_z = target_sum = zr.dtype.type(0)
    for j in range(n_classes):
        target_dot_z += tr[j] * (zr[j] - top)
        target_sum += tr[j]
    z_sum = _row_sum(zr, top) if eps != 0 else zr.dtype.type(0)
    total = _exp_row(zr, top, outr)
    log_total = math.log(np.float64(total))
    mass = keep * target_sum + eps
    a, b, c = w * mass / total, w * uniform, w * keep
    for j in range(n_classes):
        outr[j] = outr[j] * a - (c * tr[j] + b)
    # sum_j t_j (lse - z_j) with lse - z_j = log_total - (z_j - top)
    return (np.float64(mass) * log_total - np.float64(keep) * target_dot_z
            - np.float64(uniform) * z_sum)


def rows_kernel(z, index_target, prob_target, grad_scale, rows_per_model, smoothing,
                ignore_index, mode, out, row_loss):
    """z, out: (rows, C); index_target: (rows,) ints; prob_target: (rows, C)."""
    keep, eps, uniform = smoothing[0], smoothing[1], smoothing[2]
    for r in prange(z.shape[0]):
        if mode == LOG_SOFTMAX:
            _log_softmax_row(z[r], out[r])
        elif mode == SOFTMAX:
            _softmax_row(z[r], out[r])
        elif mode == XENT_PROB:
            row_loss[r] = _prob_xent_row(z[r], prob_target[r], grad_scale[r // rows_per_model],
                                         keep, eps, uniform, out[r])
        elif index_target[r] == ignore_index:
            out[r, :] = 0
            row_loss[r] = 0.0
        else:
            row_loss[r] = _index_xent_row(z[r], index_target[r],
                                          grad_scale[r // rows_per_model], keep, eps, uniform,
                                          out[r])


rows_serial, rows_parallel = cpu_kernel_pair(rows_kernel)


def tiles_kernel(z, index_target, prob_target, grad_scale, rows_per_model, smoothing,
                 ignore_index, mode, n_workers, out, loss):
    """z, out, prob_target: (rows, C, inner) with inner > 1; index_target, loss: (rows, inner).

    Work items are (row, tile of TILE positions); each of ``n_workers`` takes a contiguous
    share and keeps one scratch block (per-position max bits, sums, labels) for all of them.
    """
    n_rows, n_classes, inner = z.shape
    n_tiles = (inner + TILE - 1) // TILE
    n_items = n_rows * n_tiles
    keep, eps, uniform = smoothing[0], smoothing[1], smoothing[2]
    for worker in prange(n_workers):
        top, total, label_gap, target_dot_z, target_sum, z_sum, scale, offset = (
            np.empty((8, TILE), z.dtype))
        top_bits = ordered_bits_empty(TILE, z[0, 0, 0])
        labels = np.empty(TILE, np.int64)
        for item in range(worker * n_items // n_workers, (worker + 1) * n_items // n_workers):
            r, tile = item // n_tiles, item % n_tiles
            lo = tile * TILE
            n = min(TILE, inner - lo)
            zr, outr = z[r], out[r]
            w = grad_scale[r // rows_per_model]
            # pass A: per-position max, and what the loss needs of z
            for j in range(n):
                top_bits[j] = ordered_bits(zr[0, lo + j])
                total[j] = 0
                target_dot_z[j] = 0
                target_sum[j] = 0
                z_sum[j] = 0
            for c in range(n_classes):
                zc = zr[c, lo:lo + n]
                # an integer max: a float select here becomes a masked store (slow on AMD)
                for j in range(n):
                    top_bits[j] = max(top_bits[j], ordered_bits(zc[j]))
            for j in range(n):
                top[j] = from_ordered_bits(top_bits[j], zr[0, 0])
            if mode == XENT_INDEX:
                for j in range(n):
                    labels[j] = index_target[r, lo + j]
                    ignored = labels[j] == ignore_index
                    label_gap[j] = 0 if ignored else top[j] - zr[labels[j], lo + j]
            elif mode == XENT_PROB:
                for c in range(n_classes):
                    zc, tc = zr[c, lo:lo + n], prob_target[r, c, lo:lo + n]
                    for j in range(n):
                        target_dot_z[j] += tc[j] * (zc[j] - top[j])
                        target_sum[j] += tc[j]
            if eps != 0:
                for c in range(n_classes):
                    zc = zr[c, lo:lo + n]
                    for j in range(n):
                        z_sum[j] += zc[j] - top[j]
            # pass B: e = exp(z - max) (into out unless log-softmax), and its sum
            for c in range(n_classes):
                zc, oc = zr[c, lo:lo + n], outr[c, lo:lo + n]
                if mode == LOG_SOFTMAX:
                    for j in range(n):
                        total[j] += exp_fast(zc[j] - top[j])
                else:
                    for j in range(n):
                        e = exp_fast(zc[j] - top[j])
                        oc[j] = e
                        total[j] += e
            # pass C
            if mode == LOG_SOFTMAX:
                for j in range(n):
                    total[j] = np.log(total[j])
                for c in range(n_classes):
                    _shift_tile(zr[c, lo:lo + n], top, total, outr[c, lo:lo + n])
            elif mode == SOFTMAX:
                for j in range(n):
                    total[j] = 1 / total[j]
                for c in range(n_classes):
                    oc = outr[c, lo:lo + n]
                    for j in range(n):
                        oc[j] *= total[j]
            elif mode == XENT_INDEX:
                for j in range(n):
                    log_total = math.log(np.float64(total[j]))
                    if labels[j] == ignore_index:
                        loss[r, lo + j] = 0.0
                        scale[j] = offset[j] = 0
                    else:
                        loss[r, lo + j] = (keep * (log_total + label_gap[j])
                                           + eps * (log_total - z_sum[j] / n_classes))
                        scale[j] = w / total[j]
                        offset[j] = w * uniform
                for c in range(n_classes):
                    oc = outr[c, lo:lo + n]
                    for j in range(n):
                        oc[j] = oc[j] * scale[j] - offset[j]
                for j in range(n):
                    if labels[j] != ignore_index:
                        outr[labels[j], lo + j] -= w * keep
            else:
                for j in range(n):
                    mass = keep * target_sum[j] + eps
                    log_total = math.log(np.float64(total[j]))
                    loss[r, lo + j] = (np.float64(mass) * log_total
                                       - np.float64(keep) * target_dot_z[j]
                                       - np.float64(uniform) * z_sum[j])
                    scale[j] = w * mass / total[j]
                keep_w, offset_w = w * keep, w * uniform
                for c in range(n_classes):
                    oc, tc = outr[c, lo:lo + n], prob_target[r, c, lo:lo + n]
                    for j in range(n):
                        oc[j] = oc[j] * scale[j] - (keep_w * tc[j] + offset_w)


tiles_serial, tiles_parallel = cpu_kernel_pair(tiles_kernel)


@njit(**CPU_OPTIONS)
def label_counts(labels, n_classes, ignore_index, counts):
    """Per model (row of ``labels``, shape (K, m)): counts[k] = labels not ignored. Returns the
    first label out of [0, n_classes) that is not ``ignore_index``, or ``ignore_index``."""
    for k in range(labels.shape[0]):
        row = labels[k]
        n = 0
        bad = 0
        for i in range(row.shape[0]):
            label = row[i]
            ignored = label == ignore_index
            n += not ignored
            bad += (not ignored) and (label < 0 or label >= n_classes)
        counts[k] = n
        if bad:
            for i in range(row.shape[0]):
                if row[i] != ignore_index and (row[i] < 0 or row[i] >= n_classes):
                    return row[i]
    return ignore_index
