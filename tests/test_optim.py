"""fastdl.optim against the NumPy reference (tests/reference.py): every optimizer and option,
float32 and float64, sizes reaching the serial and the parallel kernel."""

import numpy as np
import pytest

import fastdl as fd

from helpers import assert_close
from reference import ReferenceOptimizer

CLASSES = {"sgd": fd.optim.SGD, "momentum": fd.optim.Momentum, "rmsprop": fd.optim.RMSprop,
           "adam": fd.optim.Adam, "adamw": fd.optim.AdamW}

# (kind, hyperparameters, optimizer-wide options): every option at least once.
CASES = [
    ("sgd", dict(lr=0.05), {}),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01), {}),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True), {}),
    ("momentum", dict(lr=0.05, beta=0.9), {}),
    ("momentum", dict(lr=0.05, beta=0.8, weight_decay=0.1, maximize=True), dict(ema_decay=0.9)),
    ("rmsprop", dict(lr=0.01), {}),
    ("rmsprop", dict(lr=0.01, alpha=0.9, centered=True, momentum=0.5, weight_decay=0.01), {}),
    ("rmsprop", dict(lr=0.01, momentum=0.9, eps=1e-6), dict(max_grad_norm=1.0)),
    ("adam", dict(lr=0.01), {}),
    ("adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True), {}),
    ("adam", dict(lr=0.01, maximize=True), dict(grad_scale=1024.0, max_grad_norm=0.5)),
    ("adamw", dict(lr=0.01, weight_decay=0.1), dict(ema_decay=0.99)),
    ("adamw", dict(lr=0.01, amsgrad=True), dict(skip_nonfinite=True, max_grad_norm=2.0,
                                                ema_decay=0.5)),
]

SHAPES = {"1": [(1,)], "7": [(7,)], "33x5": [(33, 5), (5,)], "40000": [(200, 200)]}
DTYPES = [np.float32, np.float64]


def make(shapes, dtype, rng, scale=1.0):
    return [(rng.standard_normal(s) * scale).astype(dtype) for s in shapes]


def run_both(kind, hyper, options, shapes, dtype, rng, steps=10, grad_scale_data=1.0,
             flat=False):
    params = make(shapes, dtype, rng)
    if flat:
        views = fd.optim.flat_params(shapes, dtype)
        for v, p in zip(views, params):
            v[...] = p
        fast_params = views
    else:
        fast_params = [p.copy() for p in params]
    ref_params = [p.copy() for p in params]
    opt = CLASSES[kind](fast_params, **hyper, **options)
    ref = ReferenceOptimizer(kind, ref_params, **options, **hyper)
    scale = options.get("grad_scale", 1.0)
    for _ in range(steps):
        grads = make(shapes, dtype, rng, scale)
        info = opt.step(grads)
        found, norm = ref.step([g.copy() for g in grads])
        assert info.found_inf == found
        if norm is None:
            assert info.grad_norm is None
        else:
            assert info.grad_norm == pytest.approx(norm, rel=1e-5)
    return opt, ref, fast_params, ref_params


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("size", SHAPES)
@pytest.mark.parametrize("kind, hyper, options", CASES,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CASES)])
def test_matches_reference(kind, hyper, options, size, dtype, rng):
    opt, ref, got, want = run_both(kind, hyper, options, SHAPES[size], dtype, rng)
    assert opt.step_count == 10
    for j, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == dtype
        assert_close(g, w, dtype, what=f"param {j}")
    if opt.ema_params is not None:
        for j, (g, w) in enumerate(zip(opt.ema_params, ref.ema)):
            assert_close(g, w, dtype, what=f"ema {j}")
    state = opt.state_dict()["state"]
    for name, arrays in state.items():
        for j, a in enumerate(arrays):
            if name in ref.state[j]:
                assert_close(a, ref.state[j][name], dtype, what=f"{name} {j}")


