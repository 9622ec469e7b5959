"""Inverted dropout on the CPU: the mask against the NumPy reference of the generator, keep-rate
statistics, reproducibility across thread counts, populations, and bad input."""

import math

import numba
import numpy as np
import pytest

import fastdl as fd
from fastdl.dropout import Rows
from fastdl.kernels import dropout as kernels

from reference import dropout as ref_dropout
from reference import dropout_mask as ref_mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (33, 5), (200, 300), (4, 3, 50, 50)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_mask_and_output_match_reference(rng, shape, dtype, p):
    x = rng.standard_normal(shape).astype(dtype)
    y, mask = fd.dropout_forward(x, p, seed=1234)
    assert mask.dtype == np.bool_ and mask.shape == x.shape
    np.testing.assert_array_equal(mask, ref_mask(shape, p, 1234))
    np.testing.assert_array_equal(y, ref_dropout(x, mask, p))
    dy = rng.standard_normal(shape).astype(dtype)
    np.testing.assert_array_equal(fd.dropout_backward(dy, mask, p), ref_dropout(dy, mask, p))


def test_p_zero_is_identity_and_p_one_is_zeros(rng):
    x = rng.standard_normal((50, 40)).astype(np.float32)
    y, mask = fd.dropout_forward(x, 0.0, seed=3)
    np.testing.assert_array_equal(y, x)
    assert mask.all()
    y, mask = fd.dropout_forward(x, 1.0, seed=3)
    assert not y.any() and not mask.any()
    assert not fd.dropout_backward(x, mask, 1.0).any()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8])
def test_keep_rate_within_four_standard_errors(p):
    n = 1_000_000
    _, mask = fd.dropout_forward(np.ones(n, np.float32), p, seed=99)
    keep = 1 - p
    assert abs(mask.mean() - keep) <= 4 * math.sqrt(keep * p / n)
    # neighbouring elements are independent: P(both kept) = keep**2
    both = np.mean(mask[1:] & mask[:-1])
    assert abs(both - keep**2) <= 4 * math.sqrt(keep**2 * (1 - keep**2) / n)


def test_same_seed_same_mask_on_any_thread_count(rng):
    x = rng.standard_normal((1000, 200)).astype(np.float32)
    _, first = fd.dropout_forward(x, 0.4, seed=7)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        _, single = fd.dropout_forward(x, 0.4, seed=7)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(first, single)
    # the serial kernel (small arrays) draws the same bits for the same indices
    _, small = fd.dropout_forward(x[:10], 0.4, seed=7)
    np.testing.assert_array_equal(small, first[:10])
    _, other = fd.dropout_forward(x, 0.4, seed=8)
    assert np.mean(other != first) > 0.4


def test_cpu_generator_equals_the_plain_python_one():
    """The CPU kernels' 32-bit LLVM hash equals ``uniform_bits`` (what CUDA runs), also for
    indices past 2**32."""
    from numba import njit

    @njit
    def keep_all(indices, key_low, key_high, threshold, out):
        for i in range(indices.shape[0]):
            out[i] = kernels._keep_cpu(indices[i], key_low, key_high, threshold)

    indices = np.array([0, 1, 2, 1000, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**45 + 3],
                       np.int64)
    for key_low, key_high, threshold in [(0, 0, 2**23), (12345, 678, 1000), (2**32 - 1, 5, 2**24)]:
        got = np.empty(indices.shape, np.bool_)
        keep_all(indices, key_low, key_high, threshold, got)
        want = [kernels.uniform_bits(int(i), key_low, key_high) >= threshold for i in indices]
        np.testing.assert_array_equal(got, want)


def test_population_with_per_model_rates(rng):
    rates = np.array([0.0, 0.25, 0.5, 1.0])
    x = rng.standard_normal((4, 100, 50)).astype(np.float32)
    y, mask = fd.dropout_forward(x, rates, seed=5, population=True)
    np.testing.assert_array_equal(mask, ref_mask(x.shape, rates, 5))
    np.testing.assert_array_equal(y, ref_dropout(x, mask, rates))
    np.testing.assert_array_equal(fd.dropout_backward(x, mask, rates), ref_dropout(x, mask, rates))
    assert mask[0].all() and not mask[3].any()


def test_out_buffers_and_in_place_backward(rng):
    x = rng.standard_normal((300, 100)).astype(np.float32)
    y_buffer, mask_buffer = np.empty_like(x), np.empty(x.shape, np.bool_)
    y, mask = fd.dropout_forward(x, 0.3, seed=1, out=y_buffer, mask_out=mask_buffer)
    assert y is y_buffer and mask is mask_buffer
    dy = x.copy()
    dx = fd.dropout_backward(dy, mask, 0.3, out=dy)
    assert dx is dy
    np.testing.assert_array_equal(dx, ref_dropout(x, mask, 0.3))


