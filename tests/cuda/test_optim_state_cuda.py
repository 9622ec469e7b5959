"""Low-precision optimizer state on the device (SPEC.md, "Low-precision optimizer state"):
bfloat16 and 8-bit state of every optimizer against the CPU path, params and stored state.

Small sizes and few steps: in the simulator every CUDA thread is an OS thread. The 8-bit
tensors span whole and partial blocks of 256 (min_8bit_size lowered to 300), beside a tensor
small enough to keep float32 state.
"""

import numpy as np
import pytest

import fastdl as fd
from fastdl import _state
from fastdl.device import is_device_array
from fastdl.kernels import cudalib

from helpers import assert_close

cuda = cudalib.cuda
CLASSES = {"sgd": fd.optim.SGD, "momentum": fd.optim.Momentum, "rmsprop": fd.optim.RMSprop,
           "adam": fd.optim.Adam, "adamw": fd.optim.AdamW}
CASES = [
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01), dict(ema_decay=0.9)),
    ("momentum", dict(lr=0.05, beta=0.8, weight_decay=0.1), dict(max_grad_norm=1.0)),
    ("rmsprop", dict(lr=0.01, alpha=0.9), dict(grad_scale=64.0, skip_nonfinite=True)),
    ("rmsprop", dict(lr=0.01, momentum=0.5, weight_decay=0.01), dict(ema_decay=0.5)),
    ("adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1), dict(skip_nonfinite=True)),
    ("adamw", dict(lr=0.01, maximize=True), dict(max_grad_norm=0.5, ema_decay=0.5)),
]
# With min_8bit_size=300: two 8-bit tensors (blocks of 256, 256, 8 and 256, 44), one float32.
SHAPES = [(520,), (2, 150), (7,)]
POPULATION_SHAPES = [(2, 300), (2, 7)]  # 300 per model: 8-bit (256, 44); 7: float32
MIN_8BIT_SIZE = 300
STEPS = 3


def device(arrays):
    return [cuda.to_device(a) for a in arrays]


def assert_codes_agree(got, want, what):
    """8-bit codes equal but at near-ties (a value within a few ulps of the midpoint between
    two codes may round to either): at most 0.1 % of them, each one code away."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8, what
    differ = got != want
    assert np.all(np.abs(got.astype(int) - want.astype(int)) <= 1), what
    assert differ.sum() <= got.size // 1000, f"{what}: {differ.sum()} of {got.size} codes differ"


def assert_state_agrees(got, want, state_dtype):
    """The GPU optimizer's state dict's buffers against the CPU's."""
    assert got.keys() == want.keys()
    for name in want:
        for j, (a, b) in enumerate(zip(got[name], want[name])):
            what = f"{name}[{j}]"
            if isinstance(b, dict):
                assert isinstance(a, dict), what
                assert_codes_agree(a["codes"], b["codes"], what)
                assert_close(a["absmax"], b["absmax"], np.float32, what=f"{what} absmax")
            elif state_dtype == "bfloat16":  # bits, one bfloat16 ulp apart at most at ties
                assert a.dtype == b.dtype == np.uint16, what
                assert np.all(np.abs(a.astype(int) - b.astype(int)) <= 1), what
                assert np.sum(a != b) <= a.size // 1000, what
            else:  # a small tensor's float32 state
                assert a.dtype == b.dtype == np.float32, what
                assert_close(a, b, np.float32, what=what)


def run_both(kind, hyper, options, state_dtype, shapes, population=False, seed=5):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    gpu_params = device(params)
    cpu_params = [p.copy() for p in params]
    settings = dict(hyper, **options, state_dtype=state_dtype, min_8bit_size=MIN_8BIT_SIZE,
                    population=population)
    gpu = CLASSES[kind](gpu_params, **settings)
    cpu = CLASSES[kind](cpu_params, **settings)
    for t in range(STEPS):
        grads = [rng.standard_normal(s).astype(np.float32) * options.get("grad_scale", 1.0)
                 for s in shapes]
        if t == 1 and options.get("skip_nonfinite"):
            grads[0][(0,) * len(shapes[0])] = np.inf  # a lone model skips a step
        info, want = gpu.step(device(grads)), cpu.step(grads)
        np.testing.assert_array_equal(info.found_inf, want.found_inf)
        if want.grad_norm is not None:
            np.testing.assert_allclose(info.grad_norm, want.grad_norm, rtol=1e-5)
    assert all(is_device_array(p) for p in gpu_params)
    for j, (p, q) in enumerate(zip(gpu_params, cpu_params)):
        np.testing.assert_allclose(p.copy_to_host(), q, rtol=1e-5, atol=1e-6,
                                   err_msg=f"param {j}")
    if cpu.ema_params is not None:
        for e, want in zip(gpu.ema_params, cpu.ema_params):
            np.testing.assert_allclose(e.copy_to_host(), want, rtol=1e-5, atol=1e-6)
    assert_state_agrees(gpu.state_dict()["state"], cpu.state_dict()["state"], state_dtype)
    return gpu, cpu


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("kind, hyper, options", CASES,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CASES)])
def test_matches_cpu_path(kind, hyper, options, state_dtype):
    run_both(kind, hyper, options, state_dtype, SHAPES)
    name = "adam" if kind == "adamw" else kind
    if state_dtype == "int8":  # 8-bit tensors and float32 ones: one launch of each a step
        assert cudalib.LAUNCHES[f"{name}_update_8bit_cuda"] == STEPS
        assert cudalib.LAUNCHES[f"{name}_update_cuda"] == STEPS
    else:
        assert cudalib.LAUNCHES[f"{name}_update_cuda"] == STEPS
        assert cudalib.LAUNCHES[f"{name}_update_8bit_cuda"] == 0


