"""Softmax, log-softmax and softmax cross-entropy on device arrays against the CPU path and the
NumPy reference (simulator-sized: a few rows, a few dozen classes)."""

import numpy as np
import pytest

import fastdl as fd
from fastdl.device import is_device_array
from fastdl.kernels import cudalib

import reference
from helpers import SOFTMAX_TOLERANCE, assert_close

cuda = cudalib.cuda
# (shape, class axis): rows (a block per row) and tiles (a thread per position) layouts
LAYOUTS = [((3, 40), -1), ((40, 6), 0), ((2, 5, 3, 4), 1), ((3,), 0)]


def kernel_of(shape, axis):
    inner = np.prod(shape[axis % len(shape) + 1:])
    return "softmax_rows_cuda" if inner == 1 else "softmax_tiles_cuda"


def labels_for(rng, shape, axis):
    row_shape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    labels = rng.integers(0, shape[axis], row_shape)
    if labels.size > 2:
        labels.flat[1] = -100  # ignored
    return labels


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_softmax_and_log_softmax(shape, axis, dtype):
    z = (np.random.default_rng(1).standard_normal(shape) * 3).astype(dtype)
    for function, ref in [(fd.softmax, reference.softmax), (fd.log_softmax,
                                                            reference.log_softmax)]:
        got = function(cuda.to_device(z), axis=axis)
        assert is_device_array(got)
        assert_close(got.copy_to_host(), ref(z, axis), dtype, SOFTMAX_TOLERANCE, "reference")
        assert_close(got.copy_to_host(), function(z, axis=axis), dtype, SOFTMAX_TOLERANCE,
                     "cpu")
    assert cudalib.LAUNCHES[kernel_of(shape, axis)] == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", LAYOUTS[:3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_cross_entropy(shape, axis, dtype, reduction, kind):
    rng = np.random.default_rng(2)
    z = (rng.standard_normal(shape) * 3).astype(dtype)
    if kind == "index":
        target = labels_for(rng, shape, axis)
    else:
        target = rng.random(shape).astype(dtype)  # unnormalized soft targets
    loss, grad = fd.softmax_cross_entropy(cuda.to_device(z), cuda.to_device(target), axis=axis,
                                          reduction=reduction, label_smoothing=0.1)
    assert is_device_array(loss) and is_device_array(grad)
    want_loss, want_grad = reference.softmax_cross_entropy(z, target, axis, reduction, 0.1)
    cpu_loss, cpu_grad = fd.softmax_cross_entropy(z, target, axis=axis, reduction=reduction,
                                                  label_smoothing=0.1)
    for got, want, what in [(loss, want_loss, "loss"), (grad, want_grad, "dlogits")]:
        assert_close(got.copy_to_host(), want, dtype, SOFTMAX_TOLERANCE, what)
    assert_close(loss.copy_to_host(), cpu_loss, dtype, SOFTMAX_TOLERANCE, "loss vs cpu")
    assert_close(grad.copy_to_host(), cpu_grad, dtype, SOFTMAX_TOLERANCE, "dlogits vs cpu")
    assert loss.copy_to_host().dtype == dtype
    assert cudalib.LAUNCHES[kernel_of(shape, axis)] == 1
    if reduction != "none":
        assert cudalib.LAUNCHES["sum_per_model_cuda"] == 1


def test_gradient_over_the_logits_and_extreme_values():
    z = np.array([[3e4, -3e4, 0.0, 1.0], [-3e4, -3e4, 3e4, 3e4]], np.float32)
    labels = np.array([1, 2])
    want_loss, want_grad = reference.softmax_cross_entropy(z, labels)
    d_z = cuda.to_device(z)
    loss, grad = fd.softmax_cross_entropy(d_z, cuda.to_device(labels), out=d_z)
    assert grad is d_z
    assert np.isfinite(loss.copy_to_host())
    assert_close(loss.copy_to_host(), want_loss, np.float32, SOFTMAX_TOLERANCE, "loss")
    assert_close(d_z.copy_to_host(), want_grad, np.float32, SOFTMAX_TOLERANCE, "dlogits")


def test_population_and_all_ignored_mean():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2, 4, 6)).astype(np.float32)
    labels = rng.integers(0, 6, (2, 4))
    labels[1] = -100  # model 1: all ignored, mean is NaN with a zero gradient
    loss, grad = fd.softmax_cross_entropy(cuda.to_device(z), cuda.to_device(labels),
                                          population=True)
    loss, grad = loss.copy_to_host(), grad.copy_to_host()
    want, want_grad = reference.softmax_cross_entropy(z[0], labels[0])
    assert loss.shape == (2,)
    assert_close(loss[0], want, np.float32, SOFTMAX_TOLERANCE)
    assert_close(grad[0], want_grad, np.float32, SOFTMAX_TOLERANCE)
    assert np.isnan(loss[1]) and not grad[1].any()


def test_label_out_of_range_and_device_mix_are_errors():
    z = cuda.to_device(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="class index 4"):
        fd.softmax_cross_entropy(z, cuda.to_device(np.array([0, 4, 1])))
    with pytest.raises(TypeError, match="one device"):
        fd.softmax_cross_entropy(z, np.array([0, 1, 1]))


