"""Batch-normalization kernels for the CPU, every layout without a transposed copy.

A C-contiguous input with channel axis ``a`` is viewed, without a copy, as
(K, outer, C, inner): K models (1 without a population), ``outer`` = the product of the axes
before ``a``, ``inner`` = the product of the axes after it. Two loop orders read memory in
order:

* *runs* (``inner > 1``: (N, C, H, W), the notes' (features, examples)): the innermost loop
  runs along ``inner`` contiguous values of one channel;
* *rows* (``inner == 1``: (N, C), channels-last): each row holds every channel side by side,
  and the innermost loop runs across the channels.

Both visit memory in order, a block of rows (then of channels, then of positions) per work
item.

Work items run under ``prange`` (a serial twin below ``config.PARALLEL_MIN_SIZE`` elements or on
one thread); each writes its own partial sums, which the host adds up per channel in float64.

Two kinds of pass, shared by forward and backward:

1. reductions per channel, carried in float64, by one kernel, ``comoment``: sum(u - a) and
   sum((u - a) * (v - b)). Forward (``channel_moments``) sums x - s and (x - s)² with s one
   sample of the channel (u = v = x), which gives the mean and a variance free of the
   cancellation of E[x²] - E[x]² when the mean is large against the spread; backward
   (``channel_comoments``) sums dy and dy * (x - mean).
2. elementwise, with per-channel coefficients in the storage dtype: ``affine`` writes
   ``y = (x - mean) * scale + shift`` and ``input_grad`` writes
   ``dx = a * dy + b * (x - mean) + c``.

The mean passed to the kernels is the float of the storage dtype nearest the float64 mean; the
host folds its rounding error into ``shift`` / ``c`` (and the sums), so that x - mean keeps
full precision when the mean is large against the spread (mean 1e4, unit spread, float32).
"""

import functools
from collections import namedtuple

import numpy as np
from numba import njit, prange

from . import config
from .config import CACHE, FASTMATH_REPRODUCIBLE, MIN_CHUNK_SIZE, cpu_kernel_pair, threads

# Runs: arrays (K, outer, C, inner); items (n, 7) = (k, o0, o1, c0, c1, i0, i1), a block of
# rows, channels and positions in the run, visited in memory order. Partial sums: (n, C).
# Sums are taken in the storage dtype over at most BLOCK values, then carried in float64:
# float32 speed (no conversion per element), float64-like accuracy.
# ---------------------------------------------------------------------------------------------

BLOCK = 256

# Inner loops run over range(n) on slices: an index that numba cannot prove non-negative gets a
# wrap-around test per element, which halved the speed of these loops.


@njit(fastmath=FASTMATH_REPRODUCIBLE, error_model="numpy", cache=CACHE)
def _block_comoment(u, v, a, b):
    """(sum(u - a), sum((u - a) * (v - b))) over one block, in the storage dtype.

    The order of the additions is fixed (lane i % LANES, then the lanes pairwise) and compiled
    without reassociation: a reduction that LLVM may reassociate was vectorized differently
    when the parallel kernel was just compiled and when it was loaded from the cache (numba
    issue 10617), and the sums differed in their last bits between the two. A separate
    function (not inlined by numba) so that its instructions keep these flags."""
    zero = a - a
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = zero
    q0 = q1 = q2 = q3 = q4 = q5 = q6 = q7 = zero
    n = u.shape[0]
    i = 0
    while i + LANES <= n:
        d0, d1, d2, d3 = u[i] - a, u[i + 1] - a, u[i + 2] - a, u[i + 3] - a
        d4, d5, d6, d7 = u[i + 4] - a, u[i + 5] - a, u[i + 6] - a, u[i + 7] - a
        p0 += d0
        p1 += d1
        p2 += d2
        p3 += d3
        p4 += d4
        p5 += d5
        p6 += d6
        p7 += d7
        q0 += d0 * (v[i] - b)
        q1 += d1 * (v[i + 1] - b)
        q2 += d2 * (v[i + 2] - b)
        q3 += d3 * (v[i + 3] - b)
        q4 += d4 * (v[i + 4] - b)
        q5 += d5 * (v[i + 5] - b)
        q6 += d6 * (v[i + 6] - b)
        q7 += d7 * (v[i + 7] - b)
        i += LANES
    while i < n:
        d0 = u[i] - a
        p0 += d0
        q0 += d0 * (v[i] - b)
        i += 1
    return (((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)),
            ((q0 + q1) + (q2 + q3)) + ((q4 + q5) + (q6 + q7)))


LANES = 8


