"""fastdl.schedules and fd.ewa against SPEC.md's formulas (tests/reference.py for ewa)."""

import math

import numpy as np
import pytest

import fastdl as fd
from fastdl import schedules

import reference

EPOCHS = range(0, 30)


def test_inverse_time():
    s = schedules.inverse_time(0.2, 1.0)
    assert [s(e) for e in EPOCHS] == [0.2 / (1 + 1.0 * e) for e in EPOCHS]


def test_exponential():
    s = schedules.exponential(0.1)
    assert [s(e) for e in EPOCHS] == [0.1 * 0.95 ** e for e in EPOCHS]
    assert schedules.exponential(0.1, base=0.5)(3) == 0.1 * 0.5 ** 3


def test_inverse_sqrt():
    s = schedules.inverse_sqrt(0.1, k=2.0)
    assert [s(e) for e in EPOCHS] == [0.1 * 2.0 / math.sqrt(e + 1) for e in EPOCHS]


def test_staircase():
    s = schedules.staircase(1.0, 0.5, 10)
    assert [s(e) for e in (0, 9, 10, 19, 20, 29)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_piecewise():
    s = schedules.piecewise([5, 10], [0.1, 0.01, 0.001])
    assert [s(e) for e in (0, 4, 5, 9, 10, 100)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


@pytest.mark.parametrize("make, error", [
    (lambda: schedules.piecewise([5, 10], [0.1, 0.01]), ValueError),
    (lambda: schedules.piecewise([10, 5], [0.1, 0.01, 0.001]), ValueError),
    (lambda: schedules.staircase(0.1, 0.5, 0), ValueError),
    (lambda: schedules.inverse_time(-0.1, 1.0), ValueError),
    (lambda: schedules.exponential("0.1"), TypeError),
    (lambda: schedules.exponential(0.1)(-1), ValueError),
    (lambda: schedules.exponential(0.1)(1.5), TypeError),
])
def test_schedule_errors(make, error):
    with pytest.raises(error):
        make()


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.98])
def test_ewa_matches_reference(beta, bias_correction):
    values = np.random.default_rng(0).standard_normal(50) + 10
    got = fd.ewa(values, beta, bias_correction)
    np.testing.assert_allclose(got, reference.ewa(values, beta, bias_correction), rtol=1e-12)


def test_ewa_bias_correction_removes_the_start_up_bias():
    got = fd.ewa(np.full(5, 7.0), 0.9)
    np.testing.assert_allclose(got, 7.0)
    assert fd.ewa(np.full(5, 7.0), 0.9, bias_correction=False)[0] == pytest.approx(0.7)


def test_ewa_errors():
    with pytest.raises(ValueError, match="beta"):
        fd.ewa([1.0], 1.0)
    with pytest.raises(ValueError, match="1-D"):
        fd.ewa(np.zeros((2, 2)), 0.9)
    with pytest.raises(TypeError, match="beta"):
        fd.ewa([1.0], "0.9")