def test_parallel_and_serial_kernels_are_both_exercised(rng):
    small = fd.optim.Adam([np.zeros(7, np.float32)])
    large = fd.optim.Adam([np.zeros((200, 200), np.float32)])
    assert not small._ops.parallel and large._ops.parallel
    assert large._ops.separate_plan.shape[0] >= 2  # both threads get work


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_flat_params_run_as_one_contiguous_kernel(dtype, rng):
    shapes = [(100, 50), (50,), (50, 10), (10,)]
    opt, ref, got, want = run_both("adam", dict(lr=0.01, weight_decay=0.01),
                                   dict(max_grad_norm=1.0), shapes, dtype, rng, flat=True)
    for g, w in zip(got, want):
        assert_close(g, w, dtype)
    # grads that are views of one buffer laid out like the params: one chunk table over the
    # whole buffer, with one address
    grads = fd.optim.flat_params(shapes, dtype)
    opt.step(grads)
    param_addresses, grad_addresses, chunks = opt._ops._plan
    assert chunks is opt._ops.flat_plan and grad_addresses.shape == (1,)
    assert chunks[:, 0].max() == 0  # every chunk addresses the one buffer
    # separate grads still work on flat params
    opt.step([np.ascontiguousarray(g) + 0 for g in grads])
    assert opt._ops._plan[2] is opt._ops.separate_plan


def test_hundreds_of_separate_arrays(rng):
    shapes = [(int(n),) for n in rng.integers(1000, 10000, 200)]
    opt, ref, got, want = run_both("adam", dict(lr=0.01), {}, shapes, np.float32, rng, steps=3)
    for g, w in zip(got, want):
        assert_close(g, w, np.float32)


def test_parameter_groups(rng):
    shapes = [(30,), (20, 3), (40000,)]
    params = make(shapes, np.float64, rng)
    fast = [p.copy() for p in params]
    ref_params = [p.copy() for p in params]
    opt = fd.optim.Adam([{"params": fast[:2], "lr": 0.1, "weight_decay": 0.1},
                         {"params": fast[2:], "betas": (0.5, 0.9), "amsgrad": True}], lr=0.01)
    ref = ReferenceOptimizer("adam", ref_params, lr=0.01, groups=[
        ([0, 1], dict(lr=0.1, weight_decay=0.1)), ([2], dict(betas=(0.5, 0.9), amsgrad=True))])
    for t in range(12):
        if t == 6:  # a scheduler changing one group's lr between steps
            opt.param_groups[1]["lr"] = 0.003
            ref.hyper[2]["lr"] = 0.003
        grads = make(shapes, np.float64, rng)
        opt.step(grads)
        ref.step(grads)
    for g, w in zip(fast, ref_params):
        assert_close(g, w, np.float64)


