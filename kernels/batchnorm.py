"""Batch-normalization kernels for the CPU, every layout without a transposed copy.

A C-contiguous input with channel axis ``a`` is viewed, without a copy, as
(K, outer, C, inner): K models (1 without a population), ``outer`` = the product of the axes
before ``a``, ``inner`` = the product of the axes after it. Two loop orders read memory in
order:

* *runs* (``inner > 1``: (N, C, H, W), the notes' (features, examples)): a work item is a range
  of one channel's elements, which are runs of ``inner`` contiguous values;
* *rows* (``inner == 1``: (N, C), channels-last): a work item is a block of rows, each row
  holding every channel side by side; the loop over channels vectorizes.

Work items run under ``prange`` (a serial twin below ``PARALLEL_MIN_SIZE`` elements); each
writes its own partial sums, which the host adds up per channel in float64.

Two kinds of pass, shared by forward and backward:

1. ``comoment``: per channel, ``s1 = sum(u - ku)`` and ``s2 = sum((u - ku) * (v - kv))`` in
   float64. Forward: u = v = x shifted by one sample of its channel (ku = kv), which gives the
   mean and a variance free of the cancellation of E[x²] - E[x]² when the mean is large against
   the spread. Backward: u = dy, ku = 0, v = x, kv = mean: sum(dy) and sum(dy * (x - mean)).
2. elementwise, with per-channel coefficients in the storage dtype: ``affine`` writes
   ``y = (x - mean_hi - mean_lo) * scale + shift`` and ``input_grad`` writes
   ``dx = a * dy + b * (x - mean_hi - mean_lo) + c``. The mean is split into a float in the
   storage dtype and its rounding error, so that x - mean keeps full precision at mean 1e4.
"""

from collections import namedtuple

import numpy as np
from numba import prange

from .config import MIN_CHUNK_SIZE, PARALLEL_MIN_SIZE, cpu_kernel_pair, threads

# ---------------------------------------------------------------------------------------------
# Runs: arrays (K, outer, C, inner); items (n, 4) = (k, c, start, stop) over the channel's
# flattened (outer * inner) elements.
# ---------------------------------------------------------------------------------------------


def _comoment_runs(u, v, ku, kv, items, s1, s2):
    inner = u.shape[3]
    for w in prange(items.shape[0]):
        k, c, e, stop = items[w, 0], items[w, 1], items[w, 2], items[w, 3]
        a, b = ku[k, c], kv[k, c]
        acc1 = 0.0
        acc2 = 0.0
        while e < stop:
            o = e // inner
            i0 = e - o * inner
            i1 = min(inner, i0 + stop - e)
            ur, vr = u[k, o, c], v[k, o, c]
            for i in range(i0, i1):
                du = np.float64(ur[i]) - a
                acc1 += du
                acc2 += du * (np.float64(vr[i]) - b)
            e += i1 - i0
        s1[w] = acc1
        s2[w] = acc2


def _affine_runs(x, items, mean_hi, mean_lo, scale, shift, y):
    inner = x.shape[3]
    for w in prange(items.shape[0]):
        k, c, e, stop = items[w, 0], items[w, 1], items[w, 2], items[w, 3]
        hi, lo, s, t = mean_hi[k, c], mean_lo[k, c], scale[k, c], shift[k, c]
        while e < stop:
            o = e // inner
            i0 = e - o * inner
            i1 = min(inner, i0 + stop - e)
            xr, yr = x[k, o, c], y[k, o, c]
            for i in range(i0, i1):
                yr[i] = (xr[i] - hi - lo) * s + t
            e += i1 - i0


def _input_grad_runs(dy, x, items, a, b, mean_hi, mean_lo, c0, dx):
    inner = x.shape[3]
    for w in prange(items.shape[0]):
        k, c, e, stop = items[w, 0], items[w, 1], items[w, 2], items[w, 3]
        ak, bk, hi, lo, ck = a[k, c], b[k, c], mean_hi[k, c], mean_lo[k, c], c0[k, c]
        while e < stop:
            o = e // inner
            i0 = e - o * inner
            i1 = min(inner, i0 + stop - e)
            dyr, xr, dxr = dy[k, o, c], x[k, o, c], dx[k, o, c]
            for i in range(i0, i1):
                dxr[i] = ak * dyr[i] + bk * (xr[i] - hi - lo) + ck
            e += i1 - i0


# ---------------------------------------------------------------------------------------------
# Rows: arrays (K, outer, C); items (n, 3) = (k, first row, end row).
# ---------------------------------------------------------------------------------------------


def _comoment_rows(u, v, ku, kv, items, s1, s2):
    n_channels = u.shape[2]
    for w in prange(items.shape[0]):
        k = items[w, 0]
        acc1, acc2, a, b = s1[w], s2[w], ku[k], kv[k]
        acc1[:] = 0.0
        acc2[:] = 0.0
        for o in range(items[w, 1], items[w, 2]):
            ur, vr = u[k, o], v[k, o]
            for c in range(n_channels):
                du = np.float64(ur[c]) - a[c]
                acc1[c] += du
                acc2[c] += du * (np.float64(vr[c]) - b[c])


