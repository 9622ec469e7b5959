"""Softmax, log-softmax and fused softmax cross-entropy, along any class axis.

SPEC.md's formulas, for logits ``z`` with C classes along ``axis``, p = softmax(z)::

    softmax(z)_j = exp(z_j - max z) / sum_k exp(z_k - max z)
    index target y:  L = -log p_y                    dL/dz = p - onehot(y)
    probabilities y: L = -sum_j y_j log p_j          dL/dz = p * sum_j y_j - y
    label smoothing eps: y -> (1 - eps) * y + eps / C  (index targets: y = onehot)
    class weights w: index:  L = (1-eps) * w_y * (-log p_y) + eps/C * sum_j w_j * (-log p_j)
                     probabilities: L = -sum_j w_j y_j log p_j  (y smoothed)

Loss and gradient come from one fused pass per row (``kernels/softmax.py``): no probability
array is made, and ``out=logits`` writes the gradient over the logits. The class axis is any
axis (-1 for (m, C), 0 for the notes' (C, m)); inputs are C-contiguous and never copied.
"""

import numpy as np

from . import _dispatch, _validate
from ._dispatch import CudaOps, HostOps

REDUCTIONS = ("mean", "sum", "none")

# What the kernels compute (the ``mode`` of kernels/softmax.py).
SOFTMAX, LOG_SOFTMAX, XENT_INDEX, XENT_PROB = range(4)


_DUMMIES = {}  # (rank, dtype) -> the CPU kernels' stand-in for an unused input


class _SoftmaxCpu(HostOps):
    """The CPU kernels (``kernels/softmax.py``) on NumPy arrays of the (K, outer, C, inner)
    ``view``, seen as (rows, C) or (rows, C, inner) with rows = K * outer."""

    def __init__(self, view, dtype):
        from fastdl.kernels import softmax as kernels
        from fastdl.kernels.config import threads, use_parallel

        self.kernels = kernels
        n_models, outer, n_classes, inner = view
        self.rows = n_models * outer
        self.rows_per_model, self.n_classes, self.inner = outer, n_classes, inner
        self.parallel = use_parallel(self.rows * n_classes * inner)
        self.n_workers = threads() * 4 if self.parallel else 1
        self.dtype = dtype

    def _view_or_dummy(self, a, shape, dtype):
        """``a`` viewed as ``shape``, or a 1-element stand-in of that rank for an unused input
        (never read: made once per rank and dtype)."""
        if a is not None:
            return a.reshape(shape)
        dummy = _DUMMIES.get((len(shape), dtype))
        if dummy is None:
            dummy = _DUMMIES[len(shape), dtype] = self.zeros((1,) * len(shape), dtype)
        return dummy

    def run(self, mode, z, labels, probs, weight, grad_scale, smoothing, ignore_index, out):
        """Launch the kernel of ``mode`` (with or without ``weight``: (C,) or (K, C)); returns
        the per-position losses, float64 (rows * inner,).

        ``grad_scale``: (K,) host values; ``smoothing``: (keep, eps, eps / C)."""
        rows, inner, n_classes, dtype = self.rows, self.inner, self.n_classes, self.dtype
        loss = self.empty(rows * inner if mode >= XENT_INDEX else inner, np.float64)
        grad_scale, smoothing = self.from_host(grad_scale, dtype), self.from_host(smoothing, dtype)
        weighted = weight is not None
        weight = self._view_or_dummy(weight, (-1, n_classes), dtype)
        if inner == 1:
            shape = (rows, n_classes)
            target = (probs.reshape(shape) if probs is not None
                      else self._view_or_dummy(labels, (rows,), np.int64))
            self.kernels.KERNELS["rows", mode, weighted][self.parallel](
                z.reshape(shape), target, weight, grad_scale, self.rows_per_model, smoothing,
                ignore_index, out.reshape(shape), loss)
        else:
            shape = (rows, n_classes, inner)
            target = (probs.reshape(shape) if probs is not None
                      else self._view_or_dummy(labels, (rows, inner), np.int64))
            self.kernels.KERNELS["tiles", mode, weighted][self.parallel](
                z.reshape(shape), target, weight, grad_scale, self.rows_per_model, smoothing,
                ignore_index, self.n_workers, out.reshape(shape), loss.reshape(-1, inner))
        return loss

    def label_counts(self, labels, ignore_index):
        """Labels not ignored per model, and the first label out of range (or None)."""
        n_models = self.rows // self.rows_per_model
        counts = self.empty(n_models, np.int64)
        bad = self.kernels.label_counts(labels.reshape(n_models, -1), self.n_classes,
                                        ignore_index, counts)
        return counts, (None if bad == ignore_index else int(bad))

    def label_weights(self, labels, weight, ignore_index):
        """Per model: the sum of its labels' class weights (labels not ignored), float64."""
        n_models = self.rows // self.rows_per_model
        sums = self.empty(n_models, np.float64)
        self.kernels.label_weights(labels.reshape(n_models, -1),
                                   weight.reshape(-1, self.n_classes), ignore_index, sums)
        return sums

    def reduce(self, row_loss, scale):
        """Per model: sum of its positions' losses times ``scale[k]``, float64 (K,)."""
        return row_loss.reshape(scale.shape[0], -1).sum(axis=1) * scale

    def result(self, values, shape):
        """Losses in the logits' dtype: a NumPy scalar for shape (), else an array."""
        return np.asarray(values, self.dtype).reshape(shape)[()]


