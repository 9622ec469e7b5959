"""Low-precision optimizer state (SPEC.md): bfloat16 rounding, the 8-bit code tables and nearest
code, every optimizer against the NumPy reference with bfloat16 and int8 state, state dicts,
bad input, and convergence."""

import numpy as np
import pytest
from numba import njit

import fastdl as fd
from fastdl import _state
from fastdl.kernels import quantize
from fastdl.kernels.floats import bfloat16_decode, bfloat16_encode

import reference as ref
from helpers import assert_close, require

CLASSES = {"sgd": fd.optim.SGD, "momentum": fd.optim.Momentum, "rmsprop": fd.optim.RMSprop,
           "adam": fd.optim.Adam, "adamw": fd.optim.AdamW}


# -- bfloat16 ------------------------------------------------------------------------------------

@njit
def _encode_all(x, out):
    for i in range(x.size):
        out[i] = bfloat16_encode(x[i])


@njit
def _decode_all(bits, out):
    for i in range(bits.size):
        out[i] = bfloat16_decode(bits[i])


def crafted_float32():
    """Exact ties (low half 0x8000 with an odd and an even kept half), one above and below,
    NaNs (quiet, signaling, negative), +-inf, values that overflow to inf, subnormals, zeros."""
    words = []
    for upper in (0x3F80, 0x3F81, 0x4049, 0x0001, 0x8000, 0xBF80, 0xBF81, 0x7F7F, 0xFF7F, 0x0080):
        for lower in (0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
            words.append((upper << 16) | lower)
    words += [0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0xFFC00001, 0x7F800000, 0xFF800000,
              0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x807FFFFF, 0x00008000, 0x00018000, 0]
    return np.array(words, np.uint32).view(np.float32)


def test_bfloat16_rounding_is_torchs():
    torch = require("torch")
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):  # some overflow to inf, on purpose
        random = rng.standard_normal(100_000).astype(np.float32) * np.float32(10.0) ** \
            rng.integers(-40, 39, 100_000).astype(np.float32)
    x = np.concatenate([crafted_float32(), random])
    bits = np.empty(x.size, np.uint16)
    _encode_all(x, bits)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    assert np.array_equal(bits[finite], want[finite])
    # a NaN stays a NaN (torch keeps its payload's upper half; we make it quiet)
    decoded = np.empty(x.size, np.float32)
    _decode_all(bits, decoded)
    assert np.array_equal(np.isnan(decoded), np.isnan(x))
    assert np.array_equal(bits, ref.bfloat16_bits(x))
    assert np.array_equal(_state.bfloat16_bits(x), bits)
    # decoding is exact: torch's float32 of the same bits
    assert np.array_equal(decoded[finite],
                          torch.from_numpy(want.view(np.int16)).view(torch.bfloat16).float()
                          .numpy()[finite])


# -- the 8-bit code tables and the nearest code ---------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_are_bitsandbytes_tables(signed):
    assert np.array_equal(quantize.dynamic_map(signed), ref.dynamic_map(signed))
    functional = require("bitsandbytes.functional")
    want = functional.create_dynamic_map(signed=signed).numpy()
    assert np.array_equal(np.sort(want), quantize.dynamic_map(signed))


def _nearest_all(signed):
    nearest = quantize.nearest_signed if signed else quantize.nearest_unsigned

    @njit
    def run(s, out):
        for i in range(s.size):
            out[i] = nearest(s[i])
    return run


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_is_the_brute_force_argmin_but_near_ties(signed):
    codes = quantize.dynamic_map(signed)
    rng = np.random.default_rng(1)
    n = 300_000
    random = (rng.uniform(-1, 1, n) * 10.0 ** rng.uniform(-8, 0, n)).astype(np.float32)
    mids = ((codes[:-1].astype(np.float64) + codes[1:]) / 2).astype(np.float32)
    s = np.concatenate([random, codes, mids, np.nextafter(mids, np.float32(2)),
                        np.nextafter(mids, np.float32(-2)),
                        np.float32([0, -0.0, 1, -1, 1e-30, -1e-30])])
    s = np.clip(s, -1, 1) if signed else np.abs(np.clip(s, -1, 1))
    got = np.empty(s.size, np.uint8)
    _nearest_all(signed)(s, got)
    want = ref.nearest_code(s, codes)
    wrong = got != want
    assert np.all(np.abs(got.astype(int) - want) <= 1)
    assert np.all(ref.near_tie(s[wrong], codes)), s[wrong & ~ref.near_tie(s, codes)][:5]
    assert wrong[:n].sum() <= 2  # near-ties are rare among random values
    assert np.array_equal(got[n:n + 256], np.arange(256))  # every code rounds to itself


