"""One rank of ``mpiexec -n W``: fastdl.training.train of a small float64 network (Linear -
BatchNorm(sync=True) - ReLU - Dropout blocks, softmax cross-entropy, Adam, early stopping) on
its rows of every global batch; rank 0 saves what the test compares with one process's run.
Arguments: the number of training examples (not a multiple of the batch of 16: an uneven last
batch), the output file."""

import sys

import numpy as np

from fastdl import distributed

from small_run import run

comm = distributed.init()
history, model = run(int(sys.argv[1]), comm)
if comm.rank == 0:
    np.savez(sys.argv[2], *[p for p in model.params()],
             *[s for layer in model.state_dict()["layers"] for s in layer.values()],
             losses=np.array(history.train_loss), dev=np.array(history.dev_loss))