class _SoftmaxCuda(CudaOps):
    """The CUDA kernels (``kernels/softmax_cuda.py``) on device arrays, passed flat. Losses
    stay on the device in the logits' dtype; label counts cross to the host (one sync)."""

    def __init__(self, view, dtype):
        super().__init__()
        from fastdl.kernels import softmax_cuda as kernels

        self.kernels = kernels
        self.view, self.dtype = view, dtype

    def run(self, mode, z, labels, probs, weight, grad_scale, smoothing, ignore_index, out):
        """Launch one kernel; returns the per-position losses, a device array."""
        n_models, outer, _, inner = self.view
        labels = self.zeros(1, np.int64) if labels is None else self.flat(labels)
        probs = self.zeros(1, self.dtype) if probs is None else self.flat(probs)
        weight = None if weight is None else self.flat(weight)
        loss = self.empty(n_models * outer * inner, self.dtype)
        self.kernels.run(mode, self.flat(z), labels, probs, weight,
                         self.from_host(grad_scale, self.dtype), outer,
                         self.from_host(smoothing, self.dtype), ignore_index, self.view,
                         self.flat(out), loss)
        return loss

    def label_counts(self, labels, ignore_index):
        n_models = self.view[0]
        return self.kernels.label_counts(self.flat(labels), n_models, self.view[2],
                                         ignore_index, self.zeros(n_models, np.int64),
                                         self.zeros(2, np.int64))

    def label_weights(self, labels, weight, ignore_index):
        n_models = self.view[0]
        return self.kernels.label_weights(self.flat(labels), n_models, self.flat(weight),
                                          self.view[2], ignore_index,
                                          self.zeros(n_models, self.dtype))

    def reduce(self, row_loss, scale):
        out = self.empty(self.view[0], self.dtype)
        self.kernels.sum_per_model(row_loss, self.view[0], self.from_host(scale, self.dtype), out)
        return out

    def result(self, values, shape):
        """Losses as a device array of ``shape`` (0-d for a reduced loss)."""
        return values.reshape(shape)


_FAMILY = {"cpu": _SoftmaxCpu, "cuda": _SoftmaxCuda}
_ONE = np.ones(1)  # the softmax modes' grad_scale (one model; the kernels only read it)
_NO_SMOOTHING = (1, 0, 0)  # (keep, eps, eps / C)


def _normalize(z, axis, out, mode):
    device = _validate.float_array(z, "z")
    view = _validate.view_shape(tuple(z.shape), _validate.axis(axis, len(z.shape)), False)
    _validate.check_out(out, "out", z, device, like_name="z")
    ops = _dispatch.select(_FAMILY, device, view, z.dtype)
    out = ops.empty_like(z) if out is None else out
    ops.run(mode, z, None, None, None, _ONE, _NO_SMOOTHING, 0, out)
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


def _empty_batch(ops, logits, row_shape, reduction, population, n_models, out):
    """Cross-entropy over no positions, as torch.nn.functional.cross_entropy: "mean" NaN (0 /
    0), "sum" 0, "none" an empty array; dlogits is empty too."""
    dlogits = ops.empty_like(logits) if out is None else out
    if reduction == "none":
        return ops.result(ops.zeros(0, logits.dtype), row_shape), dlogits
    loss = np.full(n_models, np.nan if reduction == "mean" else 0.0)
    return ops.result(ops.from_host(loss, logits.dtype), (n_models,) if population else ()), \
        dlogits


