"""Batch norm against the NumPy reference (tests/reference.py) and PyTorch: every layout, train
and test time, float32 and float64, gamma/beta None, serial and parallel kernels."""

import numpy as np
import pytest

import fastdl as fd

import reference
from helpers import ThreadRanks, assert_close

FORWARD = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}
GRADIENT = {np.float32: dict(rtol=2e-3, atol=2e-4), np.float64: dict(rtol=1e-9, atol=1e-11)}

# (shape, channel_axis): PyTorch's (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W); the notes'
# (features, examples); channels-last; small ones run the serial kernels, large the parallel.
LAYOUTS = [
    ((16, 5), 1), ((300, 128), 1), ((6, 4, 9), 1), ((4, 3, 5, 6), 1), ((8, 16, 12, 12), 1),
    ((2, 3, 4, 5, 6), 1), ((7, 50), 0), ((64, 600), 0), ((4, 5, 6, 3), -1),
    ((16, 12, 12, 16), -1), ((3, 4, 5), 2), ((5, 6, 7, 8), 2),
]
DTYPES = [np.float32, np.float64]


def layout_id(layout):
    shape, axis = layout
    return "x".join(map(str, shape)) + f"-axis{axis}"


def make(shape, axis, dtype, rng, mean=0.0, affine=True):
    x = (rng.standard_normal(shape) * 2 + mean).astype(dtype)
    c = shape[axis]
    gamma = rng.standard_normal(c).astype(dtype) if affine else None
    beta = rng.standard_normal(c).astype(dtype) if affine else None
    running = (rng.random(c).astype(dtype), (rng.random(c) + 0.5).astype(dtype))
    return x, gamma, beta, running


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout_id(lt) for lt in LAYOUTS])
def test_matches_reference(layout, dtype, training, affine, rng):
    shape, axis = layout
    x, gamma, beta, (rm, rv) = make(shape, axis, dtype, rng, affine=affine)
    rm0, rv0 = rm.copy(), rv.copy()
    y, cache = fd.batch_norm_forward(x, gamma, beta, rm, rv, training=training, momentum=0.2,
                                     eps=1e-3, channel_axis=axis)
    want, new_mean, new_var, saved = reference.batch_norm_forward(
        x, gamma, beta, rm0, rv0, training=training, momentum=0.2, eps=1e-3, channel_axis=axis)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, want, dtype, FORWARD, "y")
    if training:
        assert_close(rm, new_mean, dtype, FORWARD, "running_mean")
        assert_close(rv, new_var, dtype, FORWARD, "running_var")
    else:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dgamma, dbeta = fd.batch_norm_backward(dy, cache)
    want_dx, want_dgamma, want_dbeta = reference.batch_norm_backward(dy, saved)
    assert dx.dtype == dgamma.dtype == dbeta.dtype == dtype
    assert_close(dx, want_dx, dtype, GRADIENT, "dx")
    assert_close(dgamma, want_dgamma, dtype, GRADIENT, "dgamma")
    assert_close(dbeta, want_dbeta, dtype, GRADIENT, "dbeta")


def test_parallel_and_serial_kernels_are_both_exercised(rng):
    small = fd.batch_norm_forward(np.ones((16, 5)), None, None, None, None)[1].ops.plan
    large = fd.batch_norm_forward(rng.random((300, 128)), None, None, None, None)[1].ops.plan
    assert not small.parallel and large.parallel and large.items.shape[0] >= 2


