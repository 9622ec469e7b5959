"""The training toolkit on the CPU: layers against the NumPy reference, gradient checks of every
layer and of whole networks in both layouts, Sequential's flat buffers, data handling, early
stopping."""

import numpy as np
import pytest

import fastdl as fd
from fastdl import nn
from fastdl.gradcheck import check_layer, numerical_gradient, relative_difference

import reference as ref

LAYOUTS = [-1, 0]  # batch-first (N, features); the notes' (features, examples)
GOOD = 1e-6  # the notes: ~1e-7 is right, ~1e-3 a bug (float64, eps 1e-6)


def batch(rng, n_features, m, feature_axis, dtype=np.float64):
    shape = (m, n_features) if feature_axis == -1 else (n_features, m)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("feature_axis", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(rng, feature_axis, dtype, bias):
    layer = nn.Linear(7, 4, bias=bias, feature_axis=feature_axis, dtype=dtype, seed=1)
    if bias:
        layer.b[...] = rng.standard_normal(4)
    x = batch(rng, 7, 5, feature_axis, dtype)
    y = layer.forward(x)
    b = layer.b if bias else None
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, ref.linear_forward(x, layer.W, b, feature_axis), **tol)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    want_dx, want_dW, want_db = ref.linear_backward(dy, x, layer.W, feature_axis)
    np.testing.assert_allclose(dx, want_dx, **tol)
    np.testing.assert_allclose(layer.dW, want_dW, **tol)
    if bias:
        np.testing.assert_allclose(layer.db, want_db, **tol)
    assert len(layer.params()) == len(layer.grads()) == (2 if bias else 1)


@pytest.mark.parametrize("init, variance", [("he", 2.0), ("xavier", 1.0)])
def test_initialization_scale(init, variance):
    W = nn.Linear(500, 400, init=init, seed=0).W
    assert W.dtype == np.float32
    assert abs(W.mean()) < 0.003
    np.testing.assert_allclose(W.var() * 500, variance, rtol=0.02)
    np.testing.assert_array_equal(W, nn.Linear(500, 400, init=init, seed=0).W)


@pytest.mark.parametrize("layer, reference_forward, reference_backward", [
    (nn.ReLU(), ref.relu, lambda dy, x, y: ref.relu_backward(dy, x)),
    (nn.Tanh(), np.tanh, lambda dy, x, y: ref.tanh_backward(dy, y)),
])
def test_activations_match_reference(rng, layer, reference_forward, reference_backward):
    x = rng.standard_normal((6, 9))
    y = layer.forward(x)
    np.testing.assert_allclose(y, reference_forward(x), rtol=1e-14)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(layer.backward(dy), reference_backward(dy, x, y), rtol=1e-14)


@pytest.mark.parametrize("feature_axis", LAYOUTS)
@pytest.mark.parametrize("make", [
    lambda axis: nn.Linear(6, 4, feature_axis=axis, dtype=np.float64, seed=3),
    lambda axis: nn.Linear(6, 4, feature_axis=axis, dtype=np.float64, init="xavier",
                           bias=False),
    lambda axis: nn.ReLU(),
    lambda axis: nn.Tanh(),
    lambda axis: nn.BatchNorm(6, channel_axis=1 if axis == -1 else 0, dtype=np.float64),
], ids=["linear", "linear-xavier-nobias", "relu", "tanh", "batchnorm"])
def test_gradient_check_of_each_layer(rng, make, feature_axis):
    layer = make(feature_axis)
    x = batch(rng, 6, 12, feature_axis)
    if isinstance(layer, nn.BatchNorm):  # non-trivial gamma and beta
        layer.gamma[...] = rng.standard_normal(6)
        layer.beta[...] = rng.standard_normal(6)
    diffs = check_layer(layer, x)
    assert max(diffs.values()) < GOOD, diffs


