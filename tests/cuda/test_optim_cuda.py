"""The CUDA optimizers against the CPU path and the NumPy reference, on device arrays.

Small sizes and few steps: in the simulator every CUDA thread is an OS thread.
"""

import numpy as np
import pytest

import fastdl as fd
from fastdl.device import is_device_array
from fastdl.kernels import cudalib

from helpers import assert_close
from reference import ReferenceOptimizer

cuda = cudalib.cuda
CLASSES = {"sgd": fd.optim.SGD, "momentum": fd.optim.Momentum, "rmsprop": fd.optim.RMSprop,
           "adam": fd.optim.Adam, "adamw": fd.optim.AdamW}
CASES = [
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01), {}),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True), dict(ema_decay=0.9)),
    ("momentum", dict(lr=0.05, beta=0.8, weight_decay=0.1), dict(max_grad_norm=1.0)),
    ("rmsprop", dict(lr=0.01, alpha=0.9, centered=True, momentum=0.5), {}),
    ("rmsprop", dict(lr=0.01, weight_decay=0.01), dict(grad_scale=64.0, skip_nonfinite=True)),
    ("adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True), {}),
    ("adamw", dict(lr=0.01, maximize=True), dict(max_grad_norm=0.5, ema_decay=0.5)),
]
SHAPES = [(33, 5), (7,)]
STEPS = 3


def device(arrays):
    return [cuda.to_device(a) for a in arrays]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind, hyper, options", CASES,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CASES)])
def test_matches_cpu_path_and_reference(kind, hyper, options, dtype):
    rng = np.random.default_rng(7)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    gpu_params = device(params)
    cpu_params = [p.copy() for p in params]
    ref_params = [p.copy() for p in params]
    gpu = CLASSES[kind](gpu_params, **hyper, **options)
    cpu = CLASSES[kind](cpu_params, **hyper, **options)
    ref = ReferenceOptimizer(kind, ref_params, **hyper, **options)
    for t in range(STEPS):
        grads = [rng.standard_normal(s).astype(dtype) * options.get("grad_scale", 1.0)
                 for s in SHAPES]
        if t == 1 and options.get("skip_nonfinite"):
            grads[0][3, 2] = np.inf
        info, want = gpu.step(device(grads)), cpu.step(grads)
        ref.step(grads)
        assert isinstance(info.found_inf, bool) and info.found_inf == want.found_inf
        if want.grad_norm is None:
            assert info.grad_norm is None
        else:
            assert info.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
    assert all(is_device_array(p) for p in gpu_params)
    for j, p in enumerate(gpu_params):
        assert_close(p.copy_to_host(), cpu_params[j], dtype, what=f"vs cpu, param {j}")
        assert_close(p.copy_to_host(), ref_params[j], dtype, what=f"vs reference, param {j}")
    if gpu.ema_params is not None:
        assert all(is_device_array(e) for e in gpu.ema_params)
        for e, want in zip(gpu.ema_params, ref.ema):
            assert_close(e.copy_to_host(), want, dtype, what="ema")
    kernel = ("adam" if kind == "adamw" else kind) + "_update_cuda"
    assert cudalib.LAUNCHES[kernel] == STEPS  # the GPU kernels ran, one launch a step
    measured = options.get("skip_nonfinite") or options.get("max_grad_norm")
    assert cudalib.LAUNCHES["grad_stats_cuda"] == (STEPS if measured else 0)
    state = gpu.state_dict()
    for arrays in state["state"].values():
        assert all(isinstance(a, np.ndarray) for a in arrays)


def test_flat_params_on_the_device_are_one_launch_per_step():
    with fd.use_device("cuda"):
        params = fd.optim.flat_params([(20, 10), (10,), (10, 3)], np.float32)
        grads = fd.optim.flat_params([(20, 10), (10,), (10, 3)], np.float32)
    assert all(is_device_array(p) for p in params)
    rng = np.random.default_rng(0)
    for g in grads:
        g.copy_to_device(rng.standard_normal(g.shape).astype(np.float32))
    opt = fd.optim.Adam(params, lr=0.1, max_grad_norm=1.0)
    cpu_params = [np.zeros(p.shape, np.float32) for p in params]
    cpu = fd.optim.Adam(cpu_params, lr=0.1, max_grad_norm=1.0)
    host_grads = [g.copy_to_host() for g in grads]
    for _ in range(STEPS):
        info = opt.step(grads)
        assert info.grad_norm == pytest.approx(cpu.step(host_grads).grad_norm, rel=1e-5)
    assert cudalib.LAUNCHES["adam_update_cuda"] == STEPS
    assert cudalib.LAUNCHES["grad_stats_cuda"] == STEPS
    for p, q in zip(params, cpu_params):
        assert_close(p.copy_to_host(), q, np.float32)