@pytest.mark.parametrize("layout", [((6, 3, 4), 1), ((5, 4), 0), ((3, 2, 2, 3), -1)],
                         ids=layout_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_numerical_gradient(layout, training, rng):
    """Two-sided differences of L = sum(y * w) against backward's dx, dgamma, dbeta."""
    shape, axis = layout
    x, gamma, beta, (rm, rv) = make(shape, axis, np.float64, rng)
    w = rng.standard_normal(shape)

    def loss(x_, gamma_, beta_):
        y, _ = fd.batch_norm_forward(x_, gamma_, beta_, rm.copy(), rv.copy(),
                                     training=training, channel_axis=axis)
        return float(np.sum(y * w))

    _, cache = fd.batch_norm_forward(x, gamma, beta, rm.copy(), rv.copy(), training=training,
                                     channel_axis=axis)
    grads = fd.batch_norm_backward(w, cache)
    h = 1e-6
    for arg, grad in zip(range(3), grads):
        values = [x, gamma, beta][arg]
        numeric = np.zeros_like(values)
        for i in np.ndindex(values.shape):
            args = [x.copy(), gamma.copy(), beta.copy()]
            args[arg][i] += h
            up = loss(*args)
            args[arg][i] -= 2 * h
            numeric[i] = (up - loss(*args)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", [((40, 6), 1), ((4, 3, 50), 1), ((6, 70), 0),
                                    ((30, 200), 1)], ids=layout_id)
def test_population_equals_separate_calls(layout, rng):
    shape, axis = layout
    k = 3
    x = (rng.standard_normal((k, *shape)) + np.arange(k).reshape((k,) + (1,) * len(shape))
         ).astype(np.float32)
    c = shape[axis]
    gamma, beta = rng.standard_normal((k, c)).astype(np.float32), np.zeros((k, c), np.float32)
    rm, rv = np.zeros((k, c), np.float32), np.ones((k, c), np.float32)
    y, cache = fd.batch_norm_forward(x, gamma, beta, rm, rv, channel_axis=axis,
                                     population=True)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dgamma, dbeta = fd.batch_norm_backward(dy, cache)
    assert dgamma.shape == (k, c)
    for m in range(k):
        rm_k, rv_k = np.zeros(c, np.float32), np.ones(c, np.float32)
        y_k, cache_k = fd.batch_norm_forward(x[m], gamma[m], beta[m], rm_k, rv_k,
                                             channel_axis=axis)
        dx_k, dgamma_k, dbeta_k = fd.batch_norm_backward(dy[m], cache_k)
        for got, want in [(y[m], y_k), (rm[m], rm_k), (rv[m], rv_k), (dx[m], dx_k),
                          (dgamma[m], dgamma_k), (dbeta[m], dbeta_k)]:
            assert_close(got, want, np.float32, GRADIENT)


@pytest.mark.parametrize("layout", [((4096, 8), 1), ((64, 8, 32), 1), ((8, 4096), 0)],
                         ids=layout_id)
def test_variance_is_sound_at_mean_1e4_in_float32(layout, rng):
    """Mean 1e4, unit spread: E[x²] - E[x]² in float32 would lose every digit."""
    shape, axis = layout
    x = (rng.standard_normal(shape) + 1e4).astype(np.float32)
    c = shape[axis]
    rm, rv = np.zeros(c, np.float32), np.zeros(c, np.float32)
    y, cache = fd.batch_norm_forward(x, None, None, rm, rv, momentum=1.0, channel_axis=axis)
    want, _, want_var, saved = reference.batch_norm_forward(x, None, None, np.zeros(c),
                                                            np.zeros(c), momentum=1.0,
                                                            channel_axis=axis)
    assert_close(rv, want_var, np.float32, dict.fromkeys([np.float32], dict(rtol=1e-5, atol=0)))
    assert_close(y, want, np.float32, FORWARD, "y")
    dy = rng.standard_normal(shape).astype(np.float32)
    got = fd.batch_norm_backward(dy, cache)
    for g, w in zip(got, reference.batch_norm_backward(dy, saved)):
        assert_close(g, w, np.float32, GRADIENT)


def test_out_buffers_are_used(rng):
    x, gamma, beta, (rm, rv) = make((64, 32), 1, np.float32, rng)
    y_out, dx_out = np.empty_like(x), np.empty_like(x)
    y, cache = fd.batch_norm_forward(x, gamma, beta, rm, rv, out=y_out)
    assert y is y_out
    dy = rng.standard_normal(x.shape).astype(np.float32)
    want = fd.batch_norm_backward(dy, cache)[0]
    dx, _, _ = fd.batch_norm_backward(dy, cache, out=dx_out)
    assert dx is dx_out
    np.testing.assert_array_equal(dx, want)
    dx_in_place = fd.batch_norm_backward(dy, cache, out=dy)[0]  # dx may overwrite dy
    np.testing.assert_array_equal(dx_in_place, want)


