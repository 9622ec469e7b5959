"""mpiexec -n W: fastdl.distributed's collectives. Every rank checks its results against the
reference it can compute alone (the sum of every rank's array, drawn from a known seed) and
that all ranks hold the same bits; rank 0 prints "ok W"."""

import numpy as np
from mpi4py import MPI

from fastdl import distributed as dist

comm = dist.init()
r, world = dist.rank(), dist.world_size()
assert (r, world) == (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size())

# allreduce: the sum over ranks, the same bits everywhere
arrays = [np.random.default_rng(k).standard_normal(1001) * 10.0 ** k for k in range(world)]
mine = arrays[r].copy()
dist.allreduce(mine)
np.testing.assert_allclose(mine, np.sum(arrays, axis=0), rtol=1e-12)
everyone = np.empty((world, mine.size))
MPI.COMM_WORLD.Allgather(mine, everyone)
assert all(np.array_equal(row, everyone[0]) for row in everyone), "ranks differ in their bits"

# broadcast_parameters: rank 0's values everywhere
params = [np.full((3, 2), float(r), np.float32), np.full(5, 10.0 + r, np.float32)]
dist.broadcast_parameters(params)
assert np.all(params[0] == 0) and np.all(params[1] == 10)

# the global denominator: rows across ranks
assert dist.global_denominator(r + 1) == world * (world + 1) / 2

# rank_rows: this rank's share of a batch
lo, hi = dist.rank_rows(10)
assert (lo, hi) == (r * 10 // world, (r + 1) * 10 // world)

dist.print0(f"ok {world}")
