"""Softmax and cross-entropy against torch (cross_entropy with autograd, softmax,
log_softmax); skipped without torch."""

import numpy as np
import pytest

import fastdl as fd

from helpers import SOFTMAX_TOLERANCE, assert_close, require

torch = require("torch")
F = torch.nn.functional

# (shape, class axis): torch's class axis is 1 (or 0 for a single row); other layouts are
# compared through a moved axis.
LAYOUTS = [((64, 10), -1), ((300, 100), -1), ((10, 64), 0), ((4, 7, 5, 6), 1),
           ((6, 5, 7), -1), ((12,), 0)]


def torch_cross_entropy(z, target, axis, **kwargs):
    """Loss and autograd gradient of F.cross_entropy with the classes moved to axis 1."""
    rank = z.ndim
    moved = np.moveaxis(z, axis, 1 if rank > 1 else 0)
    logits = torch.tensor(moved, requires_grad=True)
    if np.issubdtype(target.dtype, np.floating):
        target = torch.tensor(np.moveaxis(target, axis, 1 if rank > 1 else 0))
    else:
        target = torch.tensor(target.astype(np.int64))
    if kwargs.get("weight") is not None:
        kwargs["weight"] = torch.tensor(kwargs["weight"])
    loss = F.cross_entropy(logits, target, **kwargs)
    loss.sum().backward()
    grad = np.moveaxis(logits.grad.numpy(), 1 if rank > 1 else 0, axis)
    return loss.detach().numpy(), grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_index_targets_match_torch(rng, shape, axis, dtype, reduction, smoothing):
    z = (rng.standard_normal(shape) * 4).astype(dtype)
    labels = rng.integers(0, shape[axis], tuple(s for i, s in enumerate(shape)
                                                if i != axis % len(shape)))
    if labels.size > 2:
        labels.flat[1] = 3  # ignore_index below
    loss, grad = fd.softmax_cross_entropy(z, labels, axis=axis, reduction=reduction,
                                          label_smoothing=smoothing, ignore_index=3)
    want_loss, want_grad = torch_cross_entropy(z, labels, axis, reduction=reduction,
                                               label_smoothing=smoothing, ignore_index=3)
    if reduction == "none" and len(shape) == 1:
        want_loss = want_loss.reshape(())
    assert_close(loss, want_loss, dtype, SOFTMAX_TOLERANCE, "loss")
    assert_close(grad, want_grad, dtype, SOFTMAX_TOLERANCE, "dlogits")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", LAYOUTS[:5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_probability_targets_match_torch(rng, shape, axis, dtype, reduction, smoothing):
    z = (rng.standard_normal(shape) * 4).astype(dtype)
    target = rng.random(shape).astype(dtype)  # rows do not sum to 1
    loss, grad = fd.softmax_cross_entropy(z, target, axis=axis, reduction=reduction,
                                          label_smoothing=smoothing)
    want_loss, want_grad = torch_cross_entropy(z, target, axis, reduction=reduction,
                                               label_smoothing=smoothing)
    assert_close(loss, want_loss, dtype, SOFTMAX_TOLERANCE, "loss")
    assert_close(grad, want_grad, dtype, SOFTMAX_TOLERANCE, "dlogits")


@pytest.mark.parametrize("shape, axis", [((8, 5), -1), ((5, 8), 0)])
def test_extreme_logits_equal_torch(rng, shape, axis):
    z = np.where(rng.random(shape) < 0.5, 3e4, -3e4).astype(np.float32)
    z += rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, shape[axis], shape[1 - axis % 2])
    loss, grad = fd.softmax_cross_entropy(z, labels, axis=axis, reduction="none",
                                          label_smoothing=0.1)
    want_loss, want_grad = torch_cross_entropy(z, labels, axis, reduction="none",
                                               label_smoothing=0.1)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    assert_close(loss, want_loss, np.float32, SOFTMAX_TOLERANCE, "loss")
    assert_close(grad, want_grad, np.float32, SOFTMAX_TOLERANCE, "dlogits")
    moved = torch.tensor(np.moveaxis(z, axis, -1))
    assert_close(fd.log_softmax(z, axis=axis),
                 np.moveaxis(torch.log_softmax(moved, -1).numpy(), -1, axis), np.float32,
                 SOFTMAX_TOLERANCE)


