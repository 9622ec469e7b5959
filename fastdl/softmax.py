"""Softmax, log-softmax and fused softmax cross-entropy, along any class axis.

SPEC.md's formulas, for logits ``z`` with C classes along ``axis``::

    softmax(z)_j = exp(z_j - max z) / sum_k exp(z_k - max z)
    index target y:  L = -log softmax(z)_y            dL/dz = softmax(z) - onehot(y)
    probabilities y: L = -sum_j y_j log softmax(z)_j   dL/dz = softmax(z) * sum_j y_j - y
    label smoothing eps: y -> (1 - eps) * y + eps / C  (index targets: y = onehot)

Loss and gradient come from one fused pass per row (``kernels/softmax.py``): no probability
array is made, and ``out=logits`` writes the gradient over the logits. The class axis is any
axis (-1 for (m, C), 0 for the notes' (C, m)); inputs are C-contiguous and never copied.
"""

import numpy as np

from . import _checks
from ._arrays import c_contiguous, check_out, device_of, overlap, view_shape
from .device import require_cuda

REDUCTIONS = ("mean", "sum", "none")

# What the kernels compute (the ``mode`` of kernels/softmax.py).
SOFTMAX, LOG_SOFTMAX, XENT_INDEX, XENT_PROB = range(4)


def _check_array(a, name, population, device=None):
    """Check a float input of per-model rank >= 1; returns its device."""
    where = device_of(a)
    if device is not None and where != device:
        raise TypeError(f"{name} is on {where} but logits are on {device}: all arrays of a "
                        "call must live on one device")
    if where == "cuda":
        require_cuda()
    elif not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy or GPU array; got {_checks.describe(a)}")
    if a.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64; got {a.dtype}")
    if len(a.shape) < (2 if population else 1):
        raise ValueError(f"{name} needs a class axis{' after the model axis' * population}; "
                         f"got shape {tuple(a.shape)}")
    if not c_contiguous(a):
        raise ValueError(f"{name} must be C-contiguous (never copied); pass "
                         f"np.ascontiguousarray({name}) (or its device equivalent)")
    return where


def _class_axis(axis, rank):
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int; got {_checks.describe(axis)}")
    if not -rank <= axis < rank:
        raise ValueError(f"axis must be in [{-rank}, {rank}) for logits of rank {rank}; "
                         f"got {axis}")
    return int(axis) % rank


def _ops(device, view, dtype):
    return (_CudaOps if device == "cuda" else _CpuOps)(view, dtype)


class _CpuOps:
    """The CPU kernels on NumPy arrays viewed as (rows, C, inner)."""

    def __init__(self, view, dtype):
        from fastdl.kernels import softmax as kernels
        from fastdl.kernels.config import PARALLEL_MIN_SIZE, threads

        self.kernels = kernels
        n_models, outer, n_classes, inner = view
        self.rows = n_models * outer
        self.rows_per_model, self.n_classes, self.inner = outer, n_classes, inner
        self.parallel = self.rows * n_classes * inner >= PARALLEL_MIN_SIZE
        self.n_workers = threads() * 4 if self.parallel else 1
        self.dtype = dtype

    def run(self, mode, z, labels, probs, grad_scale, smoothing, ignore_index, out):
        """Launch one kernel; returns the per-position losses, float64 (rows * inner,)."""
        rows, inner, n_classes = self.rows, self.inner, self.n_classes
        loss = np.empty(rows * inner if mode >= XENT_INDEX else inner)
        dtype = self.dtype
        grad_scale = np.ones(1, dtype) if grad_scale is None else grad_scale.astype(dtype)
        smoothing = np.asarray([1, 0, 0] if smoothing is None else smoothing, dtype)
        if inner == 1:
            shape = (rows, n_classes)
            kernel = self.kernels.rows_parallel if self.parallel else self.kernels.rows_serial
            kernel(z.reshape(shape), _or_dummy(labels, (rows,), np.int64),
                   _or_dummy(probs, shape, dtype), grad_scale, self.rows_per_model, smoothing,
                   ignore_index, mode, out.reshape(shape), loss)
        else:
            shape = (rows, n_classes, inner)
            kernel = self.kernels.tiles_parallel if self.parallel else self.kernels.tiles_serial
            kernel(z.reshape(shape), _or_dummy(labels, (rows, inner), np.int64),
                   _or_dummy(probs, shape, dtype), grad_scale, self.rows_per_model, smoothing,
                   ignore_index, mode, self.n_workers, out.reshape(shape),
                   loss.reshape(-1, inner))
        return loss

    def label_counts(self, labels, ignore_index):
        """Labels not ignored per model, and the first label out of range (or None)."""
        n_models = self.rows // self.rows_per_model
        counts = np.empty(n_models, np.int64)
        bad = self.kernels.label_counts(labels.reshape(n_models, -1), self.n_classes,
                                        ignore_index, counts)
        return counts, (None if bad == ignore_index else int(bad))

    def reduce(self, row_loss, scale):
        """Per model: sum of its positions' losses times ``scale[k]``, float64 (K,)."""
        return row_loss.reshape(scale.shape[0], -1).sum(axis=1) * scale

    empty_like = staticmethod(np.empty_like)

    def result(self, values, shape):
        """Losses in the logits' dtype: a NumPy scalar for shape (), else an array."""
        return np.asarray(values, self.dtype).reshape(shape)[()]


