"""Bad input: a clear error naming the argument, and nothing modified."""

import numpy as np
import pytest

import fastdl as fd


class FakeDeviceArray:
    """Stands in for a CuPy array / CUDA tensor: only the interface fastdl looks for."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False),
                "version": 3}


def trained_adam(rng):
    params = [rng.standard_normal((6, 4)).astype(np.float32),
              rng.standard_normal(4).astype(np.float32)]
    opt = fd.optim.Adam(params, lr=0.01, max_grad_norm=1.0, ema_decay=0.9)
    opt.step([np.ones((6, 4), np.float32), np.ones(4, np.float32)])
    return opt, params


def snapshot(opt, params):
    return [p.copy() for p in params], opt.state_dict()


def assert_unchanged(opt, params, before):
    old_params, old_state = before
    for p, q in zip(params, old_params):
        np.testing.assert_array_equal(p, q)
    state = opt.state_dict()
    np.testing.assert_array_equal(state["step"], old_state["step"])
    for name, arrays in old_state["state"].items():
        for a, b in zip(arrays, state["state"][name]):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(old_state["ema"], state["ema"]):
        np.testing.assert_array_equal(a, b)


BAD_GRADS = [
    ("count", lambda: [np.ones((6, 4), np.float32)], ValueError, "one array per param"),
    ("shape", lambda: [np.ones((4, 6), np.float32), np.ones(4, np.float32)], ValueError,
     r"grads\[0\] must have shape \(6, 4\)"),
    ("dtype", lambda: [np.ones((6, 4)), np.ones(4, np.float32)], TypeError,
     r"grads\[0\] must have dtype float32"),
    ("integer", lambda: [np.ones((6, 4), np.float32), np.ones(4, np.int32)], TypeError,
     r"grads\[1\] must have dtype float32"),
    ("non-contiguous", lambda: [np.ones((4, 6), np.float32).T, np.ones(4, np.float32)],
     ValueError, r"grads\[0\] must be C-contiguous"),
    ("list", lambda: [np.ones((6, 4), np.float32), [1.0] * 4], TypeError,
     r"grads\[1\] must be a NumPy array"),
    ("device", lambda: [np.ones((6, 4), np.float32), FakeDeviceArray((4,), np.float32)],
     TypeError, r"grads\[1\] is a GPU array"),
    ("single array", lambda: np.ones((6, 4), np.float32), TypeError, "list of arrays"),
]


@pytest.mark.parametrize("make_grads, error, message", [b[1:] for b in BAD_GRADS],
                         ids=[b[0] for b in BAD_GRADS])
def test_bad_grads_raise_and_change_nothing(make_grads, error, message, rng):
    opt, params = trained_adam(rng)
    before = snapshot(opt, params)
    with pytest.raises(error, match=message):
        opt.step(make_grads())
    assert_unchanged(opt, params, before)


def test_bad_grads_after_a_cached_step_still_raise(rng):
    opt, params = trained_adam(rng)
    grads = [np.ones((6, 4), np.float32), np.ones(4, np.float32)]
    opt.step(grads)
    before = snapshot(opt, params)
    grads[0].shape = (4, 6)  # the same array object, reshaped in place
    with pytest.raises(ValueError, match=r"grads\[0\] must have shape"):
        opt.step(grads)
    assert_unchanged(opt, params, before)


BAD_HYPER = [
    ("negative lr", fd.optim.Adam, dict(lr=-0.1), ValueError, "lr must be >= 0; got -0.1"),
    ("nan lr", fd.optim.SGD, dict(lr=float("nan")), ValueError, "lr must be >= 0"),
    ("beta1 = 1", fd.optim.Adam, dict(betas=(1.0, 0.999)), ValueError,
     r"betas\[0\] must be in \[0, 1\)"),
    ("beta2 < 0", fd.optim.AdamW, dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    ("betas not a pair", fd.optim.Adam, dict(betas=0.9), TypeError, "betas must be a pair"),
    ("betas of three", fd.optim.Adam, dict(betas=(0.9, 0.99, 0.999)), ValueError,
     "betas must be a pair"),
    ("momentum beta", fd.optim.Momentum, dict(beta=1.5), ValueError, r"beta must be in \[0, 1\)"),
    ("alpha", fd.optim.RMSprop, dict(alpha=-1), ValueError, "alpha"),
    ("eps", fd.optim.RMSprop, dict(eps=-1e-8), ValueError, "eps must be >= 0"),
    ("weight decay", fd.optim.SGD, dict(weight_decay=-1), ValueError, "weight_decay"),
    ("nesterov + dampening", fd.optim.SGD, dict(momentum=0.9, dampening=0.1, nesterov=True),
     ValueError, "nesterov"),
    ("nesterov without momentum", fd.optim.SGD, dict(nesterov=True), ValueError, "nesterov"),
    ("lr as string", fd.optim.Adam, dict(lr="0.1"), TypeError, "lr must be a real number"),
    ("flag as float", fd.optim.Adam, dict(amsgrad=0.5), TypeError, "amsgrad must be a bool"),
    ("per-model lr without population", fd.optim.Adam, dict(lr=np.array([0.1, 0.2])),
     ValueError, "population=True"),
    ("grad_scale", fd.optim.Adam, dict(grad_scale=0.0), ValueError, "grad_scale must be > 0"),
    ("max_grad_norm", fd.optim.Adam, dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    ("ema_decay", fd.optim.Adam, dict(ema_decay=1.5), ValueError, r"ema_decay must be in"),
    ("skip_nonfinite", fd.optim.Adam, dict(skip_nonfinite="yes"), TypeError, "skip_nonfinite"),
    ("unknown keyword", fd.optim.Adam, dict(momentum=0.9), TypeError, "momentum"),
]


@pytest.mark.parametrize("cls, hyper, error, message", [b[1:] for b in BAD_HYPER],
                         ids=[b[0] for b in BAD_HYPER])
def test_bad_hyperparameters(cls, hyper, error, message):
    p = np.zeros(5, np.float32)
    with pytest.raises(error, match=message):
        cls([p], **hyper)
    assert not p.any()


BAD_PARAMS = [
    ("integer", [np.zeros(3, np.int64)], TypeError, r"params\[0\] must have dtype float32"),
    ("float16", [np.zeros(3, np.float16)], TypeError, "float32 or float64"),
    ("mixed dtypes", [np.zeros(3, np.float32), np.zeros(3)], TypeError, "one dtype"),
    ("non-contiguous", [np.zeros((3, 4), np.float32).T], ValueError, "C-contiguous"),
    ("duplicate", None, ValueError, "more than once"),
    ("empty", [], ValueError, "empty"),
    ("single array", np.zeros(3, np.float32), TypeError, "list of arrays"),
    ("list of lists", [[1.0, 2.0]], TypeError, "NumPy array"),
    ("unknown group key", [{"params": [np.zeros(3)], "lr_decay": 0.1}], ValueError,
     "unknown option"),
    ("read-only", None, ValueError, "read-only"),
]


@pytest.mark.parametrize("params, error, message", [b[1:] for b in BAD_PARAMS],
                         ids=[b[0] for b in BAD_PARAMS])
def test_bad_params(params, error, message):
    if message == "more than once":
        a = np.zeros(3)
        params = [a, a]
    elif message == "read-only":
        a = np.zeros(3)
        a.flags.writeable = False
        params = [a]
    with pytest.raises(error, match=message):
        fd.optim.Adam(params)


def test_bad_group_change_is_caught_at_step_before_anything_changes(rng):
    opt, params = trained_adam(rng)
    before = snapshot(opt, params)
    opt.param_groups[0]["lr"] = -1.0
    grads = [np.ones((6, 4), np.float32), np.ones(4, np.float32)]
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step(grads)
    assert_unchanged(opt, params, before)
    opt.param_groups[0]["lr"] = 0.01
    opt.step(grads)
    assert opt.step_count == 2


def test_bad_settable_values(rng):
    opt, params = trained_adam(rng)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.lr = -3
    assert opt.lr == 0.01
    with pytest.raises(ValueError, match="grad_scale"):
        opt.grad_scale = float("inf")
    with pytest.raises(TypeError, match="skip_nonfinite"):
        opt.skip_nonfinite = 1


def test_bad_state_dict_changes_nothing(rng):
    opt, params = trained_adam(rng)
    before = snapshot(opt, params)
    broken = opt.state_dict()
    broken["state"]["exp_avg"][1] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"exp_avg'\]\[1\] must have shape \(4,\)"):
        opt.load_state_dict(broken)
    bad_lr = opt.state_dict()
    bad_lr["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(bad_lr)
    assert_unchanged(opt, params, before)
    assert opt.lr == 0.01


@pytest.mark.skipif(fd.cuda_available(), reason="a usable GPU is present")
def test_gpu_params_without_a_gpu_are_a_clear_error():
    with pytest.raises(RuntimeError, match="no usable CUDA GPU"):
        fd.optim.Adam([FakeDeviceArray((3,), np.float32)])


def test_params_on_two_devices_are_refused():
    with pytest.raises(TypeError, match=r"params\[1\] is a GPU array but params\[0\] is on cpu"):
        fd.optim.Adam([np.zeros(3, np.float32), FakeDeviceArray((3,), np.float32)])
