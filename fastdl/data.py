"""Data handling for training, as the notes teach it: seeded shuffling into mini-batches (the
last, smaller batch kept), a train / dev / test split, and input normalization fitted on the
training split only; :func:`load_digits` gives scikit-learn's digits prepared that way.

``axis`` is the examples axis of ``X``: 0 for batch-first (m, n_x), 1 for the notes'
(n_x, m). Labels ``Y`` of rank 1 are indexed along their only axis, others along ``axis``.
"""

import numpy as np

from . import _validate


def _take(a, index, axis):
    return None if a is None else np.take(a, index, axis=0 if a.ndim == 1 else axis)


def minibatches(X, Y=None, batch_size=64, seed=None, axis=0, shuffle=True, rank=None,
                world=None):
    """Yield ``(X_batch, Y_batch)`` covering every example once: a seeded permutation cut into
    batches of ``batch_size``, the last one smaller when m is not a multiple. Batches are
    C-contiguous copies (``Y_batch`` None without Y).

    Data-parallel training (``fastdl.distributed``): with ``rank`` and ``world`` each global
    batch (the same permutation on every rank) is split in rank order and this yields rank
    ``rank``'s rows of it, ``floor(rank * b / world)`` to ``floor((rank + 1) * b / world)``
    (:func:`fastdl.distributed.rank_rows`; a rank may get none); ``rank=0, world=1`` yields
    the whole batches."""
    m = _validate.examples(X, Y, axis)
    batch_size = _validate.integer(batch_size, "batch_size", minimum=1)
    shuffle = _validate.flag(shuffle, "shuffle")
    if (rank is None) != (world is None):
        raise ValueError("rank and world go together: give both or neither")
    if world is not None:
        world = _validate.integer(world, "world", minimum=1)
        rank = _validate.integer(rank, "rank", minimum=0)
        if rank >= world:
            raise ValueError(f"rank must be in [0, {world}) for world={world}; got {rank}")
    order = np.random.default_rng(seed).permutation(m) if shuffle else np.arange(m)
    for start in range(0, m, batch_size):
        index = order[start:start + batch_size]
        if world is not None:  # this rank's rows of the global batch
            index = index[rank * len(index) // world:(rank + 1) * len(index) // world]
        yield np.ascontiguousarray(_take(X, index, axis)), \
            (None if Y is None else np.ascontiguousarray(_take(Y, index, axis)))


def train_dev_test_split(X, Y, fractions=(0.8, 0.1, 0.1), seed=0, axis=0):
    """Shuffle (seeded) and split into ``((X_train, Y_train), (X_dev, Y_dev), (X_test,
    Y_test))`` by ``fractions`` (summing to 1; the test part takes what rounding leaves)."""
    m = _validate.examples(X, Y, axis)
    if isinstance(fractions, (str, bytes)) or np.ndim(fractions) != 1:
        raise TypeError(f"fractions must be three numbers; got {_validate.describe(fractions)}")
    fractions = np.array([_validate.number(f, f"fractions[{i}]") for i, f in enumerate(fractions)])
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1):
        raise ValueError(f"fractions must be three numbers >= 0 summing to 1; got "
                         f"{fractions.tolist()}")
    order = np.random.default_rng(seed).permutation(m)
    n_train, n_dev = int(round(fractions[0] * m)), int(round(fractions[1] * m))
    parts = np.split(order, [n_train, n_train + n_dev])
    return tuple((np.ascontiguousarray(_take(X, p, axis)),
                  np.ascontiguousarray(_take(Y, p, axis))) for p in parts)


class Standardizer:
    """Input normalization: ``fit`` on the training split takes each feature's mean and
    standard deviation over the examples; ``transform`` applies ``(X - mean) / std`` to any
    split with the *training* statistics (features with no spread are only centered).

    ``axis``: the examples axis (0 or 1); features with std <= ``eps`` are only centered.
    """

    def __init__(self, axis=0, eps=1e-8):
        self.axis = _validate.option(_validate.integer(axis, "axis"), "axis", (0, 1))
        self.eps = _validate.number(eps, "eps", _validate.finite_nonnegative)
        self.mean = self.std = None

    def fit(self, X):
        _validate.examples(X, None, self.axis)
        if X.dtype.kind not in "iuf":
            raise TypeError(f"X must hold real numbers (integer or float dtype); got dtype "
                            f"{X.dtype}")
        self.mean = X.mean(axis=self.axis, keepdims=True)
        std = X.std(axis=self.axis, keepdims=True)
        self.std = np.where(std > self.eps, std, 1.0)
        return self

    def transform(self, X, dtype=None):
        """``(X - mean) / std`` as a new C-contiguous array of ``dtype`` (float32 or float64;
        None: X's float dtype, float64 for integer X: never truncated back to integers). X
        must have the fitted features (never broadcast)."""
        if self.mean is None:
            raise ValueError("transform needs fit (on the training split) first")
        _validate.features_like(X, self.mean, self.axis)
        if dtype is not None:
            dtype = _validate.float_dtype(dtype, "dtype")
        elif X.dtype.kind == "f":
            dtype = X.dtype
        else:
            dtype = np.dtype(np.float64)
        out = (X - self.mean) / self.std
        return np.ascontiguousarray(out, dtype=dtype)

    def fit_transform(self, X, dtype=None):
        return self.fit(X).transform(X, dtype)


def load_digits(seed=0, dtype=np.float32):
    """scikit-learn's 8x8 handwritten digits (1797 images shipped with scikit-learn: no
    download), split 70 / 15 / 15 with :func:`train_dev_test_split` (seeded) and standardized
    with the training split's statistics (:class:`Standardizer`).

    Returns ``((X_train, y_train), (X_dev, y_dev), (X_test, y_test))``: X (m, 64) of ``dtype``,
    y (m,) int64 labels 0-9; m = 1258, 270, 269. Needs scikit-learn (the ``demo`` extra)::

        (X_train, y_train), dev, test = fd.data.load_digits(seed=0)
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    splits = train_dev_test_split(digits.data, digits.target.astype(np.int64),
                                  (0.7, 0.15, 0.15), seed=seed)
    scaler = Standardizer().fit(splits[0][0])
    return tuple((scaler.transform(X, dtype), y) for X, y in splits)