def test_inf_times_dropped_is_nan_as_x_times_mask():
    x = np.full(64, np.inf, np.float32)
    y, mask = fd.dropout_forward(x, 0.5, seed=2)
    assert np.all(np.isnan(y[~mask])) and np.all(y[mask] == np.inf)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, m: fd.dropout_forward(x, 1.5, 0), ValueError, "p"),
    (lambda x, m: fd.dropout_forward(x, -0.1, 0), ValueError, "p"),
    (lambda x, m: fd.dropout_forward(x, 0.5, 1.5), TypeError, "seed"),
    (lambda x, m: fd.dropout_forward(x.astype(np.int32), 0.5, 0), TypeError, "x"),
    (lambda x, m: fd.dropout_forward(x.T, 0.5, 0), ValueError, "C-contiguous"),
    (lambda x, m: fd.dropout_forward(x, [0.1, 0.2], 0), ValueError, "population"),
    (lambda x, m: fd.dropout_forward(x, [0.1, 0.2], 0, population=True), ValueError, "p"),
    (lambda x, m: fd.dropout_forward(x, 0.5, 0, out=np.empty((3, 4), x.dtype)), ValueError, "out"),
    (lambda x, m: fd.dropout_forward(x, 0.5, 0, mask_out=np.empty(x.shape)), TypeError,
     "mask_out"),
    (lambda x, m: fd.dropout_backward(x, m[:2], 0.5), ValueError, "mask"),
    (lambda x, m: fd.dropout_backward(x, m.astype(np.uint8), 0.5), TypeError, "mask"),
    (lambda x, m: fd.dropout_backward(x, m, [0.5, 0.5]), ValueError, "p"),
])
def test_bad_input_is_a_clear_error(rng, call, error, match):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    _, mask = fd.dropout_forward(x, 0.5, 0)
    with pytest.raises(error, match=match):
        call(x, mask)


def test_dropout_layer_trains_with_fresh_masks_and_is_identity_in_eval(rng):
    x = rng.standard_normal((64, 50)).astype(np.float32)
    layer = fd.nn.Dropout(0.4, seed=11)
    y1 = layer.forward(x).copy()
    mask1 = layer._mask.copy()
    np.testing.assert_array_equal(y1, ref_dropout(x, mask1, 0.4))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(layer.backward(dy), ref_dropout(dy, mask1, 0.4))
    y2 = layer.forward(x)
    assert np.mean(layer._mask != mask1) > 0.3  # a new mask every step
    # reproducible from the seed
    again = fd.nn.Dropout(0.4, seed=11)
    np.testing.assert_array_equal(again.forward(x), y1)
    assert not np.array_equal(y2, y1)
    layer.eval()
    assert layer.forward(x) is x and layer.backward(dy) is dy
    assert layer.train() is layer and layer.forward(x) is not x
    assert layer.params() == [] and layer.grads() == []


def test_dropout_layer_population_rates(rng):
    x = rng.standard_normal((3, 20, 10)).astype(np.float32)
    layer = fd.nn.Dropout([0.0, 0.5, 1.0], seed=2, population=3)
    y = layer.forward(x)
    np.testing.assert_array_equal(y[0], x[0])
    assert not y[2].any()
    np.testing.assert_array_equal(layer.backward(x), ref_dropout(x, layer._mask, layer.p))
    with pytest.raises(ValueError, match="p"):
        fd.nn.Dropout([0.1, 0.2])
    with pytest.raises(ValueError, match="p"):
        fd.nn.Dropout(1.5)


def test_population_with_one_seed_per_model_draws_each_models_lone_mask(rng):
    x = rng.standard_normal((3, 40, 30)).astype(np.float32)
    rates, seeds = np.array([0.2, 0.5, 0.7]), [11, 12, 13]
    y, mask = fd.dropout_forward(x, rates, seed=seeds, population=True)
    for k in range(3):
        np.testing.assert_array_equal(mask[k], ref_mask(x[k].shape, rates[k], seeds[k]))
        np.testing.assert_array_equal(y[k], ref_dropout(x[k], mask[k], rates[k]))
    with pytest.raises(ValueError, match="3 ints"):
        fd.dropout_forward(x, rates, seed=[1, 2], population=True)
    with pytest.raises(TypeError, match="seed"):
        fd.dropout_forward(x[0], 0.5, seed=[1, 2])


@pytest.mark.parametrize("shape, axis", [((10, 6), 0), ((6, 10), -1), ((10, 3, 4), 0),
                                         ((3, 10, 2), 1)])
@pytest.mark.parametrize("population", [None, "one-seed", "model-seeds"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rows_of_a_global_batch_draw_the_whole_batchs_masks(shape, axis, population, world):
    """Data-parallel training: each rank's part of a global batch (rows=Rows(first, total,
    axis)) gets the mask elements one call on the whole batch draws there, whatever W."""
    rng = np.random.default_rng(0)
    K = 3
    full_shape = shape if population is None else (K,) + shape
    x = rng.standard_normal(full_shape).astype(np.float32)
    seed = 11 if population != "model-seeds" else [11, 12, 13]
    p = 0.4 if population is None else np.array([0.2, 0.5, 0.7])
    options = dict(population=population is not None)
    _, whole = fd.dropout_forward(x, p, seed, **options)
    n = shape[axis]
    ex_axis = (axis % len(shape)) + (population is not None)
    parts = []
    for r in range(world):
        first, end = r * n // world, (r + 1) * n // world
        part = np.ascontiguousarray(np.take(x, range(first, end), axis=ex_axis))
        _, mask = fd.dropout_forward(part, p, seed, rows=Rows(first, n, axis), **options)
        parts.append(mask)
    np.testing.assert_array_equal(np.concatenate(parts, axis=ex_axis), whole)


def test_bad_rows_are_clear_errors():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="do not fit a batch of rows.total=5"):
        fd.dropout_forward(x, 0.5, 0, rows=Rows(2, 5))
    with pytest.raises(TypeError, match="rows must be a Rows"):
        fd.dropout_forward(x, 0.5, 0, rows=3)
    with pytest.raises(ValueError, match="rows.first must be >= 0"):
        fd.dropout_forward(x, 0.5, 0, rows=Rows(-1, 5))