def test_gradient_check_of_dropout_with_its_mask_held(rng):
    layer = nn.Dropout(0.3, seed=4)
    x = rng.standard_normal((10, 8))

    def forward_same_mask(x_):
        layer.calls = 0  # the same (seed, call) each time: the same mask
        return layer.forward(x_)

    r = rng.standard_normal(x.shape)
    forward_same_mask(x)
    analytic = layer.backward(r)
    numeric = numerical_gradient(lambda: np.sum(forward_same_mask(x) * r), x)
    assert relative_difference(analytic, numeric) < GOOD


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("target", ["index", "prob"])
def test_gradient_check_of_the_loss_layer(rng, axis, target):
    z = rng.standard_normal((7, 5) if axis == -1 else (5, 7))
    if target == "index":
        y = rng.integers(0, 5, 7)
    else:
        y = rng.random(z.shape)
    diffs = check_layer(nn.SoftmaxCrossEntropy(axis=axis, label_smoothing=0.1), z, target=y)
    assert diffs["x"] < GOOD, diffs


def deep_network(feature_axis, dtype=np.float64, dropout=0.0):
    channel_axis = 1 if feature_axis == -1 else 0
    return nn.Sequential(
        nn.Linear(5, 8, bias=False, feature_axis=feature_axis, dtype=dtype, seed=1),
        nn.BatchNorm(8, channel_axis=channel_axis, dtype=dtype), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(8, 6, feature_axis=feature_axis, dtype=dtype, seed=2, init="xavier"),
        nn.Tanh(),
        nn.Linear(6, 3, feature_axis=feature_axis, dtype=dtype, seed=3))


@pytest.mark.parametrize("feature_axis", LAYOUTS)
def test_gradient_check_of_a_whole_network(rng, feature_axis):
    model = deep_network(feature_axis)
    x = batch(rng, 5, 16, feature_axis)
    labels = rng.integers(0, 3, 16)
    loss = nn.SoftmaxCrossEntropy(axis=feature_axis)
    diffs = check_layer(model, x, target=labels, loss=loss)
    assert len(diffs) == 1 + 7  # x, 3 weights, gamma, beta, two biases
    assert max(diffs.values()) < GOOD, diffs


def test_gradient_check_finds_a_wrong_gradient(rng):
    class Wrong(nn.ReLU):
        def backward(self, dout):
            return super().backward(dout) * 1.01  # a 1 % error

    diffs = check_layer(Wrong(), rng.standard_normal((4, 5)))
    assert diffs["x"] > 1e-3


