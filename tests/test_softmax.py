"""Softmax, log-softmax and softmax cross-entropy on the CPU against the NumPy reference."""

import numpy as np
import pytest

import fastdl as fd

from helpers import SOFTMAX_TOLERANCE, assert_close
from reference import log_softmax as ref_log_softmax
from reference import softmax as ref_softmax
from reference import softmax_cross_entropy as ref_cross_entropy

DTYPES = [np.float32, np.float64]

# (shape, class axis): rows contiguous, the notes' (C, m), NCHW, channels-last, one row; sizes
# below and above the parallel threshold (16384 elements).
LAYOUTS = [((7, 33), -1), ((300, 100), -1), ((33, 7), 0), ((100, 300), 0), ((4, 5, 3, 2), 1),
           ((8, 10, 24, 24), 1), ((3, 4, 6), -1), ((5,), 0)]


def row_shape(shape, axis):
    return tuple(s for i, s in enumerate(shape) if i != axis % len(shape))


def labels_for(rng, shape, axis, dtype=np.int64, ignore_index=-100, n_ignored=2):
    labels = rng.integers(0, shape[axis], row_shape(shape, axis)).astype(dtype)
    if labels.size > n_ignored:
        labels.flat[:n_ignored] = ignore_index
    return labels


def logits_for(rng, shape, dtype, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def weights_for(rng, n_classes, dtype, shape=()):
    """Class weights in [-0.5, 2.5): mostly positive, some negative (torch allows them)."""
    return (rng.random(shape + (n_classes,)) * 3 - 0.5).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_softmax_and_log_softmax_match_reference(rng, shape, axis, dtype):
    z = logits_for(rng, shape, dtype)
    assert_close(fd.softmax(z, axis=axis), ref_softmax(z, axis), dtype, SOFTMAX_TOLERANCE)
    assert_close(fd.log_softmax(z, axis=axis), ref_log_softmax(z, axis), dtype,
                 SOFTMAX_TOLERANCE)


@pytest.mark.parametrize("function, reference", [(fd.softmax, ref_softmax),
                                                 (fd.log_softmax, ref_log_softmax)])
@pytest.mark.parametrize("shape, axis", [((300, 100), -1), ((100, 300), 0)])
def test_softmax_in_place(rng, function, reference, shape, axis):
    z = logits_for(rng, shape, np.float32)
    want = reference(z, axis)
    got = function(z, axis=axis, out=z)
    assert got is z
    assert_close(z, want, np.float32, SOFTMAX_TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_index_targets_match_reference(rng, shape, axis, dtype, reduction, smoothing):
    z = logits_for(rng, shape, dtype)
    labels = labels_for(rng, shape, axis)
    loss, grad = fd.softmax_cross_entropy(z, labels, axis=axis, reduction=reduction,
                                          label_smoothing=smoothing)
    want_loss, want_grad = ref_cross_entropy(z, labels, axis, reduction, smoothing)
    assert_close(loss, want_loss, dtype, SOFTMAX_TOLERANCE, "loss")
    assert_close(grad, want_grad, dtype, SOFTMAX_TOLERANCE, "dlogits")
    assert np.asarray(loss).dtype == dtype and grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("kind", ["soft", "one-hot", "unnormalized"])
def test_probability_targets_match_reference(rng, shape, axis, dtype, reduction, smoothing,
                                             kind):
    z = logits_for(rng, shape, dtype)
    if kind == "one-hot":
        labels = rng.integers(0, shape[axis], row_shape(shape, axis))
        target = np.moveaxis(np.eye(shape[axis], dtype=dtype)[labels], -1, axis)
    else:
        target = rng.random(shape).astype(dtype)
        if kind == "soft":
            target /= target.sum(axis=axis, keepdims=True)
    target = np.ascontiguousarray(target)
    loss, grad = fd.softmax_cross_entropy(z, target, axis=axis, reduction=reduction,
                                          label_smoothing=smoothing)
    want_loss, want_grad = ref_cross_entropy(z, target, axis, reduction, smoothing)
    assert_close(loss, want_loss, dtype, SOFTMAX_TOLERANCE, "loss")
    assert_close(grad, want_grad, dtype, SOFTMAX_TOLERANCE, "dlogits")


@pytest.mark.parametrize("label_dtype", [np.uint8, np.int16, np.int32, np.uint64])
def test_any_integer_label_dtype(rng, label_dtype):
    z = logits_for(rng, (50, 7), np.float32)
    labels = rng.integers(0, 7, 50)
    ignore = 255 if np.dtype(label_dtype).kind == "u" else -1
    labels[:3] = ignore
    loss, grad = fd.softmax_cross_entropy(z, labels.astype(label_dtype), ignore_index=ignore)
    want_loss, want_grad = ref_cross_entropy(z, labels, -1, "mean", 0.0, ignore)
    assert_close(loss, want_loss, np.float32, SOFTMAX_TOLERANCE)
    assert_close(grad, want_grad, np.float32, SOFTMAX_TOLERANCE)


@pytest.mark.parametrize("shape, axis", [((300, 100), -1), ((100, 300), 0), ((7, 33), -1)])
def test_out_logits_writes_the_gradient_over_the_logits(rng, shape, axis):
    z = logits_for(rng, shape, np.float32)
    labels = labels_for(rng, shape, axis)
    want_loss, want_grad = ref_cross_entropy(z, labels, axis, "mean", 0.1)
    loss, grad = fd.softmax_cross_entropy(z, labels, axis=axis, label_smoothing=0.1, out=z)
    assert grad is z
    assert_close(loss, want_loss, np.float32, SOFTMAX_TOLERANCE)
    assert_close(z, want_grad, np.float32, SOFTMAX_TOLERANCE)


@pytest.mark.parametrize("shape, axis", [((6, 5), -1), ((5, 6), 0)])
def test_extreme_logits_are_finite(shape, axis):
    z = np.zeros(shape, np.float32)
    z[...] = np.where(np.arange(z.size).reshape(shape) % 3 == 0, 3e4, -3e4)
    labels = np.arange(z.size // shape[axis]) % shape[axis]
    loss, grad = fd.softmax_cross_entropy(z, labels.reshape(row_shape(shape, axis)), axis=axis,
                                          reduction="none")
    want_loss, want_grad = ref_cross_entropy(z, labels.reshape(row_shape(shape, axis)), axis,
                                             "none")
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    assert_close(loss, want_loss, np.float32, SOFTMAX_TOLERANCE)
    assert_close(grad, want_grad, np.float32, SOFTMAX_TOLERANCE)
    assert np.all(np.isfinite(fd.log_softmax(z, axis=axis)))


def test_minus_inf_logits_get_zero_probability():
    z = np.array([[0.0, -np.inf, 1.0], [-np.inf, 2.0, -np.inf]], np.float32)
    p = fd.softmax(z)
    assert_close(p, ref_softmax(np.where(np.isinf(z), -1e30, z)), np.float32,
                 SOFTMAX_TOLERANCE)
    assert p[0, 1] == 0 and p[1, 1] == 1


def test_nan_logits_give_nan():
    z = np.array([[0.0, np.nan, 1.0], [1.0, 2.0, 3.0]], np.float32)
    loss, grad = fd.softmax_cross_entropy(z, np.array([0, 1]), reduction="none")
    assert np.isnan(loss[0]) and np.isfinite(loss[1])
    assert np.all(np.isnan(grad[0])) and np.all(np.isfinite(grad[1]))


def test_all_ignored_mean_is_nan_with_zero_gradient(rng):
    z = logits_for(rng, (4, 6), np.float32)
    loss, grad = fd.softmax_cross_entropy(z, np.full(4, -100))
    assert np.isnan(loss)
    assert np.all(grad == 0)
    loss, _ = fd.softmax_cross_entropy(z, np.full(4, -100), reduction="sum")
    assert loss == 0


@pytest.mark.parametrize("shape, axis", [((5, 4), -1), ((4, 3, 2), 1)])
@pytest.mark.parametrize("target_kind", ["index", "probability"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_gradient_is_the_numerical_derivative_of_the_loss(rng, shape, axis, target_kind,
                                                          weighted):
    z = logits_for(rng, shape, np.float64)
    if target_kind == "index":
        target = labels_for(rng, shape, axis, n_ignored=1)
    else:
        target = rng.random(shape)
    weight = weights_for(rng, shape[axis], np.float64) if weighted else None

    def loss_at(values):
        return float(fd.softmax_cross_entropy(values, target, axis=axis, label_smoothing=0.1,
                                              weight=weight)[0])

    _, grad = fd.softmax_cross_entropy(z, target, axis=axis, label_smoothing=0.1,
                                       weight=weight)
    numerical = np.zeros_like(z)
    h = 1e-6
    for i in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[i] += h
        down[i] -= h
        numerical[i] = (loss_at(up) - loss_at(down)) / (2 * h)
    assert np.max(np.abs(grad - numerical)) < 1e-8


@pytest.mark.parametrize("shape, axis", [((30, 10), -1), ((10, 300), 0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_population_equals_separate_calls(rng, shape, axis, reduction):
    n_models = 3
    z = logits_for(rng, (n_models,) + shape, np.float32)
    labels = np.stack([labels_for(rng, shape, axis, n_ignored=k) for k in range(n_models)])
    loss, grad = fd.softmax_cross_entropy(z, labels, axis=axis, reduction=reduction,
                                          population=True)
    expected_shape = (n_models,) + (row_shape(shape, axis) if reduction == "none" else ())
    assert np.shape(loss) == expected_shape
    for k in range(n_models):
        want_loss, want_grad = fd.softmax_cross_entropy(z[k], labels[k], axis=axis,
                                                        reduction=reduction)
        np.testing.assert_array_equal(loss[k], want_loss)
        np.testing.assert_array_equal(grad[k], want_grad)


def test_serial_and_parallel_kernels_agree(rng):
    """One shape each side of the parallel threshold gives the same per-row results, to the
    last bit or two: the two are separate compilations, and numba optimizes a parallel kernel
    loaded from its disk cache differently from a fresh one (numba issue 10617), which may
    change the order of a vectorized sum (fast-math's reassociation)."""
    z = logits_for(rng, (400, 50), np.float32)
    labels = labels_for(rng, (400, 50), -1)
    _, whole = fd.softmax_cross_entropy(z, labels, reduction="none")
    for lo in range(0, 400, 100):  # 5000 elements a call: the serial kernel
        _, part = fd.softmax_cross_entropy(z[lo:lo + 100], labels[lo:lo + 100],
                                           reduction="none")
        np.testing.assert_allclose(part, whole[lo:lo + 100], rtol=1e-6, atol=1e-9)


def test_exp_is_vectorized():
    """exp_fast compiles to packed (SIMD) float-to-int conversions: the polynomial exp
    vectorizes where math.exp (a libm call) does not."""
    from numba import njit

    from fastdl.kernels.config import FASTMATH
    from fastdl.kernels.floats import exp_fast

    @njit(fastmath=FASTMATH, error_model="numpy")
    def exp_all(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_fast(x[i])

    x = np.linspace(-100, 0, 1001).astype(np.float32)
    out = np.empty_like(x)
    exp_all(x, out)
    assert_close(out, np.exp(x.astype(np.float64)), np.float32, SOFTMAX_TOLERANCE)
    assembly = next(iter(exp_all.inspect_asm().values()))
    assert "cvttps2dq" in assembly and ("ymm" in assembly or "xmm" in assembly)


# -- class weights (weight=) -------------------------------------------------------------------

# rank 3 logits with the class axis first, in the middle and last; (C, m) and (m, C) each side of
# the parallel threshold
WEIGHT_LAYOUTS = [((4, 5, 6), -1), ((4, 5, 6), 0), ((4, 5, 6), 1), ((300, 100), -1),
                  ((100, 300), 0), ((7, 33), -1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("label_dtype", [np.int64, np.int16, np.uint8])
def test_weighted_index_targets_match_reference(rng, shape, axis, dtype, reduction, smoothing,
                                                label_dtype):
    z = logits_for(rng, shape, dtype)
    ignore = 255 if np.dtype(label_dtype).kind == "u" else -100
    labels = labels_for(rng, shape, axis, label_dtype, ignore_index=ignore, n_ignored=3)
    weight = weights_for(rng, shape[axis], dtype)
    loss, grad = fd.softmax_cross_entropy(z, labels, axis=axis, reduction=reduction,
                                          label_smoothing=smoothing, ignore_index=ignore,
                                          weight=weight)
    want_loss, want_grad = ref_cross_entropy(z, labels.astype(np.int64), axis, reduction,
                                             smoothing, ignore, weight=weight)
    assert_close(loss, want_loss, dtype, SOFTMAX_TOLERANCE, "loss")
    assert_close(grad, want_grad, dtype, SOFTMAX_TOLERANCE, "dlogits")
    assert np.asarray(loss).dtype == dtype and grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_probability_targets_match_reference(rng, shape, axis, dtype, reduction,
                                                      smoothing):
    z = logits_for(rng, shape, dtype)
    target = rng.random(shape).astype(dtype)  # rows do not sum to 1
    weight = weights_for(rng, shape[axis], dtype)
    loss, grad = fd.softmax_cross_entropy(z, target, axis=axis, reduction=reduction,
                                          label_smoothing=smoothing, weight=weight)
    want_loss, want_grad = ref_cross_entropy(z, target, axis, reduction, smoothing,
                                             weight=weight)
    assert_close(loss, want_loss, dtype, SOFTMAX_TOLERANCE, "loss")
    assert_close(grad, want_grad, dtype, SOFTMAX_TOLERANCE, "dlogits")


def test_weights_of_one_give_the_unweighted_results(rng):
    z = logits_for(rng, (40, 9), np.float64)
    labels = labels_for(rng, (40, 9), -1)
    for smoothing in (0.0, 0.1):
        plain = fd.softmax_cross_entropy(z, labels, label_smoothing=smoothing)
        weighted = fd.softmax_cross_entropy(z, labels, label_smoothing=smoothing,
                                            weight=np.ones(9))
        for got, want in zip(weighted, plain):
            assert_close(got, want, np.float64, SOFTMAX_TOLERANCE)
    # weight scales a row's loss and gradient, and the "mean" divides it out again
    weight = np.full(9, 2.5)
    loss, grad = fd.softmax_cross_entropy(z, labels, reduction="sum", weight=weight)
    want_loss, want_grad = fd.softmax_cross_entropy(z, labels, reduction="sum")
    assert_close(loss, 2.5 * want_loss, np.float64, SOFTMAX_TOLERANCE)
    assert_close(grad, 2.5 * want_grad, np.float64, SOFTMAX_TOLERANCE)


@pytest.mark.parametrize("shape, axis", [((300, 100), -1), ((100, 300), 0), ((4, 5, 6), 1)])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_weighted_out_logits_writes_the_gradient_over_the_logits(rng, shape, axis, kind):
    z = logits_for(rng, shape, np.float32)
    target = (labels_for(rng, shape, axis) if kind == "index"
              else rng.random(shape).astype(np.float32))
    weight = weights_for(rng, shape[axis], np.float32)
    want_loss, want_grad = ref_cross_entropy(z, target, axis, "mean", 0.1, weight=weight)
    loss, grad = fd.softmax_cross_entropy(z, target, axis=axis, label_smoothing=0.1, out=z,
                                          weight=weight)
    assert grad is z
    assert_close(loss, want_loss, np.float32, SOFTMAX_TOLERANCE)
    assert_close(z, want_grad, np.float32, SOFTMAX_TOLERANCE)


@pytest.mark.parametrize("shape, axis", [((30, 10), -1), ((10, 300), 0), ((4, 5, 6), 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("per_model", [False, True], ids=["shared", "per-model"])
def test_population_weights_equal_separate_calls(rng, shape, axis, reduction, kind, per_model):
    n_models = 3
    z = logits_for(rng, (n_models,) + shape, np.float32)
    if kind == "index":
        target = np.stack([labels_for(rng, shape, axis, n_ignored=k) for k in range(n_models)])
    else:
        target = rng.random((n_models,) + shape).astype(np.float32)
    weight = weights_for(rng, shape[axis], np.float32, (n_models,) if per_model else ())
    loss, grad = fd.softmax_cross_entropy(z, target, axis=axis, reduction=reduction,
                                          label_smoothing=0.1, population=True, weight=weight)
    for k in range(n_models):
        want_loss, want_grad = fd.softmax_cross_entropy(
            z[k], target[k], axis=axis, reduction=reduction, label_smoothing=0.1,
            weight=weight[k] if per_model else weight)
        np.testing.assert_array_equal(loss[k], want_loss)
        np.testing.assert_array_equal(grad[k], want_grad)
        ref_loss, ref_grad = ref_cross_entropy(z[k], target[k], axis, reduction, 0.1,
                                               weight=weight[k] if per_model else weight)
        assert_close(loss[k], ref_loss, np.float32, SOFTMAX_TOLERANCE, f"loss of model {k}")
        assert_close(grad[k], ref_grad, np.float32, SOFTMAX_TOLERANCE, f"dlogits of model {k}")


@pytest.mark.parametrize("shape, axis", [((4, 6), -1), ((6, 4), 0)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_zero_weight_sum_mean_is_nan(shape, axis, smoothing):
    """"mean" over rows whose labels weigh 0 in total is 0 / 0: a NaN loss, NaN gradients on
    the rows not ignored and 0 on the ignored ones (torch: tests/test_softmax_torch.py); all
    rows ignored: NaN with a zero gradient."""
    rng = np.random.default_rng(5)
    z = logits_for(rng, shape, np.float32)
    weight = np.array([0, 1, 1, 1, 1, 1][:shape[axis]], np.float32)
    labels = np.array([0, -100, 0, 0])
    loss, grad = fd.softmax_cross_entropy(z, labels, axis=axis, label_smoothing=smoothing,
                                          weight=weight)
    rows = np.moveaxis(grad, axis, -1)
    assert np.isnan(loss)
    assert np.all(np.isnan(rows[[0, 2, 3]])) and np.all(rows[1] == 0)
    loss, grad = fd.softmax_cross_entropy(z, np.full(4, -100), axis=axis,
                                          label_smoothing=smoothing, weight=weight)
    assert np.isnan(loss) and np.all(grad == 0)


def test_weighted_loss_layer_equals_the_function(rng):
    z = logits_for(rng, (2, 30, 10), np.float32)
    labels = rng.integers(0, 10, (2, 30))
    weight = weights_for(rng, 10, np.float32, (2,))
    layer = fd.nn.SoftmaxCrossEntropy(label_smoothing=0.1, population=2, weight=weight)
    loss = layer.forward(z, labels)
    want_loss, want_grad = fd.softmax_cross_entropy(z, labels, label_smoothing=0.1,
                                                    population=True, weight=weight)
    np.testing.assert_array_equal(loss, want_loss)
    np.testing.assert_array_equal(layer.backward(), want_grad)
    assert "weight=" in repr(layer)


# -- bad input: a clear error, nothing modified -----------------------------------------------

# (test id, error, keywords from labels [0, 1, 4, 2]) for logits (4, 5) float32
BAD_CALLS = [
    ("label out of range", ValueError, lambda labels: dict(target=np.array([0, 1, 7, 2]))),
    ("negative label", ValueError, lambda labels: dict(target=np.array([0, 1, -3, 2]))),
    ("labels shape", ValueError, lambda labels: dict(target=np.zeros(5, np.int64))),
    ("reduction", ValueError, lambda labels: dict(target=labels, reduction="average")),
    ("label_smoothing", ValueError, lambda labels: dict(target=labels, label_smoothing=1.5)),
    ("axis out of range", ValueError, lambda labels: dict(target=labels, axis=2)),
    ("probabilities shape", ValueError, lambda labels: dict(target=np.zeros((4, 6), np.float32))),
    ("probabilities dtype", TypeError, lambda labels: dict(target=np.zeros((4, 5), np.float64))),
    ("bool target", TypeError, lambda labels: dict(target=labels.astype(bool))),
    ("list target", TypeError, lambda labels: dict(target=labels.tolist())),
    ("ignore_index type", TypeError, lambda labels: dict(target=labels, ignore_index=1.5)),
    ("axis type", TypeError, lambda labels: dict(target=labels, axis=1.0)),
    ("out dtype", TypeError, lambda labels: dict(target=labels, out=np.empty((4, 5), np.float64))),
]


@pytest.mark.parametrize("name, error, make_kwargs", BAD_CALLS,
                         ids=[case[0] for case in BAD_CALLS])
def test_bad_input_is_a_clear_error_and_modifies_nothing(rng, name, error, make_kwargs):
    z = logits_for(rng, (4, 5), np.float32)
    kwargs = make_kwargs(np.array([0, 1, 4, 2]))
    kwargs.setdefault("out", z)
    before = z.copy()
    with pytest.raises(error) as info:
        fd.softmax_cross_entropy(z, **kwargs)
    assert "target" in str(info.value) or any(k in str(info.value) for k in kwargs)
    np.testing.assert_array_equal(z, before)


def test_bad_logits():
    with pytest.raises(TypeError, match="logits"):
        fd.softmax_cross_entropy(np.zeros((2, 3), np.int64), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="C-contiguous"):
        fd.softmax_cross_entropy(np.zeros((3, 2), np.float32).T, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="class axis"):
        fd.softmax_cross_entropy(np.zeros(3, np.float32), np.zeros(3, np.int64),
                                 population=True)
    with pytest.raises(TypeError, match="z"):
        fd.softmax([1.0, 2.0])
    with pytest.raises(ValueError, match="axis"):
        fd.log_softmax(np.zeros((2, 3), np.float32), axis=-3)


@pytest.mark.parametrize("shape, axis", [((30, 10), -1), ((10, 30), 0)])
def test_loss_layer_equals_the_function(rng, shape, axis):
    z = logits_for(rng, shape, np.float32)
    labels = labels_for(rng, shape, axis)
    layer = fd.nn.SoftmaxCrossEntropy(axis=axis, label_smoothing=0.1)
    loss = layer.forward(z, labels)
    want_loss, want_grad = ref_cross_entropy(z, labels, axis, "mean", 0.1)
    assert_close(loss, want_loss, np.float32, SOFTMAX_TOLERANCE, "loss")
    assert_close(layer.backward(), want_grad, np.float32, SOFTMAX_TOLERANCE, "dlogits")
    layer.forward(z, labels)
    assert_close(layer.backward(2.0), 2 * want_grad, np.float32, SOFTMAX_TOLERANCE, "2 dlogits")
    assert_close(layer.backward(2.0), 2 * want_grad, np.float32, SOFTMAX_TOLERANCE, "again")
    assert_close(layer.backward(), want_grad, np.float32, SOFTMAX_TOLERANCE, "back to 1")
    assert layer.params() == [] and layer.grads() == []
    with pytest.raises(ValueError, match="forward first"):
        fd.nn.SoftmaxCrossEntropy().backward()