def _affine_rows(x, items, mean_hi, mean_lo, scale, shift, y):
    n_channels = x.shape[2]
    for w in prange(items.shape[0]):
        k = items[w, 0]
        hi, lo, s, t = mean_hi[k], mean_lo[k], scale[k], shift[k]
        for o in range(items[w, 1], items[w, 2]):
            xr, yr = x[k, o], y[k, o]
            for c in range(n_channels):
                yr[c] = (xr[c] - hi[c] - lo[c]) * s[c] + t[c]


def _input_grad_rows(dy, x, items, a, b, mean_hi, mean_lo, c0, dx):
    n_channels = x.shape[2]
    for w in prange(items.shape[0]):
        k = items[w, 0]
        ak, bk, hi, lo, ck = a[k], b[k], mean_hi[k], mean_lo[k], c0[k]
        for o in range(items[w, 1], items[w, 2]):
            dyr, xr, dxr = dy[k, o], x[k, o], dx[k, o]
            for c in range(n_channels):
                dxr[c] = ak[c] * dyr[c] + bk[c] * (xr[c] - hi[c] - lo[c]) + ck[c]


_KERNELS = {name: cpu_kernel_pair(fn) for name, fn in [
    ("comoment_runs", _comoment_runs), ("affine_runs", _affine_runs),
    ("input_grad_runs", _input_grad_runs), ("comoment_rows", _comoment_rows),
    ("affine_rows", _affine_rows), ("input_grad_rows", _input_grad_rows)]}


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------

Plan = namedtuple("Plan", "rows items parallel view_shape")


def plan(n_models, outer, channels, inner):
    """How to run a (K, outer, C, inner) input: loop order, work items, serial or parallel."""
    total = n_models * outer * channels * inner
    parallel = total >= PARALLEL_MIN_SIZE
    pieces = 4 * threads() if parallel else 1
    if inner == 1:
        blocks = max(1, min(outer, -(-pieces // n_models)))
        bounds = np.linspace(0, outer, blocks + 1).astype(np.int64)
        items = [(k, bounds[b], bounds[b + 1]) for k in range(n_models) for b in range(blocks)
                 if bounds[b + 1] > bounds[b]]
        return Plan(True, np.array(items, np.int64), parallel, (n_models, outer, channels))
    per_channel = outer * inner
    piece = max(MIN_CHUNK_SIZE, -(-total // pieces))
    items = [(k, c, start, min(per_channel, start + piece)) for k in range(n_models)
             for c in range(channels) for start in range(0, per_channel, piece)]
    return Plan(False, np.array(items, np.int64).reshape(-1, 4), parallel,
                (n_models, outer, channels, inner))


def _kernel(name, p):
    serial, parallel = _KERNELS[name + ("_rows" if p.rows else "_runs")]
    return parallel if p.parallel else serial


def channel_comoments(p, u, v, ku, kv):
    """Per (model, channel) float64: sum(u - ku) and sum((u - ku) * (v - kv)).

    ``u``, ``v``: arrays of ``p.view_shape``; ``ku``, ``kv``: float64 (K, C)."""
    n_models, channels = ku.shape
    if p.rows:
        s1 = np.empty((p.items.shape[0], channels))
        s2 = np.empty_like(s1)
        _kernel("comoment", p)(u, v, ku, kv, p.items, s1, s2)
        sum1, sum2 = np.zeros((n_models, channels)), np.zeros((n_models, channels))
        np.add.at(sum1, p.items[:, 0], s1)
        np.add.at(sum2, p.items[:, 0], s2)
        return sum1, sum2
    s1 = np.empty(p.items.shape[0])
    s2 = np.empty_like(s1)
    _kernel("comoment", p)(u, v, ku, kv, p.items, s1, s2)
    flat = p.items[:, 0] * channels + p.items[:, 1]
    size = n_models * channels
    return (np.bincount(flat, s1, size).reshape(n_models, channels),
            np.bincount(flat, s2, size).reshape(n_models, channels))


def affine(p, x, mean_hi, mean_lo, scale, shift, y):
    """y = (x - mean_hi - mean_lo) * scale + shift, per channel coefficients (K, C)."""
    _kernel("affine", p)(x, p.items, mean_hi, mean_lo, scale, shift, y)


def input_grad(p, dy, x, a, b, mean_hi, mean_lo, c0, dx):
    """dx = a * dy + b * (x - mean_hi - mean_lo) + c0, per channel coefficients (K, C)."""
    _kernel("input_grad", p)(dy, x, p.items, a, b, mean_hi, mean_lo, c0, dx)
