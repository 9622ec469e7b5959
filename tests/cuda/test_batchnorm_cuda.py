"""Batch norm on device arrays against the CPU path and the NumPy reference (simulator-sized)."""

import numpy as np
import pytest

import fastdl as fd
from fastdl.device import is_device_array
from fastdl.kernels import cudalib

import reference
from helpers import assert_close

cuda = cudalib.cuda
FORWARD = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}
GRADIENT = {np.float32: dict(rtol=2e-3, atol=2e-4), np.float64: dict(rtol=1e-9, atol=1e-11)}
LAYOUTS = [((12, 5), 1), ((3, 4, 20), 1), ((6, 40), 0), ((2, 3, 4, 5), -1), ((70, 3), 1)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lt: f"{lt[0]}-axis{lt[1]}")
def test_matches_cpu_and_reference(layout, dtype, training):
    shape, axis = layout
    rng = np.random.default_rng(5)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    gamma, beta = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = rng.random(c).astype(dtype), (rng.random(c) + 0.5).astype(dtype)
    d_rm, d_rv = cuda.to_device(rm), cuda.to_device(rv)
    d_x = cuda.to_device(x)
    y, cache = fd.batch_norm_forward(d_x, cuda.to_device(gamma), cuda.to_device(beta), d_rm,
                                     d_rv, training=training, channel_axis=axis)
    want, new_mean, new_var, saved = reference.batch_norm_forward(
        x, gamma, beta, rm, rv, training=training, channel_axis=axis)
    cpu_y, cpu_cache = fd.batch_norm_forward(x, gamma, beta, rm.copy(), rv.copy(),
                                             training=training, channel_axis=axis)
    assert is_device_array(y)
    assert_close(y.copy_to_host(), want, dtype, FORWARD, "y vs reference")
    assert_close(y.copy_to_host(), cpu_y, dtype, FORWARD, "y vs cpu")
    if training:
        assert_close(d_rm.copy_to_host(), new_mean, dtype, FORWARD, "running_mean")
        assert_close(d_rv.copy_to_host(), new_var, dtype, FORWARD, "running_var")
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dgamma, dbeta = fd.batch_norm_backward(cuda.to_device(dy), cache)
    assert is_device_array(dx) and is_device_array(dgamma)
    for got, want_, what in zip((dx, dgamma, dbeta), reference.batch_norm_backward(dy, saved),
                                ("dx", "dgamma", "dbeta")):
        assert_close(got.copy_to_host(), want_, dtype, GRADIENT, what)
    kernel = "bn_comoment_rows_cuda" if np.prod(shape[axis % len(shape) + 1:]) == 1 \
        else "bn_comoment_runs_cuda"
    assert cudalib.LAUNCHES[kernel] == (2 if training else 1)  # the GPU kernels ran
    assert cudalib.LAUNCHES["bn_affine_cuda"] == 1
    assert cudalib.LAUNCHES["bn_input_grad_cuda"] == 1


def test_population_on_the_device():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 10, 4)).astype(np.float32)
    gamma = rng.standard_normal((2, 4)).astype(np.float32)
    y, cache = fd.batch_norm_forward(cuda.to_device(x), cuda.to_device(gamma), None, None,
                                     None, population=True)
    for k in range(2):
        want, _ = fd.batch_norm_forward(x[k], gamma[k], None, None, None)
        assert_close(y.copy_to_host()[k], want, np.float32, FORWARD)


def test_variance_is_sound_at_mean_1e4_without_float64():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((200, 3)) + 1e4).astype(np.float32)
    rv = cuda.to_device(np.zeros(3, np.float32))
    fd.batch_norm_forward(cuda.to_device(x), None, None, cuda.to_device(np.zeros(3, np.float32)),
                          rv, momentum=1.0)
    want = reference.batch_norm_forward(x, None, None, np.zeros(3), np.zeros(3),
                                        momentum=1.0)[2]
    np.testing.assert_allclose(rv.copy_to_host(), want, rtol=1e-4)


def test_host_and_device_arrays_are_not_mixed():
    x = cuda.to_device(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="on the host but x is on cuda"):
        fd.batch_norm_forward(x, np.ones(3, np.float32), None, None, None)
    _, cache = fd.batch_norm_forward(x, None, None, None, None)
    with pytest.raises(TypeError, match="forward input was on cuda"):
        fd.batch_norm_backward(np.ones((4, 3), np.float32), cache)
