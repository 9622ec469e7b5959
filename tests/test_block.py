"""The fused BatchNorm - ReLU - Dropout unit of Sequential (fastdl._block, kernels/block.py):
the layers' results bit for bit, against the NumPy reference, for one model and a population;
the layers themselves where it does not apply."""

import numpy as np
import pytest

import fastdl as fd
from fastdl import nn

import reference as ref


def block(population=None, dtype=np.float32, rates=0.3):
    """Linear(12 -> 16, no bias) - BatchNorm - ReLU - Dropout - Linear(16 -> 5)."""
    seeds = 1 if population is None else list(range(1, population + 1))
    drop_seeds = 9 if population is None else list(range(9, 9 + population))
    return nn.Sequential(
        nn.Linear(12, 16, bias=False, dtype=dtype, seed=seeds, population=population),
        nn.BatchNorm(16, dtype=dtype, population=population), nn.ReLU(population=population),
        nn.Dropout(rates, seed=drop_seeds, population=population),
        nn.Linear(16, 5, dtype=dtype, seed=seeds, population=population))


CASES = [(None, np.float32), (None, np.float64), (3, np.float32)]


@pytest.mark.parametrize("population, dtype", CASES, ids=["one-f32", "one-f64", "population"])
def test_fused_unit_gives_the_layers_bits(rng, population, dtype):
    rates = 0.3 if population is None else np.array([0.0, 0.3, 0.6])
    fused, layers = block(population, dtype, rates), block(population, dtype, rates)
    layers._fused_units = list(layers.layers)  # the layers one by one
    assert isinstance(fused._units()[1], fd._block.NormReluDropout)
    for _ in range(3):  # the dropout masks change with the calls
        x = (rng.standard_normal((40, 12)) * 3 + 1).astype(dtype)
        y = fused.forward(x).copy()
        np.testing.assert_array_equal(y, layers.forward(x))
        dy = rng.standard_normal(y.shape).astype(dtype)
        np.testing.assert_array_equal(fused.backward(dy), layers.backward(dy))
        for got, want in zip(fused.grads(), layers.grads()):
            np.testing.assert_array_equal(got, want)
        for a, b in [(fused.layers[1], layers.layers[1])]:
            np.testing.assert_array_equal(a.running_mean, b.running_mean)
            np.testing.assert_array_equal(a.running_var, b.running_var)
        np.testing.assert_array_equal(fused.layers[3].calls, layers.layers[3].calls)


def test_fused_unit_matches_the_reference(rng):
    """Batch norm (training), ReLU and dropout (the documented mask) forward and backward in
    float64 NumPy, for one model."""
    model = block(dtype=np.float64, rates=0.25)
    norm, _, dropout = model.layers[1:4]
    unit = model._units()[1]
    z = rng.standard_normal((30, 16)) * 2 + 3
    gamma = rng.standard_normal(16)
    norm.gamma[...] = gamma
    seed = dropout._next_seed()
    y = unit.forward(z)
    bn, new_mean, new_var, saved = ref.batch_norm_forward(z, gamma, np.zeros(16), np.zeros(16),
                                                          np.ones(16))
    mask = ref.dropout_mask(z.shape, 0.25, seed)
    np.testing.assert_allclose(y, ref.dropout(ref.relu(bn), mask, 0.25), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(norm.running_mean, new_mean, rtol=1e-12)
    da = rng.standard_normal(z.shape)
    dz = unit.backward(da)
    want_dz, want_dgamma, want_dbeta = ref.batch_norm_backward(
        ref.relu_backward(ref.dropout(da, mask, 0.25), bn), saved)
    np.testing.assert_allclose(dz, want_dz, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(norm.dgamma, want_dgamma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(norm.dbeta, want_dbeta, rtol=1e-10, atol=1e-12)


def test_non_finite_values_propagate_as_through_the_layers(rng):
    fused, layers = block(rates=0.0), block(rates=0.0)
    layers._fused_units = list(layers.layers)
    x = rng.standard_normal((8, 12)).astype(np.float32)
    x[3, 2] = np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        y = fused.forward(x).copy()
        np.testing.assert_array_equal(y, layers.forward(x))  # NaN where NaN (equal_nan)
        assert np.isnan(y).any()
        dy = np.ones_like(y)
        dy[0, 0] = np.nan
        np.testing.assert_array_equal(fused.backward(dy), layers.backward(dy))


def test_eval_mode_and_other_layouts_run_the_layers(rng):
    model = block()
    model.eval()
    x = rng.standard_normal((8, 12)).astype(np.float32)
    model.forward(x)
    assert not model._units()[1]._fused
    model.train()
    model.forward(x)
    assert model._units()[1]._fused
    notes = nn.Sequential(nn.Linear(12, 16, feature_axis=0, seed=1),
                          nn.BatchNorm(16, channel_axis=0), nn.ReLU(), nn.Dropout(0.2, seed=3))
    notes.forward(rng.standard_normal((12, 8)).astype(np.float32))
    assert not notes._units()[1]._fused  # channels first: batch norm's runs layout


def test_relu_or_dropout_backward_alone_after_a_fused_forward_is_an_error(rng):
    model = block()
    model.forward(rng.standard_normal((8, 12)).astype(np.float32))
    dy = np.ones((8, 16), np.float32)
    for layer in model.layers[2:4]:
        with pytest.raises(ValueError, match="forward first"):
            layer.backward(dy)
