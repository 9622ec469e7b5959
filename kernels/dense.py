"""A population's matrix products on the CPU, and one model's small ones: ``out[k] =
op(a[k]) @ op(b[k])`` for K models at once on numba's threads. ``fastdl/_dense.py`` sends every
product of up to ``OWN_PRODUCT_MAX_MACS`` multiply-adds per model here (larger ones to NumPy,
hence BLAS); ``kernels/dense_cuda.py`` is the GPU's.

Why not NumPy: ``np.matmul`` on (K, ., .) stacks loops over the K matrices, one BLAS call
each, and OpenBLAS splits each small product over its threads: on the demo network's products
(64-256 rows and columns) that ran at 50-130 GFLOPS on 2 cores, and its threads, spinning
after each call, slowed the fastdl kernels that followed (fastdl.device.cpu_threads). Here the
K products are split across numba's threads, blocks of rows of one model per work item, each
a plain loop on one core (90-100 GFLOPS, as one BLAS thread): 115-185 GFLOPS on 2 cores, and
no second thread pool.

The loop (``_rows``): out = A @ B with B's rows contiguous, 4 rows of out at a time, the
reduction 4 terms at a time::

    out[i, :] += (A[i, p] * B[p, :] + A[i, p+1] * B[p+1, :])
                 + (A[i, p+2] * B[p+2, :] + A[i, p+3] * B[p+3, :])

Its innermost loop runs along a row of out and of B (vectorized); each B row loaded serves 4
rows of out and each out row loaded takes 4 terms, which keeps the core's multipliers rather
than its loads busy. The A[i, p] are single values read outside that loop, so a transposed A
(``dW = dy.T @ x``) is read in place. A transposed B (``x @ W.T``, a batch-first Linear's
forward) is first copied transposed (``_transpose``: 8 rows of W at a time, each row of W.T
written 8 values at a time), a pass over W that costs 5-15 % of the product.

Every element is the same sum in the same order whatever the row blocks, the number of models
and of threads, compiled without reassociation or FMA contraction
(``config.FASTMATH_REPRODUCIBLE``): the same bits cold and cached, serial and parallel, and for
model k of a population and the same model alone. Without contraction the multiplications and
additions run on the cores' separate ports for each (Zen 4: no slower than FMAs here).
"""

import threading

import numpy as np
from numba import njit, prange

from . import config
from .config import FASTMATH_REPRODUCIBLE, cpu_kernel_pair

# Below this many multiply-adds (K * M * N * P) a product runs the serial kernel: a parallel
# launch costs a few microseconds, the work of ~2**18 multiply-adds.
PARALLEL_MIN_MACS = 1 << 18


@njit(inline="always")
def _at(a, i, p, transposed):
    """op(a)[i, p]: a[p, i] when ``transposed`` (a transposed operand read in place)."""
    return a[p, i] if transposed else a[i, p]


@njit(fastmath=FASTMATH_REPRODUCIBLE, error_model="numpy", cache=config.CACHE)
def _rows(a, transposed, b, c, i0, i1):
    """c[i0:i1] = op(a)[i0:i1] @ b (op(a) (M, P): a, or a.T with ``transposed``; a, b (P, N),
    c (M, N) C-contiguous). One compiled loop for both: the values of a are read outside the
    innermost loop, where the test costs nothing (two specializations took 2.2 s to compile).

    A function of its own, not inlined into the ``prange`` loop of :func:`_products`: inlined,
    its loops compiled to code that ran at 50-60 % of this one's speed on each thread."""
    n_p, n = b.shape[0], c.shape[1]
    p_end = n_p - n_p % 4
    i = i0
    while i + 4 <= i1:  # 1. four rows of c at a time
        c0, c1, c2, c3 = c[i], c[i + 1], c[i + 2], c[i + 3]
        for j in range(n):
            c0[j] = 0
            c1[j] = 0
            c2[j] = 0
            c3[j] = 0
        for p in range(0, p_end, 4):
            b0, b1, b2, b3 = b[p], b[p + 1], b[p + 2], b[p + 3]
            a00, a01 = _at(a, i, p, transposed), _at(a, i, p + 1, transposed)
            a02, a03 = _at(a, i, p + 2, transposed), _at(a, i, p + 3, transposed)
            a10, a11 = _at(a, i + 1, p, transposed), _at(a, i + 1, p + 1, transposed)
            a12, a13 = _at(a, i + 1, p + 2, transposed), _at(a, i + 1, p + 3, transposed)
            a20, a21 = _at(a, i + 2, p, transposed), _at(a, i + 2, p + 1, transposed)
            a22, a23 = _at(a, i + 2, p + 2, transposed), _at(a, i + 2, p + 3, transposed)
            a30, a31 = _at(a, i + 3, p, transposed), _at(a, i + 3, p + 1, transposed)
            a32, a33 = _at(a, i + 3, p + 2, transposed), _at(a, i + 3, p + 3, transposed)
            for j in range(n):
                x0, x1, x2, x3 = b0[j], b1[j], b2[j], b3[j]
                c0[j] += (a00 * x0 + a01 * x1) + (a02 * x2 + a03 * x3)
                c1[j] += (a10 * x0 + a11 * x1) + (a12 * x2 + a13 * x3)
                c2[j] += (a20 * x0 + a21 * x1) + (a22 * x2 + a23 * x3)
                c3[j] += (a30 * x0 + a31 * x1) + (a32 * x2 + a33 * x3)
        for p in range(p_end, n_p):  # the reduction's last P % 4 terms
            bp = b[p]
            a0, a1 = _at(a, i, p, transposed), _at(a, i + 1, p, transposed)
            a2, a3 = _at(a, i + 2, p, transposed), _at(a, i + 3, p, transposed)
            for j in range(n):
                x0 = bp[j]
                c0[j] += a0 * x0
                c1[j] += a1 * x0
                c2[j] += a2 * x0
                c3[j] += a3 * x0
        i += 4
    while i < i1:  # 2. the last rows, one at a time: the same sums in the same order
        c0 = c[i]
        for j in range(n):
            c0[j] = 0
        for p in range(0, p_end, 4):
            b0, b1, b2, b3 = b[p], b[p + 1], b[p + 2], b[p + 3]
            a00, a01 = _at(a, i, p, transposed), _at(a, i, p + 1, transposed)
            a02, a03 = _at(a, i, p + 2, transposed), _at(a, i, p + 3, transposed)
            for j in range(n):
                c0[j] += (a00 * b0[j] + a01 * b1[j]) + (a02 * b2[j] + a03 * b3[j])
        for p in range(p_end, n_p):
            bp, a0 = b[p], _at(a, i, p, transposed)
            for j in range(n):
                c0[j] += a0 * bp[j]
        i += 1