class StubDevice:
    __cuda_array_interface__ = {}


# (test id, call on x (8, 4) float32 and c4 = ones(4), error, message)
BAD_CALLS = [
    ("one value per channel", lambda x, c4: fd.batch_norm_forward(
        np.ones((1, 4), np.float32), None, None, None, None), ValueError,
     "more than one value per channel"),
    ("gamma length", lambda x, c4: fd.batch_norm_forward(x, np.ones(3, np.float32), None, None,
                                                         None), ValueError,
     r"gamma must have shape \(4,\)"),
    ("beta dtype", lambda x, c4: fd.batch_norm_forward(x, None, np.ones(4), None, None),
     TypeError, "beta must have dtype float32"),
    ("running_var length", lambda x, c4: fd.batch_norm_forward(x, None, None, c4.copy(),
                                                               np.ones(5, np.float32)),
     ValueError, "running_var must have shape"),
    ("eval without stats", lambda x, c4: fd.batch_norm_forward(x, None, None, None, None,
                                                               training=False),
     ValueError, "running_mean and running_var are required"),
    ("channel_axis", lambda x, c4: fd.batch_norm_forward(x, None, None, None, None,
                                                         channel_axis=2),
     ValueError, r"channel_axis must be in \[-2, 2\)"),
    ("non-contiguous", lambda x, c4: fd.batch_norm_forward(np.ones((4, 8), np.float32).T, None,
                                                           None, None, None),
     ValueError, "ascontiguousarray"),
    ("rank 1", lambda x, c4: fd.batch_norm_forward(np.ones(8, np.float32), None, None, None,
                                                   None), ValueError, "rank 2 to 5"),
    ("integer x", lambda x, c4: fd.batch_norm_forward(np.ones((8, 4), np.int32), None, None,
                                                      None, None), TypeError, "float32"),
    ("host/device mix", lambda x, c4: fd.batch_norm_forward(x, StubDevice(), None, None, None),
     TypeError, "GPU array"),
    ("momentum", lambda x, c4: fd.batch_norm_forward(x, None, None, c4.copy(), c4.copy(),
                                                     momentum=1.5), ValueError, "momentum"),
    ("out shape", lambda x, c4: fd.batch_norm_forward(x, None, None, None, None,
                                                      out=np.empty((8, 5), np.float32)),
     ValueError, "out must have shape"),
    ("out overlaps x", lambda x, c4: fd.batch_norm_forward(x, None, None, None, None, out=x),
     ValueError, "overlap"),
]


@pytest.mark.parametrize("name, call, error, message", BAD_CALLS,
                         ids=[case[0] for case in BAD_CALLS])