def test_both_layouts_compute_the_same_network(rng):
    x = rng.standard_normal((16, 5))
    labels = rng.integers(0, 3, 16)
    results = []
    for feature_axis, x_ in [(-1, x), (0, np.ascontiguousarray(x.T))]:
        model = deep_network(feature_axis)
        loss_fn = nn.SoftmaxCrossEntropy(axis=feature_axis)
        loss = loss_fn.forward(model.forward(x_), labels)
        model.backward(loss_fn.backward())
        results.append((loss, [g.copy() for g in model.grads()]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_sequential_keeps_params_and_grads_in_one_buffer_each():
    model = deep_network(-1, np.float32)
    params, grads = model.params(), model.grads()
    assert [p.shape for p in params] == [(8, 5), (6, 8), (3, 6), (8,), (8,), (6,), (3,)]
    offset = 0
    for p, g in zip(params, grads):
        assert np.shares_memory(p, model.flat_params) and np.shares_memory(g, model.flat_grads)
        assert p.__array_interface__["data"][0] == (model.flat_params.__array_interface__[
            "data"][0] + 4 * offset)
        offset += p.size
    assert offset == model.flat_params.size
    groups = model.param_groups(weight_decay=0.01)
    assert [len(g["params"]) for g in groups] == [3, 4]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    # the layers were rebound: the model trains what the optimizer updates
    assert model.layers[0].W is not None and np.shares_memory(model.layers[0].W, params[0])


def test_sequential_step_with_an_optimizer_equals_the_reference(rng):
    """One Adam step through Sequential's flat buffers and param groups equals the reference
    optimizer applied to the same gradients (weight decay on the weights only)."""
    model = deep_network(-1, np.float64)
    before = [p.copy() for p in model.params()]
    opt = fd.optim.Adam(model.param_groups(weight_decay=0.1), lr=0.01)
    x, labels = rng.standard_normal((16, 5)), rng.integers(0, 3, 16)
    loss_fn = nn.SoftmaxCrossEntropy()
    loss_fn.forward(model.forward(x), labels)
    model.backward(loss_fn.backward())
    grads = [g.copy() for g in model.grads()]
    opt.step(model.grads())
    want = ref.ReferenceOptimizer("adam", before, groups=[([0, 1, 2], dict(lr=0.01,
                                                                          weight_decay=0.1)),
                                                          ([3, 4, 5, 6], dict(lr=0.01))])
    want.step(grads)
    for got, expected in zip(model.params(), want.params):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_eval_mode_uses_running_statistics_and_no_dropout(rng):
    model = deep_network(-1, np.float64, dropout=0.5)
    x = rng.standard_normal((16, 5))
    model.forward(x)
    model.eval()
    assert all(not layer.training for layer in model.layers)
    first = model.forward(x).copy()
    np.testing.assert_array_equal(model.forward(x), first)  # deterministic: no dropout
    # per-example: running stats (to rounding: BLAS may sum a 3-row product in another order)
    np.testing.assert_allclose(model.forward(x[:3]), first[:3], rtol=1e-12, atol=1e-14)
    model.train()
    assert all(layer.training for layer in model.layers)


@pytest.mark.parametrize("call, error, match", [
    (lambda: nn.Linear(0, 3), ValueError, "n_in"),
    (lambda: nn.Linear(2.5, 3), TypeError, "n_in"),
    (lambda: nn.Linear(4, 3, init="glorot"), ValueError, "init"),
    (lambda: nn.Linear(4, 3, feature_axis=2), ValueError, "feature_axis"),
    (lambda: nn.Linear(4, 3, dtype=np.int32), TypeError, "dtype"),
    (lambda: nn.Linear(4, 3).forward(np.zeros((2, 5), np.float32)), ValueError, "4 features"),
    (lambda: nn.Linear(4, 3).forward(np.zeros((2, 4), np.float64)), TypeError, "float32"),
    (lambda: nn.Linear(4, 3).forward(np.zeros(4, np.float32)), ValueError, "rank 2"),
    (lambda: nn.Linear(4, 3).backward(np.zeros((2, 3), np.float32)), ValueError, "forward"),
    (lambda: nn.Sequential(nn.Linear(4, 3), "relu"), TypeError, "layers\\[1\\]"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2, dtype=np.float64)), ValueError,
     "one dtype"),
    (lambda: nn.EarlyStopping(nn.ReLU(), patience=0), ValueError, "patience"),
])
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_linear_backward_checks_dout_shape(rng):
    layer = nn.Linear(4, 3)
    layer.forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="dout must have shape \\(2, 3\\)"):
        layer.backward(np.zeros((3, 3), np.float32))


# -- data ----------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1])
def test_minibatches_cover_every_example_once(axis):
    m = 103
    X = np.arange(m * 2, dtype=np.float32).reshape(m, 2)
    X = X if axis == 0 else np.ascontiguousarray(X.T)
    Y = np.arange(m)
    batches = list(fd.data.minibatches(X, Y, batch_size=16, seed=3, axis=axis))
    assert [len(y) for _, y in batches] == [16] * 6 + [7]  # the last, smaller batch kept
    seen = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(np.sort(seen), Y)
    assert not np.array_equal(seen, Y)  # shuffled
    for xb, yb in batches:
        assert xb.flags.c_contiguous
        np.testing.assert_array_equal(xb, np.take(X, yb, axis=axis))  # examples stay paired
    again = [y for _, y in fd.data.minibatches(X, Y, batch_size=16, seed=3, axis=axis)]
    np.testing.assert_array_equal(np.concatenate(again), seen)  # seeded
    other = np.concatenate([y for _, y in fd.data.minibatches(X, Y, 16, seed=4, axis=axis)])
    assert not np.array_equal(other, seen)


