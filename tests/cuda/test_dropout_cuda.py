"""Dropout on device arrays: the same mask as the CPU for the same seed (whatever the grid),
outputs against the NumPy reference."""

import numpy as np
import pytest

import fastdl as fd
from fastdl.device import is_device_array
from fastdl.kernels import cudalib

import reference

cuda = cudalib.cuda


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(7,), (9, 30)])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_mask_equals_cpu_and_reference(shape, dtype, p):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    cudalib.LAUNCHES.clear()
    y, mask = fd.dropout_forward(cuda.to_device(x), p, seed=2024)
    assert is_device_array(y) and is_device_array(mask)
    assert cudalib.LAUNCHES["dropout_forward_cuda"] == 1
    _, cpu_mask = fd.dropout_forward(x, p, seed=2024)
    np.testing.assert_array_equal(mask.copy_to_host(), cpu_mask)
    np.testing.assert_array_equal(mask.copy_to_host(), reference.dropout_mask(shape, p, 2024))
    np.testing.assert_array_equal(y.copy_to_host(), reference.dropout(x, cpu_mask, p))
    dy = rng.standard_normal(shape).astype(dtype)
    dx = fd.dropout_backward(cuda.to_device(dy), mask, p)
    assert cudalib.LAUNCHES["dropout_backward_cuda"] == 1
    np.testing.assert_array_equal(dx.copy_to_host(), reference.dropout(dy, cpu_mask, p))


def test_population_with_per_model_rates():
    rates = np.array([0.0, 0.5, 1.0])
    x = np.random.default_rng(5).standard_normal((3, 40)).astype(np.float32)
    y, mask = fd.dropout_forward(cuda.to_device(x), rates, seed=9, population=True)
    want_mask = reference.dropout_mask(x.shape, rates, 9)
    np.testing.assert_array_equal(mask.copy_to_host(), want_mask)
    np.testing.assert_array_equal(y.copy_to_host(), reference.dropout(x, want_mask, rates))


def test_mask_on_the_host_is_an_error():
    x = cuda.to_device(np.ones((4, 3), np.float32))
    _, mask = fd.dropout_forward(np.ones((4, 3), np.float32), 0.5, seed=1)
    with pytest.raises(TypeError, match="one device"):
        fd.dropout_backward(x, mask, 0.5)


@pytest.mark.parametrize("shape, axis", [((6, 5), 0), ((5, 6), -1)])
def test_rows_of_a_global_batch_match_the_cpu(shape, axis):
    """Data-parallel rows (fastdl.dropout.Rows) index the same global positions on the GPU."""
    from fastdl.dropout import Rows

    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    first, end = 2, 5
    part = np.ascontiguousarray(np.take(x, range(first, end), axis=axis))
    rows = Rows(first, shape[axis], axis)
    _, mask = fd.dropout_forward(cuda.to_device(part), 0.5, seed=3, rows=rows)
    _, cpu_mask = fd.dropout_forward(part, 0.5, seed=3, rows=rows)
    np.testing.assert_array_equal(mask.copy_to_host(), cpu_mask)
    _, whole = fd.dropout_forward(x, 0.5, seed=3)
    np.testing.assert_array_equal(cpu_mask, np.take(whole, range(first, end), axis=axis))
