"""Data-parallel training over MPI (issue 16): epochs of the 784-1024-1024-10 network (batch
256, 8192 synthetic examples, Adam, the demo's blocks with synchronized batch norm) on one
process, or on the ranks of ``mpiexec -n W``; prints one JSON line (rank 0): the median epoch,
the gradient allreduce's share of it, and the bytes each rank sends per step.

    python benchmarks/data_parallel.py                                # 1 process x 2 threads
    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \\
        mpiexec -n 2 python benchmarks/data_parallel.py               # 2 processes x 1 thread
    python benchmarks/data_parallel.py --smoke                        # a few steps, small
"""

import argparse
import json
import os
import time

import numpy as np

from fastdl import distributed, nn, training


class TimedComm:
    """A communicator that adds up the time its allreduces take (and their bytes)."""

    def __init__(self, comm):
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.seconds, self.bytes, self.calls = 0.0, 0, 0

    def allreduce(self, array):
        start = time.perf_counter()
        self.comm.allreduce(array)
        self.seconds += time.perf_counter() - start
        self.bytes += array.nbytes
        self.calls += 1
        return array

    def barrier(self):
        self.comm.barrier()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a small network, one epoch")
    args = parser.parse_args()
    sizes, n_examples, batch = ((784, 1024, 1024, 10), 8192, 256) if not args.smoke \
        else ((64, 32, 32, 10), 512, 64)
    epochs = 1 if args.smoke else args.epochs
    mpi = "PMI_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ
    comm = TimedComm(distributed.init()) if mpi else None
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n_examples + 256, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], n_examples + 256)
    splits = (X[:n_examples], y[:n_examples]), (X[n_examples:], y[n_examples:]), (X[:1], y[:1])
    model = training.build_network(sizes[0], sizes[1:-1], sizes[-1], seed=0,
                                   sync_batchnorm=comm is not None)
    for layer in model.layers:  # batch norm's allreduces are timed too
        if isinstance(layer, nn.BatchNorm):
            layer.comm = comm
    n_params = model.flat_params.size
    training.train(model, splits, 1, hyper={"lr": 1e-3}, batch_size=batch, patience=99,
                   comm=comm)  # compile and warm up
    if comm is not None:
        comm.seconds = comm.bytes = comm.calls = 0
        comm.barrier()
    history = training.train(model, splits, epochs, hyper={"lr": 1e-3}, batch_size=batch,
                             patience=99, comm=comm)
    steps = -(-n_examples // batch) * epochs
    epoch = float(np.median(history.epoch_seconds))
    report = {"world": 1 if comm is None else comm.size, "epoch_seconds": epoch,
              "params": int(n_params), "steps_per_epoch": steps // epochs,
              "numba_threads": int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count()))}
    if comm is not None:
        # every allreduce: the gradients, batch norm's sums, the epoch's loss
        report.update(allreduce_share=comm.seconds / sum(history.epoch_seconds),
                      allreduce_bytes_per_step=comm.bytes / steps,
                      gradient_bytes_per_step=int(n_params) * 4)
    if comm is None or comm.rank == 0:
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