def test_bad_input_raises_a_clear_error(name, call, error, message, rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    with pytest.raises(error, match=message):
        call(x, np.ones(4, np.float32))


def test_bad_input_leaves_running_statistics_alone(rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(ValueError):
        fd.batch_norm_forward(x, np.ones(5, np.float32), None, rm, rv)
    with pytest.raises(ValueError):
        fd.batch_norm_forward(x, None, None, rm, rv, eps=0.0)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_backward_checks_dy(rng):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    _, cache = fd.batch_norm_forward(x, None, None, None, None)
    with pytest.raises(ValueError, match="shape"):
        fd.batch_norm_backward(np.ones((8, 5), np.float32), cache)
    with pytest.raises(TypeError, match="dtype"):
        fd.batch_norm_backward(np.ones((8, 4)), cache)
    with pytest.raises(TypeError, match="BatchNormCache"):
        fd.batch_norm_backward(np.ones((8, 4), np.float32), (x,))


def test_batchnorm_layer_trains_and_evaluates(rng):
    layer = fd.nn.BatchNorm(6, channel_axis=1)
    assert [p.shape for p in layer.params()] == [(6,), (6,)]
    x = rng.standard_normal((32, 6, 4)).astype(np.float32) * 3 + 2
    y = layer.forward(x)
    want, new_mean, new_var, saved = reference.batch_norm_forward(
        x, np.ones(6), np.zeros(6), np.zeros(6), np.ones(6))
    assert_close(y, want, np.float32, FORWARD)
    assert_close(layer.running_mean, new_mean, np.float32, FORWARD)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = layer.backward(dy)
    want_dx, want_dgamma, want_dbeta = reference.batch_norm_backward(dy, saved)
    assert_close(dx, want_dx, np.float32, GRADIENT)
    assert_close(layer.grads()[0], want_dgamma, np.float32, GRADIENT)
    assert_close(layer.grads()[1], want_dbeta, np.float32, GRADIENT)
    # eval: running statistics, not updated
    layer.eval()
    before = layer.running_mean.copy()
    y_eval = layer.forward(x)
    np.testing.assert_array_equal(layer.running_mean, before)
    want_eval = reference.batch_norm_forward(x, np.ones(6), np.zeros(6), layer.running_mean,
                                             layer.running_var, training=False)[0]
    assert_close(y_eval, want_eval, np.float32, FORWARD)


def test_batchnorm_layer_uses_given_storage_and_steps_with_an_optimizer(rng):
    params = fd.optim.flat_params([(4,), (4,)], np.float32)
    grads = fd.optim.flat_params([(4,), (4,)], np.float32)
    layer = fd.nn.BatchNorm(4, channel_axis=0, storage=params, grad_storage=grads)
    assert layer.params()[0] is params[0] and np.all(params[0] == 1) and np.all(params[1] == 0)
    opt = fd.optim.SGD(layer.params(), lr=0.1)
    x = rng.standard_normal((4, 50)).astype(np.float32)
    layer.forward(x)
    layer.backward(np.ones_like(x))
    opt.step(layer.grads())
    np.testing.assert_allclose(params[1], -0.1 * 50)  # dbeta = sum(dy) = 50
    with pytest.raises(ValueError, match="storage"):
        fd.nn.BatchNorm(4, storage=[np.zeros(3, np.float32), np.zeros(4, np.float32)])


@pytest.mark.parametrize("world, n_rows", [(2, 16), (3, 7), (3, 2), (1, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_synchronized_batch_norm_equals_one_process_on_the_whole_batch(world, n_rows, dtype):
    """comm= (data-parallel training): each rank's rows normalized with the global batch's
    statistics, dx from its global sums, running statistics the whole batch's (ranks as
    threads here; tests/test_distributed.py runs the same under mpiexec)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((n_rows, 4, 3)) * 2 + 1e2).astype(dtype)  # mean >> spread
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, 4).astype(dtype), rng.standard_normal(4).astype(dtype)
    want_y, *want_stats, saved = reference.batch_norm_forward(x, gamma, beta, np.zeros(4),
                                                                 np.ones(4))
    want_dx, want_dgamma, want_dbeta = reference.batch_norm_backward(dy, saved)
    tol = FORWARD[dtype]

    def rank(comm):
        lo, hi = n_rows * comm.rank // world, n_rows * (comm.rank + 1) // world
        stats = [np.zeros(4, dtype), np.ones(4, dtype)]
        y, cache = fd.batch_norm_forward(np.ascontiguousarray(x[lo:hi]), gamma, beta, *stats,
                                         comm=comm)
        dx, dgamma, dbeta = fd.batch_norm_backward(np.ascontiguousarray(dy[lo:hi]), cache)
        return y, dx, dgamma, dbeta, stats

    results = ThreadRanks(world).run(rank)
    np.testing.assert_allclose(np.concatenate([r[0] for r in results]), want_y, **tol)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), want_dx,
                               **GRADIENT[dtype])
    # dgamma, dbeta: each rank's own share, which the gradient allreduce adds up
    np.testing.assert_allclose(sum(r[2].astype(np.float64) for r in results), want_dgamma,
                               **GRADIENT[dtype])
    np.testing.assert_allclose(sum(r[3].astype(np.float64) for r in results), want_dbeta,
                               **GRADIENT[dtype])
    for r in results:
        for got, want, first in zip(r[4], want_stats, results[0][4]):
            np.testing.assert_allclose(got, want, **tol)
            np.testing.assert_array_equal(got, first)  # the same bits on every rank