def _comoment_runs(u, v, ku, kv, items, s1, s2):
    for w in prange(items.shape[0]):
        k, o0, o1, c0, c1, i0, i1 = (items[w, 0], items[w, 1], items[w, 2], items[w, 3],
                                     items[w, 4], items[w, 5], items[w, 6])
        acc1, acc2 = s1[w], s2[w]
        acc1[:] = 0.0
        acc2[:] = 0.0
        for o in range(o0, o1):
            for c in range(c0, c1):
                ur, vr = u[k, o, c, i0:i1], v[k, o, c, i0:i1]
                a, b = ku[k, c], kv[k, c]
                for start in range(0, ur.shape[0], BLOCK):
                    t1, t2 = _block_comoment(ur[start:start + BLOCK], vr[start:start + BLOCK],
                                             a, b)
                    acc1[c] += np.float64(t1)
                    acc2[c] += np.float64(t2)


def _affine_runs(x, items, mean, scale, shift, y):
    for w in prange(items.shape[0]):
        k, o0, o1, c0, c1, i0, i1 = (items[w, 0], items[w, 1], items[w, 2], items[w, 3],
                                     items[w, 4], items[w, 5], items[w, 6])
        for o in range(o0, o1):
            for c in range(c0, c1):
                xr, yr = x[k, o, c, i0:i1], y[k, o, c, i0:i1]
                mu, s, t = mean[k, c], scale[k, c], shift[k, c]
                for i in range(xr.shape[0]):
                    yr[i] = (xr[i] - mu) * s + t


def _input_grad_runs(dy, x, items, a, b, mean, c0_, dx):
    for w in prange(items.shape[0]):
        k, o0, o1, c0, c1, i0, i1 = (items[w, 0], items[w, 1], items[w, 2], items[w, 3],
                                     items[w, 4], items[w, 5], items[w, 6])
        for o in range(o0, o1):
            for c in range(c0, c1):
                dyr, xr, dxr = dy[k, o, c, i0:i1], x[k, o, c, i0:i1], dx[k, o, c, i0:i1]
                ak, bk, mu, ck = a[k, c], b[k, c], mean[k, c], c0_[k, c]
                for i in range(xr.shape[0]):
                    dxr[i] = ak * dyr[i] + bk * (xr[i] - mu) + ck


# ---------------------------------------------------------------------------------------------
# Rows: arrays (K, outer, C) (inner == 1); items (n, 3) = (k, first row, end row). The loop
# over channels vectorizes; the float64 partial sums are updated once per 4 rows.
# ---------------------------------------------------------------------------------------------


def _comoment_rows(u, v, ku, kv, items, s1, s2):
    n_channels = u.shape[2]
    for w in prange(items.shape[0]):
        k, o, o1 = items[w, 0], items[w, 1], items[w, 2]
        acc1, acc2, a, b = s1[w], s2[w], ku[k], kv[k]
        for c in range(n_channels):
            acc1[c] = 0.0
            acc2[c] = 0.0
        while o + 8 <= o1:  # 8 rows per update of the float64 sums: a third less time than 4
            u0, u1, u2, u3 = u[k, o], u[k, o + 1], u[k, o + 2], u[k, o + 3]
            u4, u5, u6, u7 = u[k, o + 4], u[k, o + 5], u[k, o + 6], u[k, o + 7]
            v0, v1, v2, v3 = v[k, o], v[k, o + 1], v[k, o + 2], v[k, o + 3]
            v4, v5, v6, v7 = v[k, o + 4], v[k, o + 5], v[k, o + 6], v[k, o + 7]
            for c in range(n_channels):
                ac, bc = a[c], b[c]
                d0, d1, d2, d3 = u0[c] - ac, u1[c] - ac, u2[c] - ac, u3[c] - ac
                d4, d5, d6, d7 = u4[c] - ac, u5[c] - ac, u6[c] - ac, u7[c] - ac
                acc1[c] += np.float64(((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7)))
                acc2[c] += np.float64(((d0 * (v0[c] - bc) + d1 * (v1[c] - bc))
                                       + (d2 * (v2[c] - bc) + d3 * (v3[c] - bc)))
                                      + ((d4 * (v4[c] - bc) + d5 * (v5[c] - bc))
                                         + (d6 * (v6[c] - bc) + d7 * (v7[c] - bc))))
            o += 8
        while o < o1:
            u0, v0 = u[k, o], v[k, o]
            for c in range(n_channels):
                d0 = u0[c] - a[c]
                acc1[c] += np.float64(d0)
                acc2[c] += np.float64(d0 * (v0[c] - b[c]))
            o += 1


def _affine_rows(x, items, mean, scale, shift, y):
    n_channels = x.shape[2]
    for w in prange(items.shape[0]):
        k = items[w, 0]
        mu, s, t = mean[k], scale[k], shift[k]
        for o in range(items[w, 1], items[w, 2]):
            xr, yr = x[k, o], y[k, o]
            for c in range(n_channels):
                yr[c] = (xr[c] - mu[c]) * s[c] + t[c]


