"""Batch-normalization kernels for CUDA GPUs, beside ``kernels/batchnorm.py``.

Arrays are passed flat (1-D, C-contiguous) with the (K, outer, C, inner) view as four ints;
per-channel values are flat (K * C). Reductions write one partial sum per (split, model,
channel), which the host adds in float64 (it needs them anyway for the coefficients):

* ``bn_comoment_runs_cuda`` (inner > 1): a block takes one split of one channel; consecutive
  threads read consecutive elements of a run (coalesced);
* ``bn_comoment_rows_cuda`` (inner == 1): a block takes a tile of 32 channels and one split of
  the rows; the 32 lanes of a warp read 32 neighbouring channels of one row (coalesced), the
  warps of the block take different rows.

Both compute sum(u - a) and sum((u - a) * (v - b)) in the storage dtype, a block's threads'
sums merged by a shared-memory tree. Forward: u = v = x and a = b = the channel's first value
(``sample_shift``), a shifted one-pass variance: no cancellation of E[x²] - E[x]² when the mean
is large against the spread, and no float64 instruction. Backward: u = dy, a = 0, v = x,
b = mean. The elementwise kernels are grid-stride over the flat arrays, coalesced in every
layout.
"""

import numpy as np
from numba import types

from .cudalib import MAX_BLOCKS, THREADS_PER_BLOCK, array, cuda, device_function, kernel, launch

DTYPES = (np.float32, np.float64)
LANES = 32  # channels per tile of the rows kernel: one warp
I64 = types.int64


def _reduction_signatures():
    return [(array(d), array(d), array(d), array(d), I64, I64, I64, I64, I64, I64,
             array(d), array(d)) for d in DTYPES]


def _merge(sums1, sums2, tid, width, stride):
    """Tree-merge ``width`` groups of ``stride`` threads of the shared arrays into group 0."""
    while width > 0:
        if tid < width * stride:
            sums1[tid] += sums1[tid + width * stride]
            sums2[tid] += sums2[tid + width * stride]
        cuda.syncthreads()
        width //= 2


_merge = device_function(_merge)


