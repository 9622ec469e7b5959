"""The data-parallel tests' run: a small float64 network trained by fastdl.training.train on
synthetic data, alone or as one rank of ``comm``."""

import numpy as np

from fastdl import training


def splits(n_examples, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_examples + 40, 12)) * 3 + 1
    y = (X[:, :4].sum(axis=1) > 4).astype(np.int64) + (X[:, 4] > 1)
    return (X[:n_examples], y[:n_examples]), (X[n_examples:], y[n_examples:]), (X[:1], y[:1])


def run(n_examples, comm=None, checkpoint=None, progress=None, epochs=6):
    model = training.build_network(12, (16, 8), 3, dropout=0.2, seed=3, dtype=np.float64,
                                   sync_batchnorm=comm is not None)
    history = training.train(model, splits(n_examples), epochs, "adam", {"lr": 1e-2},
                             batch_size=16, seed=1, patience=3, comm=comm,
                             checkpoint=checkpoint, progress=progress)
    return history, model