def test_split_is_disjoint_and_complete():
    X = np.arange(200, dtype=np.float64).reshape(100, 2)
    Y = np.arange(100)
    (Xa, ya), (Xb, yb), (Xc, yc) = fd.data.train_dev_test_split(X, Y, (0.6, 0.2, 0.2), seed=1)
    assert (len(ya), len(yb), len(yc)) == (60, 20, 20)
    np.testing.assert_array_equal(np.sort(np.concatenate([ya, yb, yc])), Y)
    np.testing.assert_array_equal(Xa[:, 0], 2 * ya)
    with pytest.raises(ValueError, match="fractions"):
        fd.data.train_dev_test_split(X, Y, (0.6, 0.6, 0.2))
    with pytest.raises(ValueError, match="examples"):
        fd.data.train_dev_test_split(X, Y[:50])


def test_normalization_is_fitted_on_the_training_split_only(rng):
    train = rng.standard_normal((500, 3)) * [1.0, 5.0, 0.0] + [10.0, -2.0, 7.0]
    dev = rng.standard_normal((50, 3)) * 100 + 1000  # would move any statistics it entered
    scaler = fd.data.Standardizer().fit(train)
    np.testing.assert_allclose(scaler.mean.ravel(), train.mean(axis=0))
    np.testing.assert_allclose(scaler.transform(dev), (dev - train.mean(axis=0)) / np.where(
        train.std(axis=0) > 1e-8, train.std(axis=0), 1.0))
    z = scaler.transform(train)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), [1, 1, 0], atol=1e-12)  # no spread: centered
    notes = fd.data.Standardizer(axis=1).fit(np.ascontiguousarray(train.T))
    np.testing.assert_allclose(notes.transform(np.ascontiguousarray(dev.T)),
                               scaler.transform(dev).T)


def test_early_stopping_stops_after_patience_and_restores_the_best():
    model = nn.Sequential(nn.Linear(2, 2, dtype=np.float64, seed=0))
    stopper = nn.EarlyStopping(model, patience=2)
    best = None
    for epoch, dev_loss in enumerate([1.0, 0.5, 0.6, 0.55]):
        if dev_loss == 0.5:
            best = [p.copy() for p in model.params()]
        stop = stopper.step(dev_loss)
        for p in model.params():
            p += 1.0  # training moves on
        assert stop == (epoch == 3)
    assert stopper.best_epoch == 1
    stopper.restore()
    for p, b in zip(model.params(), best):
        np.testing.assert_array_equal(p, b)


def test_backward_without_the_input_gradient_writes_the_same_parameter_gradients(rng):
    x, labels = rng.standard_normal((16, 5)), rng.integers(0, 3, 16)
    grads = []
    for input_grad in (True, False):
        model = deep_network(-1)
        loss_fn = nn.SoftmaxCrossEntropy()
        loss_fn.forward(model.forward(x), labels)
        dx = model.backward(loss_fn.backward(), input_grad=input_grad)
        assert (dx is None) == (not input_grad)
        grads.append([g.copy() for g in model.grads()])
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)


def test_kernels_run_serially_while_blas_threads_spin_after_a_layers_product(monkeypatch):
    """An optimizer step right after a backward of fastdl's layers runs its serial kernel
    (BLAS's threads still hold the cores: kernels/config.py), without fd.cpu_threads(1)."""
    import numba

    from fastdl.kernels import config

    if numba.get_num_threads() < 2:
        pytest.skip("one thread: every kernel runs serially anyway")
    small, large = nn.Linear(64, 64, seed=0), nn.Linear(1024, 1024, seed=0)
    opt = fd.optim.Adam([np.zeros(1 << 20, np.float32)])
    monkeypatch.setattr(config, "_last_blas_product", -np.inf)
    assert config.use_parallel(1 << 20) and opt._ops._parallel_now()
    small.forward(np.ones((8, 64), np.float32))  # fastdl's own product kernel: no BLAS pool
    assert config.use_parallel(1 << 20)
    large.forward(np.ones((32, 1024), np.float32))  # 2**25 multiply-adds: BLAS
    assert not config.use_parallel(1 << 20) and not opt._ops._parallel_now()
    monkeypatch.setattr(config, "BLAS_SPIN_SECONDS", 0.0)
    assert config.use_parallel(1 << 20)