def test_lr_is_settable(rng):
    p = make([(50,)], np.float32, rng)
    fast, slow = [p[0].copy()], [p[0].copy()]
    opt = fd.optim.SGD(fast, lr=0.1)
    ref = ReferenceOptimizer("sgd", slow, lr=0.1)
    schedule = fd.schedules.exponential(0.1, 0.5)
    for epoch in range(10):
        opt.lr = schedule(epoch)
        for h in ref.hyper:
            h["lr"] = schedule(epoch)
        g = make([(50,)], np.float32, rng)
        opt.step(g)
        ref.step(g)
    assert opt.lr == schedule(9)
    assert_close(fast[0], slow[0], np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n", [7, 40000])
def test_skip_nonfinite_detects_nan_and_inf_under_fastmath(dtype, n, rng):
    for bad in [np.nan, np.inf, -np.inf]:
        p = make([(n,)], dtype, rng)
        before = p[0].copy()
        opt = fd.optim.Adam(p, skip_nonfinite=True, ema_decay=0.9)
        g = make([(n,)], dtype, rng)
        g[0][n // 2] = bad
        info = opt.step(g)
        assert info.found_inf is True
        np.testing.assert_array_equal(p[0], before)
        assert opt.step_count == 0
        assert not opt.state_dict()["state"]["exp_avg"][0].any()
        # a finite step afterwards is step 1
        assert opt.step(make([(n,)], dtype, rng)).found_inf is False
        assert opt.step_count == 1


def test_nonfinite_without_skipping_propagates_like_pytorch(rng):
    p = make([(10,)], np.float32, rng)
    opt = fd.optim.SGD(p, lr=0.1)
    g = np.zeros(10, np.float32)
    g[3] = np.nan
    assert opt.step([g]) == fd.optim.StepInfo(False, None)
    assert np.isnan(p[0][3]) and np.isfinite(np.delete(p[0], 3)).all()


def test_clipping_reports_norm_before_clipping(rng):
    p = [np.zeros(4, np.float64)]
    opt = fd.optim.SGD(p, lr=1.0, max_grad_norm=1.0)
    info = opt.step([np.array([3.0, 4.0, 0.0, 0.0])])
    assert info.grad_norm == pytest.approx(5.0)
    np.testing.assert_allclose(p[0], -np.array([3.0, 4.0, 0, 0]) / (5.0 + 1e-6))


def test_state_dict_resume_is_bit_identical(rng):
    shapes = [(33, 5), (5,)]
    params = make(shapes, np.float32, rng)
    grads = [make(shapes, np.float32, rng) for _ in range(10)]
    options = dict(lr=0.01, amsgrad=True, weight_decay=0.01, max_grad_norm=1.0, ema_decay=0.9)
    a = [p.copy() for p in params]
    opt_a = fd.optim.AdamW(a, **options)
    for g in grads[:5]:
        opt_a.step(g)
    saved = opt_a.state_dict()
    b = [p.copy() for p in a]
    for g in grads[5:]:
        opt_a.step(g)
    # hyperparameters come back from the state dict
    opt_b = fd.optim.AdamW(b, lr=0.5, ema_decay=0.1)
    opt_b.load_state_dict(saved)
    for g in grads[5:]:
        opt_b.step(g)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(opt_a.ema_params, opt_b.ema_params):
        np.testing.assert_array_equal(x, y)
    assert opt_b.lr == 0.01 and opt_b.step_count == 10 and opt_b.ema_decay == 0.9
    # the saved dict holds host copies, not views of live state
    assert not np.shares_memory(saved["state"]["exp_avg"][0], opt_a._state["exp_avg"])


def test_state_dict_of_another_optimizer_is_refused(rng):
    p = make([(5,)], np.float32, rng)
    with pytest.raises(ValueError, match="Adam"):
        fd.optim.Adam(p).load_state_dict(fd.optim.SGD([p[0].copy()]).state_dict())


def test_flat_params_layout():
    views = fd.optim.flat_params([(3, 4), (4,), 2], np.float64)
    assert [v.shape for v in views] == [(3, 4), (4,), (2,)]
    assert all(v.dtype == np.float64 and not v.any() for v in views)
    assert views[0].base is views[1].base
    assert np.shares_memory(views[0].base, views[2])
    with pytest.raises(TypeError, match="dtype"):
        fd.optim.flat_params([(3,)], np.int32)
    with pytest.raises(ValueError, match="negative"):
        fd.optim.flat_params([(3, -1)])


def test_huge_finite_float64_gradients_are_not_taken_for_inf():
    """Squares of |g| > 1e154 overflow float64; the check must still see finite values."""
    p = [np.zeros(4)]
    opt = fd.optim.SGD(p, lr=1e-300, skip_nonfinite=True, max_grad_norm=1.0)
    info = opt.step([np.array([1e200, -1e200, 0.0, 1.0])])
    assert info.found_inf is False and info.grad_norm == np.inf
    assert opt.step_count == 1


@pytest.mark.parametrize("flat", [False, True], ids=["separate", "flat"])
def test_a_none_grad_leaves_its_param_and_state_alone(flat, rng):
    """grads [g0, None, g2, ...]: param 1 and its state stay as they are, and the others step
    exactly as an optimizer over them alone (the step count is the optimizer's)."""
    shapes = [(40, 3), (17,), (5, 5), (2000,)]
    start = make(shapes, np.float32, rng)
    params = fd.optim.flat_params(shapes, np.float32) if flat else [a.copy() for a in start]
    for p, a in zip(params, start):
        p[...] = a
    alone = [start[j].copy() for j in (0, 2, 3)]
    opt = fd.optim.Adam(params, lr=0.01, amsgrad=True, max_grad_norm=1.0)
    ref = fd.optim.Adam(alone, lr=0.01, amsgrad=True, max_grad_norm=1.0)
    for _ in range(4):
        grads = make(shapes, np.float32, rng)
        info = opt.step([grads[0], None, grads[2], grads[3]])
        want = ref.step([grads[0], grads[2], grads[3]])
        assert info.grad_norm == want.grad_norm
    np.testing.assert_array_equal(params[1], start[1])
    for got, want in zip([params[0], params[2], params[3]], alone):
        np.testing.assert_array_equal(got, want)
    for name, arrays in opt.state_dict()["state"].items():
        assert not arrays[1].any(), name
    with pytest.raises(ValueError, match="no array"):
        opt.step([None] * 4)