@pytest.mark.parametrize("kind, hyper, options", [CASES[0], CASES[3], CASES[4]],
                         ids=["sgd", "rmsprop", "adam"])
def test_population_matches_cpu_path(kind, hyper, options):
    hyper = dict(hyper, lr=np.array([0.003, 0.03]))
    options = {k: v for k, v in options.items() if k != "skip_nonfinite"}
    run_both(kind, hyper, options, "int8", POPULATION_SHAPES, population=True)


def test_int8_with_a_none_grad_and_sgd_without_momentum():
    """A None grad leaves its tensor's codes alone; SGD without momentum keeps no state."""
    rng = np.random.default_rng(6)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    gpu_params, cpu_params = device(params), [p.copy() for p in params]
    settings = dict(lr=0.01, state_dtype="int8", min_8bit_size=MIN_8BIT_SIZE)
    gpu, cpu = fd.optim.Adam(gpu_params, **settings), fd.optim.Adam(cpu_params, **settings)
    for t in range(STEPS):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        if t == 2:
            grads[1] = None
        gpu.step([None if g is None else cuda.to_device(g) for g in grads])
        cpu.step(grads)
    for p, q in zip(gpu_params, cpu_params):
        np.testing.assert_allclose(p.copy_to_host(), q, rtol=1e-5, atol=1e-6)
    assert_state_agrees(gpu.state_dict()["state"], cpu.state_dict()["state"], "int8")
    plain_params = device(params)
    plain = fd.optim.SGD(plain_params, lr=0.1, state_dtype="int8", min_8bit_size=MIN_8BIT_SIZE)
    plain.step(device([np.ones(s, np.float32) for s in SHAPES]))
    assert plain.state_dict()["state"] == {}
    for p, q in zip(plain_params, params):
        np.testing.assert_allclose(p.copy_to_host(), q - np.float32(0.1), rtol=1e-6)


def test_int8_state_dict_round_trip_on_the_device_is_bit_identical():
    rng = np.random.default_rng(7)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(3)]
    settings = dict(lr=0.01, state_dtype="int8", min_8bit_size=MIN_8BIT_SIZE, ema_decay=0.9)
    a = device(params)
    opt_a = fd.optim.AdamW(a, **settings)
    opt_a.step(device(grads[0]))
    saved = opt_a.state_dict()
    b = device([p.copy_to_host() for p in a])
    opt_b = fd.optim.AdamW(b, **settings)
    opt_b.load_state_dict(saved)
    for g in grads[1:]:
        opt_a.step(device(g))
        opt_b.step(device(g))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.copy_to_host(), y.copy_to_host())
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for x, y in zip(state_a["exp_avg"], state_b["exp_avg"]):
        if isinstance(x, dict):
            np.testing.assert_array_equal(x["codes"], y["codes"])
            np.testing.assert_array_equal(x["absmax"], y["absmax"])
        else:
            np.testing.assert_array_equal(x, y)


def _encode_kernel():
    from fastdl.kernels import optim_cuda

    @cuda.jit
    def encode(x, bits, back):
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            bits[i] = optim_cuda._bfloat16_encode(x[i])
            back[i] = optim_cuda._bfloat16_decode(bits[i])

    return encode


def test_bfloat16_rounding_on_the_device_is_the_cpus():
    """Ties to even, one above and below, NaNs made quiet, infinities, overflow to inf,
    subnormals, zeros (the CPU test's crafted values): the same bits as the host's rounding,
    and decoding is exact."""
    words = []
    for upper in (0x3F80, 0x3F81, 0x0001, 0x8000, 0xBF81, 0x7F7F, 0xFF7F):
        for lower in (0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
            words.append((upper << 16) | lower)
    words += [0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0xFFC00001, 0xFFFFFFFF, 0x7F800000,
              0xFF800000, 0x7F7FFFFF, 0x00000001, 0x807FFFFF, 0]
    x = np.array(words, np.uint32).view(np.float32)
    bits, back = cuda.device_array(x.size, np.uint16), cuda.device_array(x.size, np.float32)
    _encode_kernel()[1, 32](cuda.to_device(x), bits, back)
    bits, back = bits.copy_to_host(), back.copy_to_host()
    np.testing.assert_array_equal(bits, _state.bfloat16_bits(x))
    np.testing.assert_array_equal(back.view(np.uint32), bits.astype(np.uint32) << 16)
