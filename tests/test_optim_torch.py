"""fastdl.optim against torch.optim, the second, independent oracle (skipped without torch)."""

import numpy as np
import pytest

import fastdl as fd

from helpers import assert_close, require

torch = require("torch")

SHAPES = [(33, 5), (5,), (40000,)]

CASES = [
    (fd.optim.Adam, torch.optim.Adam, dict(lr=0.01)),
    (fd.optim.Adam, torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1,
                                           amsgrad=True)),
    (fd.optim.Adam, torch.optim.Adam, dict(lr=0.01, eps=1e-6, maximize=True)),
    (fd.optim.AdamW, torch.optim.AdamW, dict(lr=0.01)),
    (fd.optim.AdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.3, amsgrad=True)),
    (fd.optim.RMSprop, torch.optim.RMSprop, dict(lr=0.01)),
    (fd.optim.RMSprop, torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, centered=True,
                                                 momentum=0.5, weight_decay=0.01)),
    (fd.optim.RMSprop, torch.optim.RMSprop, dict(lr=0.001, momentum=0.9, maximize=True)),
    (fd.optim.SGD, torch.optim.SGD, dict(lr=0.05)),
    (fd.optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2,
                                         weight_decay=0.01)),
    (fd.optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
]


def case_id(case):
    return f"{case[0].__name__}-" + "-".join(f"{k}={v}" for k, v in case[2].items())


def torch_params(params):
    return [torch.tensor(p.copy(), requires_grad=True) for p in params]


def torch_step(opt, tensors, grads):
    for t, g in zip(tensors, grads):
        t.grad = torch.from_numpy(g.copy())
    opt.step()


def assert_same(fast, slow, dtype):
    for j, (got, want) in enumerate(zip(fast, slow)):
        assert_close(got, want.detach().numpy(), dtype, what=f"param {j}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("ours, theirs, hyper", CASES, ids=[case_id(c) for c in CASES])
def test_matches_torch_optim(ours, theirs, hyper, dtype, rng):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    fast = [p.copy() for p in params]
    slow = torch_params(params)
    opt, ref = ours(fast, **hyper), theirs(slow, **hyper)
    for _ in range(10):
        grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        opt.step(grads)
        torch_step(ref, slow, grads)
    assert_same(fast, slow, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_parameter_groups_match_torch(dtype, rng):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    fast = [p.copy() for p in params]
    slow = torch_params(params)
    opt = fd.optim.AdamW([{"params": fast[:2], "weight_decay": 0.0},
                          {"params": fast[2:], "lr": 0.05, "amsgrad": True}], lr=0.01)
    ref = torch.optim.AdamW([{"params": slow[:2], "weight_decay": 0.0},
                             {"params": slow[2:], "lr": 0.05, "amsgrad": True}], lr=0.01)
    for t in range(12):
        if t == 5:
            opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.002
        grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        opt.step(grads)
        torch_step(ref, slow, grads)
    assert_same(fast, slow, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_max_grad_norm_matches_clip_grad_norm_then_step(max_norm, dtype, rng):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    fast = [p.copy() for p in params]
    slow = torch_params(params)
    opt = fd.optim.Adam(fast, lr=0.01, max_grad_norm=max_norm)
    ref = torch.optim.Adam(slow, lr=0.01)
    for _ in range(10):
        grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        info = opt.step(grads)
        for p, g in zip(slow, grads):
            p.grad = torch.from_numpy(g.copy())
        norm = torch.nn.utils.clip_grad_norm_(slow, max_norm)
        ref.step()
        assert info.grad_norm == pytest.approx(float(norm), rel=1e-5)
    assert_same(fast, slow, dtype)


def test_grad_scale_and_skipping_match_torch_amp_unscale_and_skip(rng):
    """GradScaler's contract: unscale, and skip the step when an inf/NaN is found."""
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    fast = [p.copy() for p in params]
    slow = torch_params(params)
    opt = fd.optim.Adam(fast, lr=0.01, grad_scale=1024.0, skip_nonfinite=True)
    ref = torch.optim.Adam(slow, lr=0.01)
    for t in range(10):
        grads = [(rng.standard_normal(s) * 1024).astype(np.float32) for s in SHAPES]
        if t == 4:
            grads[2][17] = np.inf
        info = opt.step(grads)
        assert info.found_inf == (t == 4)
        if t != 4:
            for p, g in zip(slow, grads):
                p.grad = torch.from_numpy(g / np.float32(1024.0))
            ref.step()
    assert_same(fast, slow, np.float32)
