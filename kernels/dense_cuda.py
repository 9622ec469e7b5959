"""Dense-layer kernels for CUDA GPUs: the matrix product (used when CuPy, hence cuBLAS, is not
installed), bias, ReLU and tanh. ``fastdl/_dense.py`` is their CPU side (NumPy and BLAS).

* ``matmul_cuda``: out = op(a) @ op(b) by TILE x TILE tiles in shared memory (TILE = 16 on a
  GPU, 256 threads a block; 5 in the simulator). A block computes one tile of out at a time
  (grid-stride over tiles); each step loads one tile of op(a) and one of op(b), each thread
  one element, with neighbouring threads on neighbouring addresses whether or not the operand
  is transposed (coalesced), then accumulates TILE products from shared memory.
* ``add_bias_cuda``, ``activation_cuda``, ``activation_backward_cuda``, ``scale_cuda``:
  grid-stride elementwise passes.
* ``column_sums_cuda``: the bias gradient of batch-first dy (N, F): a thread per feature,
  neighbouring threads on neighbouring columns of each row; the notes' layout (F, m) sums rows
  with ``sum_per_model_cuda`` (a block per row, shared-memory tree).

Constants come in the arrays' dtype (``zero``, ``one``, ``alpha`` arguments), so float32
kernels run no float64 instruction.
"""

import math

import numpy as np
from numba import types
from numba.np.numpy_support import from_dtype

from .cudalib import THREADS_PER_BLOCK, array, as_cuda_array, cuda, kernel, launch
from .softmax_cuda import sum_per_model

DTYPES = (np.float32, np.float64)
I64 = types.int64
TILE = math.isqrt(THREADS_PER_BLOCK)
RELU, TANH = 0, 1


def _scalar(dtype):
    return from_dtype(np.dtype(dtype))


