"""mpiexec -n W: batch_norm_forward / backward with comm= (and nn.BatchNorm(sync=True)) on each
rank's rows of a global batch equal one process's batch norm on the whole batch (every rank
computes that reference itself, from the same seed). Argument: the global batch size (a rank
may get none). Rank 0 prints "ok"."""

import sys

import numpy as np

from fastdl import batch_norm_backward, batch_norm_forward, nn
from fastdl import distributed as dist

import reference as ref

comm = dist.init()
n_rows = int(sys.argv[1])
lo, hi = dist.rank_rows(n_rows)
rng = np.random.default_rng(7)
for dtype, shape, axis in [(np.float64, (n_rows, 5), 1), (np.float64, (n_rows, 3, 4, 2), 1),
                           (np.float32, (n_rows, 6), -1)]:
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    x = (rng.standard_normal(shape) * 3 + 1e2).astype(dtype)  # a mean large against the spread
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    gamma = rng.uniform(0.5, 2, channels).astype(dtype)
    beta = rng.standard_normal(channels).astype(dtype)
    stats = [np.zeros(channels, dtype), np.ones(channels, dtype)]
    want_stats = [s.astype(np.float64) for s in stats]
    for _ in range(2):
        want_y, *want_stats, saved = ref.batch_norm_forward(x, gamma, beta, *want_stats,
                                                           channel_axis=axis)
    want_dx, want_dgamma, want_dbeta = ref.batch_norm_backward(dy, saved)
    for _ in range(2):  # twice: the second shift is the running mean the first step left
        y, cache = batch_norm_forward(np.ascontiguousarray(x[lo:hi]), gamma, beta, *stats,
                                      channel_axis=axis, comm=comm)
    np.testing.assert_allclose(y, want_y[lo:hi], **tol)
    dx, dgamma, dbeta = batch_norm_backward(np.ascontiguousarray(dy[lo:hi]), cache)
    # dx is a difference of O(1) terms (exactly 0 for m = 2, but for eps): atol at dy's scale
    np.testing.assert_allclose(dx, want_dx[lo:hi], **{**tol, "atol": max(tol["atol"], 1e-9)})
    grads = np.stack([dgamma, dbeta]).astype(np.float64)  # each rank's share; summed: whole
    dist.allreduce(grads)
    np.testing.assert_allclose(grads[0], want_dgamma, **{**tol, "atol": 1e-4})
    np.testing.assert_allclose(grads[1], want_dbeta, **{**tol, "atol": 1e-4})
    for got, want in zip(stats, want_stats):
        np.testing.assert_allclose(got, want, **tol)
    # the running statistics: the same bits on every rank
    gathered = comm.comm.allgather([s.tobytes() for s in stats])
    assert all(g == gathered[0] for g in gathered), "running statistics differ between ranks"

# the layer: sync=True, against one process's layer on the whole batch
x = rng.standard_normal((n_rows, 4))
layer, alone = nn.BatchNorm(4, dtype=np.float64, sync=True), nn.BatchNorm(4, dtype=np.float64)
y, want = layer.forward(np.ascontiguousarray(x[lo:hi])), alone.forward(x)
np.testing.assert_allclose(y, want[lo:hi], rtol=1e-9, atol=1e-11)
np.testing.assert_allclose(layer.running_var, alone.running_var, rtol=1e-12)
dist.print0("ok")