def test_nearest_code_loop_is_vectorized():
    """The rounding loop (``encode_block``) compiles to packed float compares and conversions,
    with no 64-bit integer vector arithmetic (numba widens int32 arithmetic to int64, which
    would halve the lanes: the nearest code is float arithmetic to its last step)."""
    @njit
    def encode(values, codes):
        return quantize.encode_block(values, codes, quantize.nearest_signed)

    values = np.random.default_rng(2).standard_normal(256).astype(np.float32)
    codes = np.empty(256, np.uint8)
    encode(values, codes)
    assert np.array_equal(codes, ref.quantize_blockwise(values, quantize.SIGNED_CODES)[0])
    assembly = next(iter(encode.inspect_asm().values()))
    assert "vcmp" in assembly and "ps" in assembly and "cvttps2dq" in assembly
    assert "ymm" in assembly or "zmm" in assembly
    assert not any(op in assembly for op in ("vpaddq", "vpsubq", "vpsllvq"))


# -- every optimizer against the reference --------------------------------------------------------

CASES = [
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01), {}),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True), dict(ema_decay=0.9)),
    ("momentum", dict(lr=0.05, beta=0.8, weight_decay=0.1), dict(max_grad_norm=1.0)),
    ("rmsprop", dict(lr=0.01, alpha=0.9, momentum=0.5), {}),
    ("rmsprop", dict(lr=0.01, weight_decay=0.01), dict(grad_scale=64.0, skip_nonfinite=True)),
    ("adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1), {}),
    ("adam", dict(lr=0.01), dict(ema_decay=0.5, skip_nonfinite=True)),
    ("adamw", dict(lr=0.01, maximize=True), dict(max_grad_norm=0.5)),
]
SHAPES = [(24, 50), (700,), (7,)]  # with min_8bit_size=600: two 8-bit tensors, one float32
STEPS = 12


def _saved_values(entry, name, shape, rows):
    """A state-dict entry as float32 values (decoded)."""
    if isinstance(entry, dict):
        code = quantize.dynamic_map(name != "exp_avg_sq")
        absmax = entry["absmax"].reshape(rows, -1)
        values = [ref.dequantize_blockwise(c, a, code)
                  for c, a in zip(entry["codes"].reshape(rows, -1), absmax)]
        return np.stack(values).reshape(shape)
    if entry.dtype == np.uint16:
        return ref.bfloat16_value(entry).reshape(shape)
    return entry


def _compare_state(opt, reference, state_dtype, population):
    """The stored state against the reference's, step by step: 8-bit codes and absmax equal
    but at near-ties, bfloat16 values equal but where the float32 values before rounding
    differ in their last bits (one bfloat16 ulp). Where they differ the reference takes the
    optimizer's value, so that the two go on from the same state. Returns the count."""
    differing = 0
    for name, entries in opt.state_dict()["state"].items():
        for j, entry in enumerate(entries):
            s = reference.state[j]
            shape = reference.params[j].shape
            rows = shape[0] if population else 1
            got = _saved_values(entry, name, shape, rows)
            if isinstance(entry, dict):
                code = quantize.dynamic_map(name != "exp_avg_sq")
                wrong = entry["codes"] != s[name + ".codes"]
                assert np.all(ref.near_tie(s[name + ".scaled"][wrong], code)), name
                assert_close(entry["absmax"], s[name + ".absmax"], np.float32,
                             what=f"{name} absmax")
            elif state_dtype == "bfloat16":
                want = ref.bfloat16_bits(s[name])
                wrong = entry != want
                assert np.all(np.abs(entry.astype(int) - want) <= 1), name
            else:
                wrong = ~np.isclose(got, s[name], rtol=1e-4, atol=1e-5)
                assert not wrong.any(), name
            differing += int(wrong.sum())
            s[name] = got.copy()
    return differing