def softmax_cross_entropy(logits, target, axis=-1, reduction="mean", label_smoothing=0.0,
                          ignore_index=-100, population=False, out=None, weight=None):
    """Cross-entropy of softmax(logits) against ``target``, and its gradient: ``(loss,
    dlogits)``, as ``torch.nn.functional.cross_entropy`` and its autograd.

    logits: float32/float64, C-contiguous, classes along ``axis`` (counted on the per-model
    array). target: class indices of any integer dtype, shaped like logits without the class
    axis (``ignore_index`` marks positions that count for nothing); or probabilities (one-hot
    or soft; rows need not sum to 1) of logits' shape and dtype. reduction: "mean" (over the
    positions not ignored; NaN when all are), "sum" or "none" (per position; ignored ones 0).
    label_smoothing: eps in [0, 1]. population: a leading axis of K models, each reduced on
    its own (loss of shape (K,)). out: where to write dlogits (may be logits itself).
    weight: class weights w, (C,) of logits' dtype on logits' device (with ``population``
    also (K, C), per model); any values, as torch (SPEC.md)::

        index targets:  L = (1-eps) * w_y * (-log p_y) + eps/C * sum_j w_j * (-log p_j)
        probabilities:  L = -sum_j w_j y'_j log p_j   (y' = (1-eps) * y + eps/C)

    With weights, "mean" over index targets divides by the sum of w_y over the positions not
    ignored (NaN when that is 0, with a NaN gradient unless all are ignored, as torch);
    over probabilities, by the number of positions.
    An empty batch gives torch's results ("mean" NaN, "sum" 0, "none" empty); no classes
    (C = 0) is a ValueError.

    loss is a NumPy scalar of logits' dtype on the CPU (a 0-d device array on the GPU), an
    array for "none" or a population; dlogits is the gradient of the reduced loss.
    """
    population = _validate.population_flag(population)
    device = _validate.float_array(logits, "logits", population, needs="a class axis")
    class_axis = _validate.axis(axis, len(logits.shape) - int(population))
    view = _validate.view_shape(tuple(logits.shape), class_axis, population)
    n_models, _, n_classes, _ = view
    if n_classes == 0:  # torch: an IndexError (index targets) or NaN (probabilities)
        raise ValueError(f"logits must have at least one class along axis {axis}; got shape "
                         f"{tuple(logits.shape)}")
    lead = int(population)
    row_shape = tuple(logits.shape[:lead + class_axis] + logits.shape[lead + class_axis + 1:])
    is_index = _validate.class_target(target, logits, row_shape, device)
    labels, probs = (target, None) if is_index else (None, target)
    reduction = _validate.option(reduction, "reduction", REDUCTIONS)
    eps = _validate.number(label_smoothing, "label_smoothing", _validate.closed_unit_interval)
    ignore_index = _validate.integer(ignore_index, "ignore_index")
    _validate.check_out(out, "out", logits, device, like_name="logits", forbid_overlap=probs,
                        reason="target (the gradient pass reads it)")
    if weight is not None:
        _validate.class_weight(weight, logits, n_classes, n_models if population else None,
                               device, out)

    ops = _dispatch.select(_FAMILY, device, view, logits.dtype)
    per_model = np.prod(row_shape[lead:], dtype=np.int64)
    if per_model == 0:  # an empty batch: torch's results, and no kernel to launch
        return _empty_batch(ops, logits, row_shape, reduction, population, n_models, out)
    if labels is not None:
        counts, bad = ops.label_counts(labels, ignore_index)
        if bad is not None:
            raise ValueError(f"target holds class index {bad}, outside [0, {n_classes}) and not "
                             f"ignore_index ({ignore_index})")
    else:
        counts = np.full(n_models, per_model)
    if reduction == "mean":
        # the divisor: positions not ignored, or the sum of their labels' weights
        divisor = counts
        if labels is not None and weight is not None:
            divisor = ops.label_weights(labels, weight, ignore_index)
        with np.errstate(divide="ignore", invalid="ignore"):
            loss_scale = np.where(divisor != 0, 1.0 / divisor, np.nan)
        # no position: a zero gradient; positions of zero total weight: NaN (torch's 0 / 0)
        grad_scale = np.where(counts > 0, loss_scale, 0.0)
    else:
        loss_scale = grad_scale = np.ones(n_models)
    smoothing = (1 - eps, eps, eps / n_classes)
    dlogits = ops.empty_like(logits) if out is None else out
    row_loss = ops.run(XENT_INDEX if labels is not None else XENT_PROB, logits, labels, probs,
                       weight, grad_scale, smoothing, ignore_index, dlogits)
    if reduction == "none":
        return ops.result(row_loss, row_shape), dlogits
    loss = ops.reduce(row_loss, loss_scale)
    return ops.result(loss, (n_models,) if population else ()), dlogits