class _CudaOps:
    """The CUDA kernels (``kernels/softmax_cuda.py``) on device arrays, passed flat. Losses
    stay on the device in the logits' dtype; label counts cross to the host (one sync)."""

    def __init__(self, view, dtype):
        from fastdl.kernels import softmax_cuda as kernels
        from fastdl.kernels.cudalib import as_cuda_array, cuda

        self.kernels, self.cuda, self.as_cuda_array = kernels, cuda, as_cuda_array
        self.view, self.dtype = view, dtype

    def _flat(self, a):
        a = self.as_cuda_array(a)
        return a.reshape(a.size) if len(a.shape) != 1 else a

    def _values(self, values):
        return self.cuda.to_device(np.asarray(values, self.dtype))

    def run(self, mode, z, labels, probs, grad_scale, smoothing, ignore_index, out):
        """Launch one kernel; returns the per-position losses, a device array."""
        n_models = self.view[0]
        labels = self.cuda.to_device(np.zeros(1, np.int64)) if labels is None \
            else self._flat(labels)
        probs = self._values(np.zeros(1)) if probs is None else self._flat(probs)
        grad_scale = self._values(np.ones(n_models) if grad_scale is None else grad_scale)
        smoothing = self._values([1, 0, 0] if smoothing is None else smoothing)
        return self.kernels.run(mode, self._flat(z), labels, probs, grad_scale, self.view[1],
                                smoothing, ignore_index, self.view, self._flat(out))

    def label_counts(self, labels, ignore_index):
        return self.kernels.label_counts(self._flat(labels), self.view[0], self.view[2],
                                         ignore_index)

    def reduce(self, row_loss, scale):
        return self.kernels.sum_per_model(row_loss, self.view[0], self._values(scale))

    def empty_like(self, a):
        a = self.as_cuda_array(a)
        return self.cuda.device_array(a.shape, a.dtype)

    def result(self, values, shape):
        """Losses as a device array of ``shape`` (0-d for a reduced loss)."""
        return values.reshape(shape)


def _or_dummy(a, shape, dtype):
    """``a`` viewed as ``shape``, or a 1-element stand-in of that rank for an unused input."""
    return np.zeros((1,) * len(shape), dtype) if a is None else a.reshape(shape)


def _normalize(z, axis, out, mode):
    device = _check_array(z, "z", population=False)
    rank = len(z.shape)
    view = view_shape(tuple(z.shape), _class_axis(axis, rank), False)
    check_out(out, "out", z, device, like_name="z")
    ops = _ops(device, view, z.dtype)
    out = ops.empty_like(z) if out is None else out
    ops.run(mode, z, None, None, None, None, 0, out)
    return out


def softmax(z, axis=-1, out=None):
    """``exp(z - max z) / sum exp(z - max z)`` along ``axis``; same shape and dtype as z.

    z: float32/float64, C-contiguous, any rank >= 1. ``out`` may be z itself.
    """
    return _normalize(z, axis, out, SOFTMAX)


def log_softmax(z, axis=-1, out=None):
    """``z - max z - log sum exp(z - max z)`` along ``axis`` (never ``log(softmax(z))``, which
    gives -inf where softmax underflows). ``out`` may be z itself."""
    return _normalize(z, axis, out, LOG_SOFTMAX)