def test_tiles_sums_over_many_classes_are_compensated():
    """A thread of the tiles kernel sums over all C classes: with one float32 running sum,
    50000 targets of 0.1 sum to 1.7x the tolerance off (the loss is sum_j t_j * log C here);
    the Kahan sum is within it. (Simulator-sized: two positions.)"""
    n_classes = 50_000
    z = np.zeros((n_classes, 2), np.float32)
    target = np.full((n_classes, 2), 0.1, np.float32)
    loss, grad = fd.softmax_cross_entropy(cuda.to_device(z), cuda.to_device(target), axis=0,
                                          reduction="none")
    want_loss, want_grad = reference.softmax_cross_entropy(z, target, axis=0, reduction="none")
    assert_close(loss.copy_to_host(), want_loss, np.float32, SOFTMAX_TOLERANCE, "loss")
    assert_close(grad.copy_to_host(), want_grad, np.float32, SOFTMAX_TOLERANCE, "dlogits")
    assert cudalib.LAUNCHES["softmax_tiles_cuda"] == 1


# -- class weights -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", LAYOUTS[:3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_weighted_cross_entropy(shape, axis, dtype, reduction, kind):
    rng = np.random.default_rng(6)
    z = (rng.standard_normal(shape) * 3).astype(dtype)
    target = labels_for(rng, shape, axis) if kind == "index" else rng.random(shape).astype(dtype)
    weight = (rng.random(shape[axis]) * 3 - 0.5).astype(dtype)  # some negative, as torch allows
    loss, grad = fd.softmax_cross_entropy(cuda.to_device(z), cuda.to_device(target), axis=axis,
                                          reduction=reduction, label_smoothing=0.1,
                                          weight=cuda.to_device(weight))
    want_loss, want_grad = reference.softmax_cross_entropy(z, target, axis, reduction, 0.1,
                                                           weight=weight)
    cpu_loss, cpu_grad = fd.softmax_cross_entropy(z, target, axis=axis, reduction=reduction,
                                                  label_smoothing=0.1, weight=weight)
    for got, want, what in [(loss, want_loss, "loss"), (grad, want_grad, "dlogits")]:
        assert_close(got.copy_to_host(), want, dtype, SOFTMAX_TOLERANCE, what)
    assert_close(loss.copy_to_host(), cpu_loss, dtype, SOFTMAX_TOLERANCE, "loss vs cpu")
    assert_close(grad.copy_to_host(), cpu_grad, dtype, SOFTMAX_TOLERANCE, "dlogits vs cpu")
    assert cudalib.LAUNCHES[kernel_of(shape, axis)] == 1
    # the weighted mean over index targets divides by the labels' weights, summed on the GPU
    assert cudalib.LAUNCHES["label_weights_cuda"] == (kind == "index" and reduction == "mean")


@pytest.mark.parametrize("shape, axis", [((4, 6), -1), ((6, 4), 0)])
def test_per_model_weights_and_zero_weight_sums(shape, axis):
    """Per-model weights (K, C) against the CPU path; model 1's labels weigh 0 in total (NaN
    loss, NaN gradient), model 2's are all ignored (NaN loss, zero gradient)."""
    rng = np.random.default_rng(7)
    z = rng.standard_normal((3,) + shape).astype(np.float32)
    labels = np.stack([labels_for(rng, shape, axis), np.zeros(4, np.int64),
                       np.full(4, -100)])
    weight = (rng.random((3, shape[axis])) + 0.5).astype(np.float32)
    weight[1, 0] = 0
    for smoothing in (0.0, 0.1):
        loss, grad = fd.softmax_cross_entropy(cuda.to_device(z), cuda.to_device(labels),
                                              axis=axis, label_smoothing=smoothing,
                                              population=True, weight=cuda.to_device(weight))
        cpu_loss, cpu_grad = fd.softmax_cross_entropy(z, labels, axis=axis,
                                                      label_smoothing=smoothing,
                                                      population=True, weight=weight)
        loss, grad = loss.copy_to_host(), grad.copy_to_host()
        assert np.isnan(loss[1:]).all() and np.isnan(grad[1]).all() and not grad[2].any()
        assert_close(loss, cpu_loss, np.float32, SOFTMAX_TOLERANCE, "loss vs cpu")
        assert_close(grad, cpu_grad, np.float32, SOFTMAX_TOLERANCE, "dlogits vs cpu")


def test_weight_on_the_host_with_device_logits_is_an_error():
    z = cuda.to_device(np.zeros((3, 4), np.float32))
    labels = cuda.to_device(np.array([0, 1, 1]))
    with pytest.raises(TypeError, match="weight"):
        fd.softmax_cross_entropy(z, labels, weight=np.ones(4, np.float32))
    with pytest.raises(TypeError, match="weight"):
        fd.softmax_cross_entropy(z, labels, weight=cuda.to_device(np.ones(4, np.float64)))
    with pytest.raises(ValueError, match="weight"):
        fd.softmax_cross_entropy(z, labels, weight=cuda.to_device(np.ones(5, np.float32)))