def _input_grad_rows(dy, x, items, a, b, mean, c0, dx):
    n_channels = x.shape[2]
    for w in prange(items.shape[0]):
        k = items[w, 0]
        ak, bk, mu, ck = a[k], b[k], mean[k], c0[k]
        for o in range(items[w, 1], items[w, 2]):
            dyr, xr, dxr = dy[k, o], x[k, o], dx[k, o]
            for c in range(n_channels):
                dxr[c] = ak[c] * dyr[c] + bk[c] * (xr[c] - mu[c]) + ck[c]


_KERNELS = {name: cpu_kernel_pair(fn) for name, fn in [
    ("comoment_runs", _comoment_runs), ("affine_runs", _affine_runs),
    ("input_grad_runs", _input_grad_runs), ("comoment_rows", _comoment_rows),
    ("affine_rows", _affine_rows), ("input_grad_rows", _input_grad_rows)]}


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------

Plan = namedtuple("Plan", "rows items parallel view_shape")


def _blocks(n, parts):
    bounds = np.linspace(0, n, max(1, min(n, parts)) + 1).astype(np.int64)
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def plan(n_models, outer, channels, inner):
    """How to run a (K, outer, C, inner) input: loop order, work items, serial or parallel.

    The rows and the runs (the axes each channel's sums run over) are cut into blocks by the
    per-model shape alone (:func:`_reduction_blocks`), never by K or the number of threads:
    each block's float64 partial sums are added in block order, so every model's statistics
    have the same bits alone, in a population, serial or parallel (a population trains model
    k as it trains alone). Then the channels are split until there are ~4 items per thread
    (load balance) or nothing left to split. Plans are cached: a training loop asks for the
    same few shapes every step."""
    parallel = config.use_parallel(n_models * outer * channels * inner)
    return _plan(n_models, outer, channels, inner, parallel, threads())


def _reduction_blocks(n, block):
    """Blocks of ``n`` rows (or run positions) of about ``block`` each, at most 8."""
    return _blocks(n, min(8, max(1, n // block)))


@functools.lru_cache(maxsize=256)
def _plan(n_models, outer, channels, inner, parallel, n_threads):
    row_blocks = _reduction_blocks(outer, 32)
    if inner == 1:
        items = [(k, o0, o1) for k in range(n_models) for o0, o1 in row_blocks]
        return Plan(True, np.array(items, np.int64), parallel, (n_models, outer, channels))
    run_blocks = _reduction_blocks(inner, MIN_CHUNK_SIZE)
    wanted = -(-4 * n_threads // n_models) if parallel else 1  # items per model
    channel_blocks = _blocks(channels, -(-wanted // (len(row_blocks) * len(run_blocks))))
    items = [(k, o0, o1, c0, c1, i0, i1) for k in range(n_models) for o0, o1 in row_blocks
             for c0, c1 in channel_blocks for i0, i1 in run_blocks]
    return Plan(False, np.array(items, np.int64), parallel, (n_models, outer, channels, inner))


def _kernel(name, p):
    serial, parallel = _KERNELS[name + ("_rows" if p.rows else "_runs")]
    return parallel if p.parallel else serial


def _per_model(s1, s2, n_models):
    """Add the work items' partial sums per model (every model has as many items, in order)."""
    return (s1.reshape(n_models, -1, s1.shape[1]).sum(axis=1),
            s2.reshape(n_models, -1, s2.shape[1]).sum(axis=1))


def channel_moments(p, x, shift):
    """Per (model, channel), float64: sum(x - shift) and sum((x - shift)**2).

    ``x``: array of ``p.view_shape``; ``shift``: (K, C) of x's dtype, one sample per channel."""
    s1 = np.empty((p.items.shape[0], shift.shape[1]))
    s2 = np.empty_like(s1)
    # sum((x - shift) * (x - shift)): the second read of x hits the cache, so the comoment
    # kernel is as fast here as a moments kernel of its own, which would compile for 0.4 s more
    _kernel("comoment", p)(x, x, shift, shift, p.items, s1, s2)
    return _per_model(s1, s2, shift.shape[0])


def channel_comoments(p, dy, x, mean):
    """Per (model, channel), float64: sum(dy) and sum(dy * (x - mean)).

    ``dy``, ``x``: arrays of ``p.view_shape``; ``mean``: (K, C) of their dtype."""
    s1 = np.empty((p.items.shape[0], mean.shape[1]))
    s2 = np.empty_like(s1)
    _kernel("comoment", p)(dy, x, np.zeros_like(mean), mean, p.items, s1, s2)
    return _per_model(s1, s2, mean.shape[0])


def affine(p, x, mean, scale, shift, y):
    """y = (x - mean) * scale + shift, per channel coefficients (K, C) of x's dtype."""
    _kernel("affine", p)(x, p.items, mean, scale, shift, y)


def input_grad(p, dy, x, a, b, mean, c0, dx):
    """dx = a * dy + b * (x - mean) + c0, per channel coefficients (K, C) of x's dtype."""
    _kernel("input_grad", p)(dy, x, p.items, a, b, mean, c0, dx)