def softmax_cross_entropy(logits, target, axis=-1, reduction="mean", label_smoothing=0.0,
                          ignore_index=-100, population=False, out=None):
    """Cross-entropy of softmax(logits) against ``target``, and its gradient: ``(loss,
    dlogits)``, as ``torch.nn.functional.cross_entropy`` and its autograd.

    logits: float32/float64, C-contiguous, classes along ``axis`` (counted on the per-model
    array). target: class indices of any integer dtype, shaped like logits without the class
    axis (``ignore_index`` marks positions that count for nothing); or probabilities (one-hot
    or soft; rows need not sum to 1) of logits' shape and dtype. reduction: "mean" (over the
    positions not ignored; NaN when all are), "sum" or "none" (per position; ignored ones 0).
    label_smoothing: eps in [0, 1]. population: a leading axis of K models, each reduced on
    its own (loss of shape (K,)). out: where to write dlogits (may be logits itself).

    loss is a NumPy scalar of logits' dtype on the CPU (a 0-d device array on the GPU), an
    array for "none" or a population; dlogits is the gradient of the reduced loss.
    """
    device = _check_array(logits, "logits", population)
    rank = len(logits.shape) - (1 if population else 0)
    class_axis = _class_axis(axis, rank)
    view = view_shape(tuple(logits.shape), class_axis, population)
    n_models, _, n_classes, _ = view
    lead = 1 if population else 0
    row_shape = tuple(logits.shape[:lead + class_axis] + logits.shape[lead + class_axis + 1:])
    labels = probs = None
    if device_of(target) != device:
        raise TypeError(f"target is on {device_of(target)} but logits are on {device}: all "
                        "arrays of a call must live on one device")
    if device == "cpu" and not isinstance(target, np.ndarray):
        raise TypeError(f"target must be a NumPy array of class indices or probabilities; "
                        f"got {_checks.describe(target)}")
    if np.dtype(target.dtype).kind in "iu":
        if tuple(target.shape) != row_shape:
            raise ValueError(f"target of class indices must have shape {row_shape} (logits' "
                             f"shape without the class axis {axis}); got {tuple(target.shape)}")
        labels = target
    elif np.dtype(target.dtype).kind == "f":
        if target.dtype != logits.dtype:
            raise TypeError(f"target probabilities must have logits' dtype {logits.dtype}; "
                            f"got {target.dtype}")
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(f"target probabilities must have logits' shape "
                             f"{tuple(logits.shape)}; got {tuple(target.shape)}")
        probs = target
    else:
        raise TypeError(f"target must hold integer class indices or float probabilities; got "
                        f"dtype {target.dtype}")
    if not c_contiguous(target):
        raise ValueError("target must be C-contiguous (never copied)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not _checks.is_real_scalar(label_smoothing) or not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must be a number in [0, 1]; got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int; got {_checks.describe(ignore_index)}")
    check_out(out, "out", logits, device, like_name="logits")
    if out is not None and probs is not None and overlap(out, probs, device):
        raise ValueError("out must not overlap target (the gradient pass reads it)")

    ops = _ops(device, view, logits.dtype)
    per_model = np.prod(row_shape[lead:], dtype=np.int64)
    if labels is not None:
        counts, bad = ops.label_counts(labels, int(ignore_index))
        if bad is not None:
            raise ValueError(f"target holds class index {bad}, outside [0, {n_classes}) and not "
                             f"ignore_index ({ignore_index})")
    else:
        counts = np.full(n_models, per_model)
    if reduction == "mean":
        with np.errstate(divide="ignore", invalid="ignore"):
            loss_scale = np.where(counts > 0, 1.0 / counts, np.nan)
        grad_scale = np.where(counts > 0, loss_scale, 0.0)
    else:
        loss_scale = grad_scale = np.ones(n_models)
    eps = float(label_smoothing)
    smoothing = (1 - eps, eps, eps / n_classes)
    dlogits = ops.empty_like(logits) if out is None else out
    row_loss = ops.run(XENT_INDEX if labels is not None else XENT_PROB, logits, labels, probs,
                       grad_scale, smoothing, int(ignore_index), dlogits)
    if reduction == "none":
        return ops.result(row_loss, row_shape), dlogits
    loss = ops.reduce(row_loss, loss_scale)
    return ops.result(loss, (n_models,) if population else ()), dlogits