@kernel([(array(d, 3), array(d, 3), I64, I64, _scalar(d), array(d, 3)) for d in DTYPES])
def matmul_cuda(a, b, transpose_a, transpose_b, alpha, out):
    """out[i] (M, N) = alpha * op(a[i]) (M, K) @ op(b[i]) (K, N) for each of the B matrices of
    out; an operand with a leading axis of 1 is shared by all (a population's shared batch)."""
    tile_a = cuda.shared.array((TILE, TILE), a.dtype)  # tile_a[r, k] = op(a)[row0 + r, k0 + k]
    tile_b = cuda.shared.array((TILE, TILE), a.dtype)  # tile_b[k, c] = op(b)[k0 + k, col0 + c]
    tid = cuda.threadIdx.x
    ty, tx = tid // TILE, tid % TILE
    active = tid < TILE * TILE
    n_batch, n_rows, n_cols = out.shape
    depth = a.shape[1] if transpose_a else a.shape[2]
    zero = alpha - alpha
    tiles_c = (n_cols + TILE - 1) // TILE
    tiles = ((n_rows + TILE - 1) // TILE) * tiles_c
    for t in range(cuda.blockIdx.x, n_batch * tiles, cuda.gridDim.x):
        i, t_in = t // tiles, t % tiles
        ia, ib = (i if a.shape[0] > 1 else 0), (i if b.shape[0] > 1 else 0)
        row0, col0 = (t_in // tiles_c) * TILE, (t_in % tiles_c) * TILE
        acc = zero
        for k0 in range(0, depth, TILE):
            if active:
                # thread (ty, tx) reads the element tx along the operand's contiguous axis
                if transpose_a:  # a[i] (K, M): op(a)[r, k] = a[i, k, r]
                    k, r = k0 + ty, row0 + tx
                    tile_a[tx, ty] = a[ia, k, r] if k < depth and r < n_rows else zero
                else:
                    r, k = row0 + ty, k0 + tx
                    tile_a[ty, tx] = a[ia, r, k] if r < n_rows and k < depth else zero
                if transpose_b:  # b[i] (N, K): op(b)[k, c] = b[i, c, k]
                    c, k = col0 + ty, k0 + tx
                    tile_b[tx, ty] = b[ib, c, k] if c < n_cols and k < depth else zero
                else:
                    k, c = k0 + ty, col0 + tx
                    tile_b[ty, tx] = b[ib, k, c] if k < depth and c < n_cols else zero
            cuda.syncthreads()
            if active:
                for kk in range(TILE):
                    acc += tile_a[ty, kk] * tile_b[kk, tx]
            cuda.syncthreads()
        row, col = row0 + ty, col0 + tx
        if active and row < n_rows and col < n_cols:
            out[i, row, col] = alpha * acc


@kernel([(array(d), array(d), I64, I64, I64) for d in DTYPES])
def add_bias_cuda(y, bias, n_features, inner, per_model):
    """y += bias[k, f] with y flat: element i is of model k = i // per_model and feature
    f = (i // inner) % n_features; bias flat (K * n_features)."""
    for i in range(cuda.grid(1), y.shape[0], cuda.gridsize(1)):
        y[i] += bias[(i // per_model) * n_features + (i // inner) % n_features]


@kernel([(array(d, 3), array(d)) for d in DTYPES])
def column_sums_cuda(dy, out):
    """out[k * F + f] = sum over rows of dy[k, :, f], for dy (K, N, F)."""
    n_models, n_rows, n_cols = dy.shape
    for item in range(cuda.grid(1), n_models * n_cols, cuda.gridsize(1)):
        k, f = item // n_cols, item % n_cols
        total = dy[k, 0, f]
        for r in range(1, n_rows):
            total += dy[k, r, f]
        out[item] = total


@kernel([(array(d), I64, _scalar(d), array(d)) for d in DTYPES])
def activation_cuda(x, kind, zero, y):
    """ReLU: y = max(x, 0) (NaN stays NaN); TANH: y = tanh(x)."""
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        v = x[i]
        if kind == RELU:
            y[i] = zero if v <= zero else v
        else:
            y[i] = math.tanh(v)


@kernel([(array(d), array(d), I64, _scalar(d), _scalar(d), array(d)) for d in DTYPES])
def activation_backward_cuda(dy, saved, kind, zero, one, dx):
    """ReLU (saved = x): dx = dy * (x > 0); TANH (saved = y): dx = dy * (1 - y**2)."""
    for i in range(cuda.grid(1), dy.shape[0], cuda.gridsize(1)):
        s = saved[i]
        if kind == RELU:
            dx[i] = dy[i] if s > zero else dy[i] * zero
        else:
            dx[i] = dy[i] * (one - s * s)


@kernel([(array(d), _scalar(d)) for d in DTYPES])
def scale_cuda(a, factor):
    """a *= factor."""
    for i in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        a[i] *= factor


# -- launchers (checked by fastdl.nn; the elementwise ones take flat device arrays) ----------


def _items(size):
    return -(-size // THREADS_PER_BLOCK)


def _batched(a):
    """``a`` as (B, rows, cols): a 2-D matrix becomes a batch of one."""
    a = as_cuda_array(a)
    return a.reshape((1,) + tuple(a.shape)) if len(a.shape) == 2 else a


def matmul(a, b, out, transpose_a, transpose_b):
    """out = op(a) @ op(b) on 2-D or (K, ., .) device arrays (a 2-D operand shared)."""
    out = _batched(out)
    n_tiles = out.shape[0] * -(-out.shape[1] // TILE) * -(-out.shape[2] // TILE)
    launch(matmul_cuda, n_tiles, _batched(a), _batched(b), int(transpose_a), int(transpose_b),
           out.dtype.type(1), out)


def add_bias(y, bias, n_features, inner, per_model):
    """y += bias, flat: element i of y takes bias[(i // per_model) * n_features + (i // inner)
    % n_features] (:func:`add_bias_cuda`)."""
    launch(add_bias_cuda, _items(y.shape[0]), y, bias, n_features, inner, per_model)


def column_sums(dy, out):
    """out (flat K * F) = the column sums of dy (N, F) or (K, N, F)."""
    dy = _batched(dy)
    launch(column_sums_cuda, _items(dy.shape[0] * dy.shape[2]), dy, out)


def row_sums(dy, ones, out):
    """out (flat, R) = the sums of the R rows of flat dy, the notes' layout (.., F, m):
    ``sum_per_model`` with a scale ``ones`` of R ones (a block per row)."""
    sum_per_model(dy, out.shape[0], ones, out)


def activation(kind, x, out):
    launch(activation_cuda, _items(x.shape[0]), x, RELU if kind == "relu" else TANH,
           x.dtype.type(0), out)


def activation_backward(kind, dy, saved, out):
    launch(activation_backward_cuda, _items(dy.shape[0]), dy, saved,
           RELU if kind == "relu" else TANH, dy.dtype.type(0), dy.dtype.type(1), out)


def scale(a, factor):
    launch(scale_cuda, _items(a.shape[0]), a, a.dtype.type(factor))