def test_separate_arrays_take_one_launch_per_32_tensors():
    rng = np.random.default_rng(1)
    shapes = [(int(n),) for n in rng.integers(1, 6, 40)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    gpu_params = device(params)
    opt = fd.optim.SGD(gpu_params, lr=0.1, momentum=0.9)
    cpu = fd.optim.SGD(params, lr=0.1, momentum=0.9)
    for _ in range(2):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.step(device(grads))
        cpu.step(grads)
    assert cudalib.LAUNCHES["sgd_update_cuda"] == 2 * 2  # ceil(40 / 32) launches a step
    for p, q in zip(gpu_params, params):
        assert_close(p.copy_to_host(), q, np.float32)


def test_population_on_the_device_matches_the_cpu():
    rng = np.random.default_rng(2)
    shapes = [(3, 6, 4), (3, 4)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    hyper = dict(lr=np.array([1e-3, 1e-2, 1e-1]), betas=(np.array([0.8, 0.9, 0.95]), 0.999))
    gpu_params = device(params)
    gpu = fd.optim.Adam(gpu_params, population=True, skip_nonfinite=True, max_grad_norm=1.0,
                        **hyper)
    cpu = fd.optim.Adam(params, population=True, skip_nonfinite=True, max_grad_norm=1.0,
                        **hyper)
    for t in range(STEPS):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if t == 1:
            grads[0][2, 0, 0] = np.nan  # model 2 skips step 2
        a, b = gpu.step(device(grads)), cpu.step(grads)
        np.testing.assert_array_equal(a.found_inf, b.found_inf)
        np.testing.assert_allclose(a.grad_norm, b.grad_norm, rtol=1e-5)
    np.testing.assert_array_equal(gpu.step_count, [3, 3, 2])
    for p, q in zip(gpu_params, params):
        assert_close(p.copy_to_host(), q, np.float32)


def test_state_dict_round_trip_on_the_device_is_bit_identical():
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(4)]
    a = device(params)
    opt_a = fd.optim.AdamW(a, lr=0.01, amsgrad=True, ema_decay=0.9)
    for g in grads[:2]:
        opt_a.step(device(g))
    saved = opt_a.state_dict()
    b = device([p.copy_to_host() for p in a])
    for g in grads[2:]:
        opt_a.step(device(g))
    opt_b = fd.optim.AdamW(b, lr=0.5, ema_decay=0.1)
    opt_b.load_state_dict(saved)
    for g in grads[2:]:
        opt_b.step(device(g))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.copy_to_host(), y.copy_to_host())
    for x, y in zip(opt_a.ema_params, opt_b.ema_params):
        np.testing.assert_array_equal(x.copy_to_host(), y.copy_to_host())


def test_host_grads_for_device_params_are_refused_before_anything_changes():
    params = device([np.ones(4, np.float32)])
    opt = fd.optim.Adam(params)
    with pytest.raises(TypeError, match="on the host but params"):
        opt.step([np.ones(4, np.float32)])
    with pytest.raises(ValueError, match="shape"):
        opt.step(device([np.ones(5, np.float32)]))
    np.testing.assert_array_equal(params[0].copy_to_host(), 1.0)
    assert opt.step_count == 0


def test_default_launch_configuration_is_small_in_the_simulator():
    if cudalib.SIMULATOR:
        assert cudalib.THREADS_PER_BLOCK <= 64 and cudalib.MAX_BLOCKS <= 4


def test_parameter_groups_on_the_device_match_the_cpu():
    rng = np.random.default_rng(4)
    shapes = [(5, 4), (4,), (9,)]
    params = [rng.standard_normal(s).astype(np.float64) for s in shapes]
    gpu_params = device(params)

    def groups(p):
        return [{"params": p[:2], "lr": 0.1, "weight_decay": 0.1},
                {"params": p[2:], "betas": (0.5, 0.9), "amsgrad": True}]

    gpu = fd.optim.Adam(groups(gpu_params), lr=0.01)
    cpu = fd.optim.Adam(groups(params), lr=0.01)
    for t in range(STEPS):
        if t == 1:
            gpu.param_groups[1]["lr"] = cpu.param_groups[1]["lr"] = 0.003
        grads = [rng.standard_normal(s) for s in shapes]
        gpu.step(device(grads))
        cpu.step(grads)
    for p, q in zip(gpu_params, params):
        assert_close(p.copy_to_host(), q, np.float64)


def test_a_none_grad_leaves_its_param_alone_on_the_device():
    rng = np.random.default_rng(2)
    shapes = [(int(n),) for n in rng.integers(1, 6, 40)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    gpu_params = device(params)
    opt = fd.optim.Adam(gpu_params, lr=0.1)
    cpu = fd.optim.Adam(params, lr=0.1)
    absent = {1, 33}  # one in each launch of 32 tensors
    for _ in range(2):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.step([None if j in absent else g for j, g in enumerate(device(grads))])
        cpu.step([None if j in absent else g for j, g in enumerate(grads)])
    for p, q in zip(gpu_params, params):
        assert_close(p.copy_to_host(), q, np.float32)
