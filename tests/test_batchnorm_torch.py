"""Batch norm against torch.nn.functional.batch_norm and autograd (skipped without torch)."""

import numpy as np
import pytest

import fastdl as fd

from helpers import assert_close, require

torch = require("torch")

FORWARD = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}
GRADIENT = {np.float32: dict(rtol=2e-3, atol=2e-4), np.float64: dict(rtol=1e-9, atol=1e-11)}
SHAPES = [(32, 6), (300, 128), (8, 5, 20), (4, 3, 5, 6), (8, 16, 12, 12), (2, 3, 4, 5, 6)]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_torch(shape, dtype, training, affine, rng):
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    gamma = rng.standard_normal(c).astype(dtype) if affine else None
    beta = rng.standard_normal(c).astype(dtype) if affine else None
    rm, rv = rng.random(c).astype(dtype), (rng.random(c) + 0.5).astype(dtype)
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    tx = torch.from_numpy(x.copy()).requires_grad_()
    tg = torch.from_numpy(gamma.copy()).requires_grad_() if affine else None
    tb = torch.from_numpy(beta.copy()).requires_grad_() if affine else None
    ty = torch.nn.functional.batch_norm(tx, t_rm, t_rv, tg, tb, training=training,
                                        momentum=0.1, eps=1e-5)
    y, cache = fd.batch_norm_forward(x, gamma, beta, rm, rv, training=training)
    assert_close(y, ty.detach().numpy(), dtype, FORWARD, "y")
    assert_close(rm, t_rm.numpy(), dtype, FORWARD, "running_mean")
    assert_close(rv, t_rv.numpy(), dtype, FORWARD, "running_var")
    dy = rng.standard_normal(shape).astype(dtype)
    inputs = [tx] + ([tg, tb] if affine else [])
    grads = torch.autograd.grad(ty, inputs, torch.from_numpy(dy))
    dx, dgamma, dbeta = fd.batch_norm_backward(dy, cache)
    assert_close(dx, grads[0].numpy(), dtype, GRADIENT, "dx")
    if affine:
        assert_close(dgamma, grads[1].numpy(), dtype, GRADIENT, "dgamma")
        assert_close(dbeta, grads[2].numpy(), dtype, GRADIENT, "dbeta")
