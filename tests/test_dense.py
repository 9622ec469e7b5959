"""fastdl's matrix products on the CPU (kernels/dense.py, through fastdl._dense): against the
NumPy reference in every form the Linear layer uses, for one model and for a population, and
with the same bits whatever the number of models and threads (model k of a population is the
model alone)."""

import numpy as np
import pytest

import fastdl as fd
from fastdl import _dense, nn

import reference as ref

OPS = _dense.ops("cpu")
SHAPES = [(5, 7, 9), (64, 64, 256), (42, 10, 128), (13, 3, 1), (256, 42, 64)]  # (M, P, N)
TOLERANCE = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def operands(rng, n_models, m, p, n, transpose_a, transpose_b, shared, dtype):
    """op(a) (K, M, P) and op(b) (K, P, N) as stored: transposed where asked, 2-D when shared."""
    a_shape = (p, m) if transpose_a else (m, p)
    b_shape = (n, p) if transpose_b else (p, n)
    a = rng.standard_normal(a_shape if shared == "a" else (n_models, *a_shape)).astype(dtype)
    b = rng.standard_normal(b_shape if shared == "b" else (n_models, *b_shape)).astype(dtype)
    return a, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("shared", [None, "a", "b"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_population_products_match_numpy(rng, shape, shared, transpose_a, transpose_b, dtype):
    m, p, n = shape
    a, b = operands(rng, 3, m, p, n, transpose_a, transpose_b, shared, dtype)
    out = np.empty((3, m, n), dtype)
    got = OPS.matmul(a, b, out, transpose_a, transpose_b)
    assert got is out
    want = np.matmul(a.swapaxes(-1, -2) if transpose_a else a,
                     b.swapaxes(-1, -2) if transpose_b else b, dtype=np.float64)
    np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), **TOLERANCE[dtype])


@pytest.mark.parametrize("transpose_a, transpose_b", [(False, True), (True, False),
                                                      (False, False)])
def test_model_k_has_the_bits_of_the_model_alone_on_any_number_of_threads(rng, transpose_a,
                                                                          transpose_b):
    """A population of 5 (parallel kernel) against each model alone (2-D, serial and
    parallel): the same sums in the same order."""
    m, p, n = 64, 128, 256
    a, b = operands(rng, 5, m, p, n, transpose_a, transpose_b, None, np.float32)
    population = OPS.matmul(a, b, np.empty((5, m, n), np.float32), transpose_a, transpose_b)
    for k in range(5):
        for threads in (1, 2):
            with fd.cpu_threads(threads):
                alone = OPS.matmul(a[k], b[k], np.empty((m, n), np.float32), transpose_a,
                                   transpose_b)
            np.testing.assert_array_equal(alone, population[k])


def test_large_products_go_to_blas():
    assert not _dense.blas_product(_dense.OWN_PRODUCT_MAX_MACS)
    assert _dense.blas_product(_dense.OWN_PRODUCT_MAX_MACS + 1)


# (K, n_in, m) inputs, one batch per model in the notes' layout, are left out: Linear.forward
# reads their features at axis 0 of the whole input (K), and rejects them
@pytest.mark.parametrize("feature_axis, shared_batch", [(-1, True), (-1, False), (0, True)])
def test_population_linear_matches_reference_per_model(rng, feature_axis, shared_batch):
    layer = nn.Linear(48, 32, feature_axis=feature_axis, population=4, seed=[1, 2, 3, 4])
    layer.b[...] = rng.standard_normal(layer.b.shape)
    shape = (20, 48) if feature_axis == -1 else (48, 20)
    x = rng.standard_normal(shape if shared_batch else (4, *shape)).astype(np.float32)
    y = layer.forward(x).copy()
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy).copy()
    for k in range(4):
        xk = x if shared_batch else x[k]
        np.testing.assert_allclose(y[k], ref.linear_forward(xk, layer.W[k], layer.b[k],
                                                            feature_axis), rtol=1e-5, atol=1e-5)
        want_dx, want_dW, want_db = ref.linear_backward(dy[k], xk, layer.W[k], feature_axis)
        np.testing.assert_allclose(dx[k], want_dx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.dW[k], want_dW, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.db[k], want_db, rtol=1e-5, atol=1e-5)