def _products(A, transposed, B, out, items):
    """out[k, i0:i1] = op(A[ka])[i0:i1] @ B[kb] for each item (k, i0, i1); ka = k, or 0 when
    A has one matrix for all (a population's shared batch), kb likewise; op(A[ka]) = A[ka], or
    its transpose with ``transposed``. A, B, out C-contiguous."""
    for w in prange(items.shape[0]):
        k = items[w, 0]
        _rows(A[k if A.shape[0] > 1 else 0], transposed, B[k if B.shape[0] > 1 else 0], out[k],
              items[w, 1], items[w, 2])


def _transpose(W, out):
    """out[k] = W[k].T for (K, R, C) -> (K, C, R), C-contiguous both: 8 rows of W per work
    item, so that each row of out is written 8 neighbouring values at a time."""
    n_rows, n_cols = W.shape[1], W.shape[2]
    blocks = (n_rows + 7) // 8
    for item in prange(W.shape[0] * blocks):
        k, r = item // blocks, (item % blocks) * 8
        w, o = W[k], out[k]
        if r + 8 <= n_rows:
            w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
            w4, w5, w6, w7 = w[r + 4], w[r + 5], w[r + 6], w[r + 7]
            for j in range(n_cols):
                oj = o[j, r:r + 8]
                oj[0], oj[1], oj[2], oj[3] = w0[j], w1[j], w2[j], w3[j]
                oj[4], oj[5], oj[6], oj[7] = w4[j], w5[j], w6[j], w7[j]
        else:
            for i in range(r, n_rows):
                wi = w[i]
                for j in range(n_cols):
                    o[j, i] = wi[j]


products_serial, products_parallel = cpu_kernel_pair(_products, fastmath=FASTMATH_REPRODUCIBLE)
transpose_serial, transpose_parallel = cpu_kernel_pair(_transpose)


def _parallel(size):
    return size >= PARALLEL_MIN_MACS and config.threads() > 1


def _items(n_models, n_rows, n_threads):
    """Work items (k, first row, end row): each model's rows in blocks of a multiple of 4,
    ~4 items per thread (load balance) or one per model when K gives that already."""
    parts = max(1, min(-(-n_rows // 4), -(-4 * n_threads // n_models)))
    bounds = (np.linspace(0, n_rows, parts + 1) // 4 * 4).astype(np.int64)
    bounds[-1] = n_rows
    return np.array([(k, lo, hi) for k in range(n_models) for lo, hi in
                     zip(bounds[:-1], bounds[1:]) if hi > lo], np.int64).reshape(-1, 3)


_ITEMS = {}
_scratch = threading.local()  # per Python thread: the kernels release the GIL


def _transposed(b):
    """b (K, R, C) transposed into a reused (K, C, R) buffer of this thread."""
    shape = (b.shape[0], b.shape[2], b.shape[1])
    buffers = _scratch.__dict__.setdefault("buffers", {})
    out = buffers.get((shape, b.dtype))
    if out is None:
        if len(buffers) > 8:  # a few shapes repeat in training; drop the rest
            buffers.clear()
        out = buffers[shape, b.dtype] = np.empty(shape, b.dtype)
    (transpose_parallel if _parallel(b.size * 8) else transpose_serial)(b, out)
    return out


def matmul(a, b, out, transpose_a=False, transpose_b=False):
    """out (K, M, N) = op(a) @ op(b) per model; a, b (K, ., .) or (., .) (shared by the K
    models), op = the transpose of the last two axes where asked. Host arrays of out's dtype,
    out C-contiguous."""
    A = np.ascontiguousarray(a if a.ndim == 3 else a[None])
    B = np.ascontiguousarray(b if b.ndim == 3 else b[None])
    if transpose_b:
        B = _transposed(B)
    n_models, n_rows, n_cols = out.shape
    parallel = _parallel(n_models * n_rows * n_cols * B.shape[1])
    n_threads = config.threads() if parallel else 1
    key = (n_models, n_rows, n_threads)
    items = _ITEMS.get(key)
    if items is None:
        if len(_ITEMS) > 64:
            _ITEMS.clear()
        items = _ITEMS[key] = _items(n_models, n_rows, n_threads)
    (products_parallel if parallel else products_serial)(A, transpose_a, B, out, items)
    return out