def test_all_ignored_mean_equals_torch():
    z = np.zeros((3, 4), np.float32)
    labels = np.full(3, -100)
    loss, grad = fd.softmax_cross_entropy(z, labels)
    want_loss, want_grad = torch_cross_entropy(z, labels, -1)
    assert np.isnan(loss) and np.isnan(want_loss)
    np.testing.assert_array_equal(grad, want_grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_softmax_and_log_softmax_equal_torch(rng, shape, axis, dtype):
    z = (rng.standard_normal(shape) * 5).astype(dtype)
    t = torch.tensor(z)
    assert_close(fd.softmax(z, axis=axis), torch.softmax(t, axis).numpy(), dtype,
                 SOFTMAX_TOLERANCE)
    assert_close(fd.log_softmax(z, axis=axis), torch.log_softmax(t, axis).numpy(), dtype,
                 SOFTMAX_TOLERANCE)


# -- class weights: torch's weight= ---------------------------------------------------------------

WEIGHT_LAYOUTS = [((64, 10), -1), ((10, 64), 0), ((6, 5, 7), -1), ((6, 5, 7), 0), ((6, 5, 7), 1),
                  ((4, 7, 5, 6), 1), ((12,), 0)]


def class_weights(rng, n_classes, dtype):
    """Mostly positive weights with a negative and a zero one (torch accepts any values)."""
    weight = rng.random(n_classes) * 2 + 0.1
    weight[:2] = [-0.5, 0.0]
    return rng.permutation(weight).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8])
def test_weighted_index_targets_match_torch(rng, shape, axis, dtype, reduction, smoothing,
                                            label_dtype):
    z = (rng.standard_normal(shape) * 4).astype(dtype)
    weight = class_weights(rng, shape[axis], dtype)
    labels = rng.integers(0, shape[axis], tuple(s for i, s in enumerate(shape)
                                                if i != axis % len(shape)))
    if labels.size > 2:
        labels.flat[1] = 3  # ignore_index below
    labels = labels.astype(label_dtype)
    loss, grad = fd.softmax_cross_entropy(z, labels, axis=axis, reduction=reduction,
                                          label_smoothing=smoothing, ignore_index=3,
                                          weight=weight)
    want_loss, want_grad = torch_cross_entropy(z, labels, axis, reduction=reduction,
                                               label_smoothing=smoothing, ignore_index=3,
                                               weight=weight)
    if reduction == "none" and len(shape) == 1:
        want_loss = want_loss.reshape(())
    assert_close(loss, want_loss, dtype, SOFTMAX_TOLERANCE, "loss")
    assert_close(grad, want_grad, dtype, SOFTMAX_TOLERANCE, "dlogits")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", WEIGHT_LAYOUTS[:6])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_probability_targets_match_torch(rng, shape, axis, dtype, reduction,
                                                  smoothing):
    z = (rng.standard_normal(shape) * 4).astype(dtype)
    weight = class_weights(rng, shape[axis], dtype)
    target = rng.random(shape).astype(dtype)  # rows do not sum to 1
    loss, grad = fd.softmax_cross_entropy(z, target, axis=axis, reduction=reduction,
                                          label_smoothing=smoothing, weight=weight)
    want_loss, want_grad = torch_cross_entropy(z, target, axis, reduction=reduction,
                                               label_smoothing=smoothing, weight=weight)
    assert_close(loss, want_loss, dtype, SOFTMAX_TOLERANCE, "loss")
    assert_close(grad, want_grad, dtype, SOFTMAX_TOLERANCE, "dlogits")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("labels", [[0, 3, 0, 0], [3, 3, 3, 3]], ids=["zero-weight", "all-ignored"])
def test_weighted_mean_over_zero_weight_equals_torch(smoothing, labels):
    """Labels of zero total weight: torch's 0 / 0, NaN loss and NaN gradients on the rows not
    ignored; all ignored: NaN with a zero gradient."""
    z = np.random.default_rng(4).standard_normal((4, 5)).astype(np.float32)
    weight = np.array([0, 1, 2, 1, 1], np.float32)
    labels = np.array(labels)
    loss, grad = fd.softmax_cross_entropy(z, labels, label_smoothing=smoothing,
                                          ignore_index=3, weight=weight)
    want_loss, want_grad = torch_cross_entropy(z, labels, -1, label_smoothing=smoothing,
                                               ignore_index=3, weight=weight)
    assert np.isnan(loss) and np.isnan(want_loss)
    np.testing.assert_array_equal(grad, want_grad)  # NaN where torch has NaN, zeros the same


def test_torch_accepts_negative_and_non_finite_weights():
    """Why weight= takes any values: torch checks only the weights' shape and dtype."""
    z = torch.zeros(2, 3)
    for weight in ([-1.0, 2.0, 0.5], [np.inf, 1.0, 1.0], [np.nan, 1.0, 1.0]):
        F.cross_entropy(z, torch.tensor([1, 2]), weight=torch.tensor(weight))
    with pytest.raises(RuntimeError):
        F.cross_entropy(z, torch.tensor([1, 2]), weight=torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        F.cross_entropy(z, torch.tensor([1, 2]), weight=torch.ones(2))