@kernel(_reduction_signatures())
def bn_comoment_runs_cuda(u, v, a_in, b_in, n_models, outer, channels, inner, n_splits,
                          sample_shift, s1, s2):
    tid = cuda.threadIdx.x
    sums1 = cuda.shared.array(THREADS_PER_BLOCK, s1.dtype)
    sums2 = cuda.shared.array(THREADS_PER_BLOCK, s1.dtype)
    m = outer * inner
    n_channels = n_models * channels
    for item in range(cuda.blockIdx.x, n_channels * n_splits, cuda.gridDim.x):
        kc, split = item // n_splits, item % n_splits
        k, c = kc // channels, kc % channels
        if sample_shift:
            a = u[(k * outer * channels + c) * inner]
            b = a
            if split == 0 and tid == 0:
                a_in[kc] = a
        else:
            a, b = a_in[kc], b_in[kc]
        t1 = a - a
        t2 = a - a
        for e in range(split * m // n_splits + tid, (split + 1) * m // n_splits,
                       cuda.blockDim.x):
            o = e // inner
            idx = ((k * outer + o) * channels + c) * inner + e - o * inner
            du = u[idx] - a
            t1 += du
            t2 += du * (v[idx] - b)
        sums1[tid] = t1
        sums2[tid] = t2
        cuda.syncthreads()
        _merge(sums1, sums2, tid, THREADS_PER_BLOCK // 2, 1)
        if tid == 0:
            s1[split * n_channels + kc] = sums1[0]
            s2[split * n_channels + kc] = sums2[0]
        cuda.syncthreads()


@kernel(_reduction_signatures())
def bn_comoment_rows_cuda(u, v, a_in, b_in, n_models, outer, channels, inner, n_splits,
                          sample_shift, s1, s2):
    tid = cuda.threadIdx.x
    lane, row_lane = tid % LANES, tid // LANES
    rows_per_pass = cuda.blockDim.x // LANES
    sums1 = cuda.shared.array(THREADS_PER_BLOCK, s1.dtype)
    sums2 = cuda.shared.array(THREADS_PER_BLOCK, s1.dtype)
    n_tiles = (channels + LANES - 1) // LANES
    n_channels = n_models * channels
    for item in range(cuda.blockIdx.x, n_models * n_tiles * n_splits, cuda.gridDim.x):
        tile, split = item // n_splits, item % n_splits
        k, c = tile // n_tiles, (tile % n_tiles) * LANES + lane
        t1 = b_in[0] - b_in[0]  # zero in the dtype (b_in is finite: zeros or the mean)
        t2 = t1
        if c < channels:
            kc = k * channels + c
            if sample_shift:
                a = u[k * outer * channels + c]
                b = a
                if split == 0 and row_lane == 0:
                    a_in[kc] = a
            else:
                a, b = a_in[kc], b_in[kc]
            for o in range(split * outer // n_splits + row_lane,
                           (split + 1) * outer // n_splits, rows_per_pass):
                idx = (k * outer + o) * channels + c
                du = u[idx] - a
                t1 += du
                t2 += du * (v[idx] - b)
        sums1[tid] = t1
        sums2[tid] = t2
        cuda.syncthreads()
        _merge(sums1, sums2, tid, rows_per_pass // 2, LANES)
        if row_lane == 0 and c < channels:
            s1[split * n_channels + k * channels + c] = sums1[tid]
            s2[split * n_channels + k * channels + c] = sums2[tid]
        cuda.syncthreads()


@kernel([(array(d), I64, I64, I64, array(d), array(d), array(d), array(d)) for d in DTYPES])
def bn_affine_cuda(x, outer, channels, inner, mean, scale, shift, y):
    """y = (x - mean) * scale + shift, per (model, channel) coefficients."""
    per_model = outer * channels * inner
    for idx in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        kc = (idx // per_model) * channels + (idx // inner) % channels
        y[idx] = (x[idx] - mean[kc]) * scale[kc] + shift[kc]


@kernel([(array(d), array(d), I64, I64, I64, array(d), array(d), array(d), array(d),
          array(d)) for d in DTYPES])
def bn_input_grad_cuda(dy, x, outer, channels, inner, a, b, mean, c0, dx):
    """dx = a * dy + b * (x - mean) + c0, per (model, channel) coefficients."""
    per_model = outer * channels * inner
    for idx in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        kc = (idx // per_model) * channels + (idx // inner) % channels
        dx[idx] = a[kc] * dy[idx] + b[kc] * (x[idx] - mean[kc]) + c0[kc]


# -- launchers -----------------------------------------------------------------------------------


def channel_sums(u, v, a, b, view, sample_shift):
    """Per (model, channel) float64 host arrays: sum(u - a) and sum((u - a) * (v - b)).

    ``u``, ``v``: flat device arrays of the (K, outer, C, inner) ``view``; ``a``, ``b``: flat
    (K * C) device arrays of their dtype (``b`` finite). With ``sample_shift`` a = b = the first
    value of each channel, written into ``a``."""
    n_models, outer, channels, inner = view
    rows = inner == 1
    units = n_models * (-(-channels // LANES) if rows else channels)
    extent = outer if rows else outer * inner
    n_splits = max(1, min(-(-MAX_BLOCKS // units), extent // (4 * THREADS_PER_BLOCK)))
    s1 = cuda.device_array(n_splits * n_models * channels, u.dtype)
    s2 = cuda.device_array(n_splits * n_models * channels, u.dtype)
    kernel_ = bn_comoment_rows_cuda if rows else bn_comoment_runs_cuda
    launch(kernel_, units * n_splits, u, v, a, b, n_models, outer, channels, inner, n_splits,
           int(sample_shift), s1, s2)
    shape = (n_splits, n_models, channels)
    return (s1.copy_to_host().reshape(shape).astype(np.float64).sum(axis=0),
            s2.copy_to_host().reshape(shape).astype(np.float64).sum(axis=0))


def _items(size):
    return -(-size // THREADS_PER_BLOCK)


def affine(x, view, mean, scale, shift, y):
    """y = (x - mean) * scale + shift on flat device arrays; coefficients flat (K * C)."""
    launch(bn_affine_cuda, _items(x.shape[0]), x, view[1], view[2], view[3], mean, scale,
           shift, y)


def input_grad(dy, x, view, a, b, mean, c0, dx):
    """dx = a * dy + b * (x - mean) + c0 on flat device arrays; coefficients flat (K * C)."""
    launch(bn_input_grad_cuda, _items(x.shape[0]), dy, x, view[1], view[2], view[3], a, b,
           mean, c0, dx)