# a population with per-model clipping and skipping: tests/test_optim_population.py
RUNS = [(case, population) for case in CASES for population in (False, True)
        if not (population and {"max_grad_norm", "skip_nonfinite"} & set(case[2]))]


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("kind, hyper, options, population",
                         [case + (population,) for case, population in RUNS],
                         ids=[f"{c[0]}-{CASES.index(c)}-{'population' if p else 'lone'}"
                              for c, p in RUNS])
def test_matches_reference(kind, hyper, options, population, state_dtype):
    rng = np.random.default_rng(3)
    shapes = [((3,) + s) if population else s for s in SHAPES]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ref_params = [p.copy() for p in params]
    opt = CLASSES[kind](params, **hyper, **options, state_dtype=state_dtype, min_8bit_size=600,
                        population=population)
    reference = ref.ReferenceOptimizer(kind, ref_params, **hyper, **options,
                                       state_dtype=state_dtype, min_8bit_size=600,
                                       population=population)
    differing = 0
    for t in range(STEPS):
        grads = [rng.standard_normal(s).astype(np.float32) * options.get("grad_scale", 1.0)
                 for s in shapes]
        if t == 4 and options.get("skip_nonfinite"):
            grads[1][5] = np.nan
        info = opt.step(grads)
        found, _ = reference.step(grads)
        assert np.all(info.found_inf == found)
        for got, want in zip(params, ref_params):
            assert_close(got, want, np.float32, what=f"params after step {t + 1}")
        differing += _compare_state(opt, reference, state_dtype, population)
    stored = sum(p.size for p in params) * (2 if kind == "adam" else 1)
    assert differing <= max(3, stored * STEPS // 10_000)  # near-ties only, and rare
    if options.get("ema_decay") is not None:
        for got, want in zip(opt.ema_params, reference.ema):
            assert_close(got, want, np.float32, what="EMA")


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_param_groups_with_low_precision_state(state_dtype):
    """Two groups with their own hyperparameters, one tensor 8-bit, one small: the reference's
    groups, step by step."""
    rng = np.random.default_rng(4)
    shapes = [(40, 30), (900,), (20,)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ref_params = [p.copy() for p in params]
    groups = [{"params": params[:2], "lr": 0.02, "weight_decay": 0.1},
              {"params": params[2:], "betas": (0.5, 0.9)}]
    opt = fd.optim.AdamW(groups, lr=0.01, state_dtype=state_dtype, min_8bit_size=1000)
    reference = ref.ReferenceOptimizer(
        "adamw", ref_params, groups=[([0, 1], {"lr": 0.02, "weight_decay": 0.1}),
                                     ([2], {"betas": (0.5, 0.9)})],
        lr=0.01, state_dtype=state_dtype, min_8bit_size=1000)
    differing = 0
    for t in range(STEPS):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.step(grads)
        reference.step(grads)
        for got, want in zip(params, ref_params):
            assert_close(got, want, np.float32, what=f"params after step {t + 1}")
        differing += _compare_state(opt, reference, state_dtype, False)
    assert differing <= 3
    saved = opt.state_dict()["state"]["exp_avg"]
    assert isinstance(saved[0], dict) == (state_dtype == "int8") and not isinstance(saved[1],
                                                                                     dict)


def test_int8_layout_blocks_restart_at_each_tensor_and_model():
    params = fd.optim.flat_params([(2, 300), (2, 5000)], np.float32)
    opt = fd.optim.Adam(params, state_dtype="int8", min_8bit_size=300, population=True)
    opt.step([np.ones(p.shape, np.float32) for p in params])
    m = opt.state_dict()["state"]["exp_avg"]
    assert m[0]["absmax"].shape == (2, 2) and m[1]["absmax"].shape == (2, 20)
    assert m[0]["codes"].shape == (2, 300) and m[0]["codes"].dtype == np.uint8
    buffers = opt._state["exp_avg"]
    assert buffers.codes.size == 2 * 512 + 2 * 5120 and buffers.small.size == 0


def test_small_tensors_keep_float32_state():
    params = [np.zeros(4095, np.float32), np.zeros(4096, np.float32)]
    opt = fd.optim.Momentum(params, state_dtype="int8")
    opt.step([np.ones(4095, np.float32), np.ones(4096, np.float32)])
    v = opt.state_dict()["state"]["velocity"]
    assert v[0].dtype == np.float32 and isinstance(v[1], dict)


def test_state_bytes_per_param():
    n = 1 << 20
    for state_dtype, per_param in (("float32", 8), ("bfloat16", 4), ("int8", 2 + 8 / 256)):
        opt = fd.optim.Adam([np.zeros(n, np.float32)], state_dtype=state_dtype)
        opt.step([np.ones(n, np.float32)])
        nbytes = sum(sum(a.nbytes for a in b.arrays()) if hasattr(b, "arrays") else b.nbytes
                     for b in opt._state.values())
        assert nbytes / n == per_param


# -- state dicts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("kind", ["sgd", "rmsprop", "adamw"])
def test_state_dict_resume_is_bit_identical(kind, state_dtype):
    rng = np.random.default_rng(5)
    shapes = [(2, 5000), (2, 10)]
    hyper = {"momentum": 0.9} if kind in ("sgd", "rmsprop") else {}
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]
    a = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    b = [p.copy() for p in a]
    first = CLASSES[kind](a, **hyper, state_dtype=state_dtype, population=True, ema_decay=0.9)
    for g in grads[:3]:
        first.step(g)
    b = [p.copy() for p in a]
    second = CLASSES[kind](b, **hyper, state_dtype=state_dtype, population=True, ema_decay=0.9)
    second.load_state_dict(first.state_dict())
    for g in grads[3:]:
        first.step(g)
        second.step(g)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    _assert_same_state(first.state_dict(), second.state_dict())


def _assert_same_state(d1, d2):
    for name, entries in d1["state"].items():
        for e1, e2 in zip(entries, d2["state"][name]):
            if isinstance(e1, dict):
                assert np.array_equal(e1["codes"], e2["codes"])
                assert np.array_equal(e1["absmax"], e2["absmax"])
            else:
                assert e1.dtype == e2.dtype and np.array_equal(e1, e2)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_float32_state_dict_loads_quantized(state_dtype):
    rng = np.random.default_rng(6)
    shapes = [(5000,), (10,)]
    a = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    full = fd.optim.Adam(a)
    full.step([rng.standard_normal(s).astype(np.float32) for s in shapes])
    low = fd.optim.Adam([p.copy() for p in a], state_dtype=state_dtype)
    low.load_state_dict(full.state_dict())
    saved, loaded = full.state_dict()["state"], low.state_dict()["state"]
    for name in saved:
        for j, shape in enumerate(shapes):
            got = _saved_values(loaded[name][j], name, shape, 1)
            want = saved[name][j]
            if state_dtype == "bfloat16":
                assert np.array_equal(loaded[name][j], ref.bfloat16_bits(want))
            elif j == 0:
                code = quantize.dynamic_map(name != "exp_avg_sq")
                codes, absmax = ref.quantize_blockwise(want, code)
                assert np.array_equal(loaded[name][j]["absmax"], absmax)
                assert np.mean(loaded[name][j]["codes"] != codes) < 1e-3
                assert np.allclose(got, want, rtol=0.2, atol=1e-3 * np.abs(want).max())
            else:
                assert np.array_equal(got, want)
    # and back: 8-bit / bfloat16 state dequantized into a float32 optimizer
    back = fd.optim.Adam([p.copy() for p in a])
    back.load_state_dict(low.state_dict())
    for name in saved:
        for j, shape in enumerate(shapes):
            assert np.array_equal(back.state_dict()["state"][name][j],
                                  _saved_values(loaded[name][j], name, shape, 1))


# -- bad input ------------------------------------------------------------------------------------

def _snapshot(opt, params):
    return [p.copy() for p in params], opt.state_dict()


def test_unknown_state_dtype_and_wrong_types():
    p = [np.zeros(10, np.float32)]
    with pytest.raises(ValueError, match="state_dtype.*'float16'"):
        fd.optim.Adam(p, state_dtype="float16")
    with pytest.raises(TypeError, match="state_dtype"):
        fd.optim.Adam(p, state_dtype=np.float32)
    with pytest.raises(TypeError, match="state_dtype='int8' needs float32 params.*float64"):
        fd.optim.Adam([np.zeros(10)], state_dtype="int8")
    with pytest.raises(ValueError, match="min_8bit_size"):
        fd.optim.Adam(p, state_dtype="int8", min_8bit_size=0)


def test_int8_refuses_amsgrad_and_centered_before_anything_changes():
    with pytest.raises(ValueError, match="amsgrad=True is not available with state_dtype='int8'"):
        fd.optim.Adam([np.zeros(10, np.float32)], state_dtype="int8", amsgrad=True)
    with pytest.raises(ValueError, match="centered=True"):
        fd.optim.RMSprop([np.zeros(10, np.float32)], state_dtype="int8", centered=True)
    params = [np.ones(5000, np.float32)]
    opt = fd.optim.Adam(params, state_dtype="int8")
    opt.step([np.ones(5000, np.float32)])
    before = _snapshot(opt, params)
    opt.param_groups[0]["amsgrad"] = True
    for _ in range(2):  # refused on every step until fixed
        with pytest.raises(ValueError, match="amsgrad"):
            opt.step([np.ones(5000, np.float32)])
    assert np.array_equal(params[0], before[0][0])
    _assert_same_state(opt.state_dict(), before[1])


def _int8_dict(shapes, **options):
    params = [np.ones(s, np.float32) for s in shapes]
    opt = fd.optim.Adam(params, state_dtype="int8", **options)
    opt.step([np.full(s, 0.5, np.float32) for s in shapes])
    return opt.state_dict()


@pytest.mark.parametrize("mutate, error, match", [
    (lambda d: d["state"]["exp_avg"][0].update(absmax=np.zeros(3, np.float32)), ValueError,
     r"\['absmax'\] must have shape \(20,\).*another block layout"),
    (lambda d: d["state"]["exp_avg"][0].update(codes=np.zeros(5000, np.int8)), TypeError,
     r"\['codes'\] must have dtype uint8"),
    (lambda d: d["state"]["exp_avg"][0].update(absmax=np.zeros(20)), TypeError,
     r"\['absmax'\] must have dtype float32"),
    (lambda d: d["state"]["exp_avg"][0].pop("absmax"), ValueError, "no 'absmax' entry"),
    (lambda d: d["state"]["exp_avg"].__setitem__(1, {"codes": np.zeros(10, np.uint8),
                                                     "absmax": np.zeros(1, np.float32)}),
     ValueError, "min_8bit_size"),
    (lambda d: d["state"]["exp_avg_sq"].__setitem__(0, np.zeros(5000)), TypeError,
     "must have dtype float32 or uint16 \\(bfloat16 bits\\); got float64"),
])
def test_bad_int8_state_dict_is_refused_whole(mutate, error, match):
    d = _int8_dict([(5000,), (10,)])
    mutate(d)
    params = [np.ones(5000, np.float32), np.ones(10, np.float32)]
    opt = fd.optim.Adam(params, state_dtype="int8", lr=0.5)
    opt.step([np.ones(5000, np.float32), np.ones(10, np.float32)])
    before = _snapshot(opt, params)
    with pytest.raises(error, match=match):
        opt.load_state_dict(d)
    assert opt.param_groups[0]["lr"] == 0.5
    _assert_same_state(opt.state_dict(), before[1])


def test_bfloat16_state_dict_of_other_dtypes_is_refused():
    opt = fd.optim.Momentum([np.ones(10, np.float32)], state_dtype="bfloat16")
    d = opt.state_dict()
    opt.step([np.ones(10, np.float32)])
    d = opt.state_dict()
    d["state"]["velocity"][0] = d["state"]["velocity"][0].astype(np.int16)
    with pytest.raises(TypeError, match=r"uint16 \(bfloat16 bits\) or float32; got int16"):
        opt.load_state_dict(d)


# -- convergence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("kind", ["sgd", "momentum", "rmsprop", "adam"])
def test_a_quadratic_converges(kind, state_dtype):
    """min 0.5 * sum(a * (x - c)**2) from x = 0, a in [0.5, 2]: every state dtype gets there."""
    rng = np.random.default_rng(8)
    n = 8192
    a = rng.uniform(0.5, 2, n).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    x = np.zeros(n, np.float32)
    hyper = {"sgd": dict(lr=0.1, momentum=0.9), "momentum": dict(lr=0.3, beta=0.9),
             "rmsprop": dict(lr=0.01, alpha=0.9), "adam": dict(lr=0.05)}[kind]
    opt = CLASSES[kind]([x], **hyper, state_dtype=state_dtype)
    for _ in range(400):
        opt.step([a * (x - c)])
    assert np.sqrt(np.mean((x - c) ** 2)) < 0.03


def test_the_demo_network_trains_as_well_with_low_precision_state():
    """The demo network (64-256-128-10 on the digits; its two large weights get 8-bit state,
    the rest float32): test accuracy averaged over 3 seeds within 0.01 of float32 state's."""
    from fastdl import data, training

    accuracy = {}
    for state_dtype in ("float32", "bfloat16", "int8"):
        runs = []
        for seed in range(3):
            splits = data.load_digits(seed=seed)
            model = training.build_network(seed=seed)
            training.train(model, splits, epochs=15, seed=seed, state_dtype=state_dtype)
            runs.append(training.accuracy(model, *splits[2]))
        accuracy[state_dtype] = np.mean(runs)
    assert accuracy["float32"] > 0.95
    for state_dtype in ("bfloat16", "int8"):
        assert abs(accuracy[state_dtype] - accuracy["float32"]) <= 0.01, accuracy


@pytest.mark.parametrize("kind", ["sgd", "rmsprop", "adam"])
def test_float64_state_of_float32_params_is_float32_state_exactly(kind):
    """The update math is the params' dtype: float32 results stored in float64 and read back
    are the same numbers, so the run is float32 state's, bit for bit; float32 state of float64
    params rounds the moments and stays within float32 tolerance of float64 state."""
    rng = np.random.default_rng(9)
    hyper = {"momentum": 0.9} if kind != "adam" else {}
    start = rng.standard_normal(3000).astype(np.float32)
    runs = {}
    for dtype, state_dtype in ((np.float32, None), (np.float32, "float64"), (np.float64, None),
                               (np.float64, "float32")):
        p = start.astype(dtype)
        opt = CLASSES[kind]([p], lr=0.01, **hyper, state_dtype=state_dtype)
        grads = np.random.default_rng(10)
        for _ in range(10):
            opt.step([grads.standard_normal(3000).astype(dtype)])
        runs[dtype, state_dtype] = p
        saved = next(iter(opt.state_dict()["state"].values()))[0]
        assert saved.dtype == np.dtype(state_dtype or dtype)
    assert np.array_equal(runs[np.float32, None], runs[np.float32, "float64"])
    assert_close(runs[np.float64, "float32"], runs[np.float64, None], np.float32)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_copy_and_reset_model_move_low_precision_state(state_dtype):
    """A population's copy_model / reset_model (PBT's exploit, a restart) carry the stored
    bits: after copying, model 2 steps exactly as model 0 does; a reset model steps as a new
    optimizer would."""
    rng = np.random.default_rng(11)
    shapes = [(3, 5000), (3, 10)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    opt = fd.optim.Adam(params, lr=0.01, state_dtype=state_dtype, population=True)
    for _ in range(3):
        opt.step([rng.standard_normal(s).astype(np.float32) for s in shapes])
    for p in params:
        p[2] = p[0]
    opt.copy_model(0, 2)
    for p in params:
        p[1] = 0.5
    opt.reset_model(1)
    fresh_params = [np.full(s[1:], 0.5, np.float32) for s in shapes]
    fresh = fd.optim.Adam(fresh_params, lr=0.01, state_dtype=state_dtype)
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for g in grads:
            g[2] = g[0]
        opt.step(grads)
        fresh.step([g[1] for g in grads])
    for p, f in zip(params, fresh_params):
        assert np.array_equal(p[2], p[0])
        assert np.array_equal(p[1], f)
    saved, saved_fresh = opt.state_dict()["state"], fresh.state_dict()["state"]
    for name in saved:
        for entry, single in zip(saved[name], saved_fresh[name]):
            if isinstance(entry, dict):
                for key in ("codes", "absmax"):
                    assert np.array_equal(entry[key][2], entry[key][0])
                    assert np.array_equal(entry[key][1], single[key])
            else:
                assert np.array_equal(entry[2], entry[0]) and np.array_equal(entry[1], single)
