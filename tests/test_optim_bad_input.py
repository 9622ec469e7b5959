"""Bad input to the optimizers, table-driven: each case names its input, the exception type,
the argument the message must name, and proves by a before/after snapshot that nothing of the
optimizer changed (params, state_dict, step count, hyperparameters, options)."""

import copy

import numpy as np
import pytest

import fastdl as fd

SHAPES = [(6, 4), (4,)]
OPTIMIZERS = {
    "SGD": (fd.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "Momentum": (fd.optim.Momentum, dict(lr=0.05, beta=0.8)),
    "RMSprop": (fd.optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
    "Adam": (fd.optim.Adam, dict(lr=0.01, amsgrad=True)),
    "AdamW": (fd.optim.AdamW, dict(lr=0.01)),
}
ALL = tuple(OPTIMIZERS)


def grads_for(step):
    return [np.full(s, 0.1 * (step + 1), np.float32) for s in SHAPES]


def trained(name, rng):
    """An optimizer of class ``name`` after two steps, with clipping and EMA weights."""
    cls, hyper = OPTIMIZERS[name]
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    opt = cls(params, **hyper, max_grad_norm=1.0, ema_decay=0.9)
    for step in range(2):
        opt.step(grads_for(step))
    return opt, params


def snapshot(opt, params):
    """Everything of an optimizer: its state_dict (unless a group lost a key, which
    state_dict cannot save), and the live buffers and tables behind it."""
    complete = all(k in g for g in opt.param_groups for k in opt._defaults)
    return {"params": [p.copy() for p in params],
            "state_dict": opt.state_dict() if complete else None,
            "buffers": {k: v.copy() for k, v in opt._state.items()},
            "ema": None if opt._ema is None else opt._ema.copy(),
            "step_count": opt.step_count, "hyper": opt._hyper.copy(),
            "model": opt._model.copy(),
            "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                       for g in opt.param_groups]}


def assert_same(a, b, where="snapshot"):
    """Deep equality of nested dicts / lists / arrays (dtype included) / scalars."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


def other_name(name):
    return "Adam" if name != "Adam" else "SGD"


def first_buffer(d):
    return next(iter(d["state"]))


def set_in(path, value):
    """A state-dict mutation: ``d[path[0]][path[1]]... = value``."""
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(d) if callable(value) else value
    return mutate


def delete(*path):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


def on_buffer(j, make):
    def mutate(d):
        d["state"][first_buffer(d)][j] = make(d["state"][first_buffer(d)][j])
    return mutate


def trim_first_buffer(d):
    d["state"][first_buffer(d)] = d["state"][first_buffer(d)][:1]


def two(*mutations):
    def mutate(d):
        for m in mutations:
            m(d)
    return mutate


# (id, classes, mutation of a good state dict, error, what the message names)
BAD_LOADS = [
    ("missing step", ALL, delete("step"), ValueError, "'step'"),
    ("missing options", ALL, delete("options"), ValueError, "'options'"),
    ("missing ema", ALL, delete("ema"), ValueError, "'ema'"),
    ("missing group key", ALL, delete("param_groups", 0, "lr"), ValueError, "'lr'"),
    ("missing option key", ALL, delete("options", "grad_scale"), ValueError, "'grad_scale'"),
    ("unknown entry", ALL, set_in(["extra"], 1), ValueError, "extra"),
    ("unknown option", ALL, set_in(["options", "loss_scale"], 2.0), ValueError, "loss_scale"),
    ("unknown group key", ALL, set_in(["param_groups", 0, "lr_decay"], 0.1), ValueError,
     "lr_decay"),
    ("unknown buffer", ALL, set_in(["state", "bogus"], lambda d: d["ema"]), ValueError,
     "bogus"),
    ("buffer named ema", ALL, set_in(["state", "ema"], lambda d: d["ema"]), ValueError,
     "'ema'"),
    ("another optimizer", ALL, set_in(["optimizer"], lambda d: other_name(d["optimizer"])),
     ValueError, "optimizer"),
    ("not a dict", ALL, None, TypeError, "state_dict"),
    ("ema_decay above 1", ALL, set_in(["options", "ema_decay"], 1.5), ValueError,
     "ema_decay"),
    ("ema_decay below 0", ALL, set_in(["options", "ema_decay"], -0.1), ValueError,
     "ema_decay"),
    ("ema_decay as string", ALL, set_in(["options", "ema_decay"], "0.9"), TypeError,
     "ema_decay"),
    ("ema without ema_decay", ALL, set_in(["options", "ema_decay"], None), ValueError,
     "ema_decay"),
    ("negative step", ALL, set_in(["step"], np.array([-1])), ValueError, "step"),
    ("fractional step", ALL, set_in(["step"], np.array([1.5])), ValueError, "step"),
    ("step as list", ALL, set_in(["step"], [2]), TypeError, "step"),
    ("step shape", ALL, set_in(["step"], np.array([2, 2])), ValueError, "step"),
    ("buffer dtype", ALL, on_buffer(0, lambda a: a.astype(np.float64)), TypeError, "[0]"),
    ("buffer shape", ALL, on_buffer(1, lambda a: np.zeros(5, a.dtype)), ValueError, "[1]"),
    ("buffer as list", ALL, on_buffer(1, lambda a: a.tolist()), TypeError, "[1]"),
    ("buffer count", ALL, trim_first_buffer, ValueError, "arrays"),
    ("grad_scale zero", ALL, set_in(["options", "grad_scale"], 0.0), ValueError,
     "grad_scale"),
    ("grad_scale string", ALL, set_in(["options", "grad_scale"], "2"), TypeError,
     "grad_scale"),
    ("max_grad_norm negative", ALL, set_in(["options", "max_grad_norm"], -1.0), ValueError,
     "max_grad_norm"),
    ("skip_nonfinite int", ALL, set_in(["options", "skip_nonfinite"], 1), TypeError,
     "skip_nonfinite"),
    ("negative lr", ALL, set_in(["param_groups", 0, "lr"], -1.0), ValueError, "lr"),
    ("lr as string", ALL, set_in(["param_groups", 0, "lr"], "0.1"), TypeError, "lr"),
    # the saved hyperparameters are good, a later option is not: nothing may be applied
    ("good lr then bad option", ALL,
     two(set_in(["param_groups", 0, "lr"], 0.5), set_in(["options", "grad_scale"], -2.0)),
     ValueError, "grad_scale"),
    ("good lr then bad buffer", ALL,
     two(set_in(["param_groups", 0, "lr"], 0.5), on_buffer(0, lambda a: a[:1])),
     ValueError, "[0]"),
    ("group count", ALL, lambda d: d["param_groups"].append(dict(d["param_groups"][0])),
     ValueError, "parameter groups"),
    ("group params count", ALL, set_in(["param_groups", 0, "params"], [0]), ValueError,
     "params"),
    ("nesterov without momentum", ("SGD",),
     two(set_in(["param_groups", 0, "momentum"], 0.0),
         set_in(["param_groups", 0, "nesterov"], True)), ValueError, "nesterov"),
    ("betas out of range", ("Adam", "AdamW"), set_in(["param_groups", 0, "betas"], (2.0, 0.0)),
     ValueError, "betas"),
    ("alpha as bool", ("RMSprop",), set_in(["param_groups", 0, "alpha"], True), TypeError,
     "alpha"),
]


def expand(table):
    return [pytest.param(name, *case[2:], id=f"{case[0]}-{name}")
            for case in table for name in case[1]]


@pytest.mark.parametrize("name, mutate, error, argument", expand(BAD_LOADS))
def test_bad_state_dict_is_refused_whole(name, mutate, error, argument, rng):
    opt, params = trained(name, rng)
    d = opt.state_dict()
    if mutate is None:
        d = [d]
    else:
        mutate(d)
    before = snapshot(opt, params)
    with pytest.raises(error) as caught:
        opt.load_state_dict(d)
    assert argument in str(caught.value)
    assert_same(before, snapshot(opt, params))
    # and the optimizer goes on as if the load had never been tried
    twin, twin_params = trained(name, np.random.default_rng(0))
    twin_params_start = [p.copy() for p in twin_params]
    for p, q in zip(params, twin_params_start):
        p[...] = q
    opt.load_state_dict(twin.state_dict())
    twin.step(grads_for(2))
    opt.step(grads_for(2))
    for p, q in zip(params, twin_params):
        np.testing.assert_array_equal(p, q)


def set_group(key, value):
    def mutate(opt):
        opt.param_groups[0][key] = value
    return mutate


def drop_group_key(key):
    def mutate(opt):
        del opt.param_groups[0][key]
    return mutate


def sgd_nesterov_without_momentum(opt):
    opt.param_groups[0]["momentum"] = 0.0
    opt.param_groups[0]["nesterov"] = True


# (id, classes, change to the live optimizer before a step, error, what the message names)
BAD_STEPS = [
    ("negative lr", ALL, set_group("lr", -1.0), ValueError, "lr"),
    ("lr as string", ALL, set_group("lr", "0.1"), TypeError, "lr"),
    ("weight_decay None", ALL, set_group("weight_decay", None), TypeError, "weight_decay"),
    ("maximize as int", ALL, set_group("maximize", 1), TypeError, "maximize"),
    ("lost lr", ALL, drop_group_key("lr"), ValueError, "'lr'"),
    ("betas out of range", ("Adam", "AdamW"), set_group("betas", (2.0, 0.0)), ValueError,
     "betas"),
    ("betas as string", ("Adam", "AdamW"), set_group("betas", "ab"), TypeError, "betas"),
    ("amsgrad as float", ("Adam", "AdamW"), set_group("amsgrad", 0.5), TypeError, "amsgrad"),
    ("alpha = 1", ("RMSprop",), set_group("alpha", 1.0), ValueError, "alpha"),
    ("beta negative", ("Momentum",), set_group("beta", -0.1), ValueError, "beta"),
    ("nesterov without momentum", ("SGD",), sgd_nesterov_without_momentum, ValueError,
     "nesterov"),
    ("grad aliases its param", ALL, None, ValueError, "grads[1]"),
]


@pytest.mark.parametrize("name, change, error, argument", expand(BAD_STEPS))
def test_bad_step_is_refused_every_time_and_changes_nothing(name, change, error, argument,
                                                             rng):
    opt, params = trained(name, rng)
    grads = grads_for(2)
    if change is None:
        grads[1] = params[1]
    else:
        change(opt)
    before = snapshot(opt, params)
    for _ in range(2):  # a rejected value is checked again on the next step
        with pytest.raises(error) as caught:
            opt.step(grads)
        assert argument in str(caught.value)
        assert_same(before, snapshot(opt, params))


BAD_SETTINGS = [
    ("lr negative", ALL, "lr", -3.0, ValueError),
    ("lr as string", ALL, "lr", "0.1", TypeError),
    ("grad_scale zero", ALL, "grad_scale", 0.0, ValueError),
    ("grad_scale as string", ALL, "grad_scale", "2", TypeError),
    ("max_grad_norm inf", ALL, "max_grad_norm", float("inf"), ValueError),
    ("max_grad_norm per model without population", ALL, "max_grad_norm", [1.0, 2.0],
     ValueError),
    ("skip_nonfinite as string", ALL, "skip_nonfinite", "yes", TypeError),
]


@pytest.mark.parametrize("name, attribute, value, error",
                         [pytest.param(name, *case[2:], id=f"{case[0]}-{name}")
                          for case in BAD_SETTINGS for name in case[1]])
def test_bad_setting_is_refused_and_changes_nothing(name, attribute, value, error, rng):
    opt, params = trained(name, rng)
    before = snapshot(opt, params)
    with pytest.raises(error) as caught:
        setattr(opt, attribute, value)
    assert attribute in str(caught.value)
    assert_same(before, snapshot(opt, params))


def buffer(n=10):
    return np.zeros(n, np.float32)


def overlapping(kind):
    buf = buffer()
    return {"same buffer twice": [buf, buf[:]],
            "overlapping slices": [buf[:3], buf[2:]],
            "overlap listed backwards": [buf[5:], buf[:6]],
            "overlap across a gap": [buf[:2], buf[4:6], buf[1:3]],
            "2-D view and slice": [buf.reshape(2, 5)[1], buf[4:6]]}[kind]


# (id, classes, params, keywords, error, what the message names)
BAD_BUILDS = [
    *[(kind, ALL, lambda kind=kind: overlapping(kind), {}, ValueError, "overlaps params[")
      for kind in ["same buffer twice", "overlapping slices", "overlap listed backwards",
                   "overlap across a gap", "2-D view and slice"]],
    ("population as string", ALL, lambda: [buffer()], dict(population="y"), TypeError,
     "population"),
    ("lr as string", ALL, lambda: [buffer()], dict(lr="0.1"), TypeError, "lr"),
    ("lr as list", ALL, lambda: [buffer()], dict(lr=[0.1]), ValueError, "lr"),
    ("grad_scale as string", ALL, lambda: [buffer()], dict(grad_scale="2"), TypeError,
     "grad_scale"),
    ("max_grad_norm as string", ALL, lambda: [buffer()], dict(max_grad_norm="1"), TypeError,
     "max_grad_norm"),
    ("skip_nonfinite as int", ALL, lambda: [buffer()], dict(skip_nonfinite=1), TypeError,
     "skip_nonfinite"),
    ("ema_decay as string", ALL, lambda: [buffer()], dict(ema_decay="0.9"), TypeError,
     "ema_decay"),
    ("ema_decay above 1", ALL, lambda: [buffer()], dict(ema_decay=1.01), ValueError,
     "ema_decay"),
    ("group lr as string", ALL, lambda: [{"params": [buffer()]}, {"params": [buffer()],
                                                                  "lr": "0.1"}],
     {}, TypeError, "param_groups[1]['lr']"),
    ("group weight_decay negative", ALL, lambda: [{"params": [buffer()],
                                                   "weight_decay": -1.0}],
     {}, ValueError, "weight_decay"),
    ("nesterov as int", ("SGD",), lambda: [buffer()], dict(nesterov=1), TypeError, "nesterov"),
    ("betas as string", ("Adam", "AdamW"), lambda: [buffer()], dict(betas="ab"), TypeError,
     "betas"),
    ("centered as string", ("RMSprop",), lambda: [buffer()], dict(centered="no"), TypeError,
     "centered"),
]


@pytest.mark.parametrize("name, make_params, keywords, error, argument", expand(BAD_BUILDS))
def test_bad_construction(name, make_params, keywords, error, argument):
    params = make_params()
    arrays = [p for x in params for p in (x["params"] if isinstance(x, dict) else [x])]
    for a in arrays:
        a[...] = np.arange(a.size).reshape(a.shape)
    before = [a.copy() for a in arrays]
    with pytest.raises(error) as caught:
        OPTIMIZERS[name][0](params, **keywords)
    assert argument in str(caught.value)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


def test_nesterov_set_between_steps_is_refused_on_every_step():
    """The bug of issue 13: the second step used to accept the value the first refused."""
    p = [np.ones(3, np.float32)]
    opt = fd.optim.SGD(p, lr=0.1)
    opt.param_groups[0]["nesterov"] = True
    for _ in range(3):
        with pytest.raises(ValueError, match="nesterov"):
            opt.step([np.ones(3, np.float32)])
    assert opt.step_count == 0 and np.all(p[0] == 1)
    opt.param_groups[0]["nesterov"] = False
    opt.step([np.ones(3, np.float32)])
    np.testing.assert_allclose(p[0], 0.9)


def test_a_bad_later_group_commits_no_earlier_group():
    """Group 0's new value waits until group 1 passes too (the row flags stay in step)."""
    a, b = np.zeros(3, np.float32), np.zeros(3, np.float32)
    opt = fd.optim.SGD([{"params": [a]}, {"params": [b]}], lr=1.0)
    opt.param_groups[0]["momentum"] = 0.5  # valid, needs the momentum buffer
    opt.param_groups[1]["lr"] = -1.0
    g = [np.ones(3, np.float32)] * 2
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]"):
        opt.step(g)
    assert opt._hyper[0, 0, opt._column("momentum")] == 0.0
    opt.param_groups[1]["lr"] = 1.0
    opt.step(g)
    opt.step(g)
    np.testing.assert_allclose(a, -1.0 - 1.5)  # buffer 1, then 0.5 * 1 + 1
    np.testing.assert_allclose(b, -2.0)


def test_views_side_by_side_stay_allowed_and_flat():
    params = fd.optim.flat_params([(3, 4), (4,), (2,)])
    opt = fd.optim.Adam(params)
    assert opt._ops.flat_plan is not None
    buf = np.zeros(400, np.float32)
    views = [buf[i * 2:(i + 1) * 2] for i in range(200)][::-1]  # any order
    fd.optim.SGD(views).step([np.ones(2, np.float32)] * 200)
    assert np.all(buf == -1e-3)


def test_grads_may_share_memory_with_each_other():
    """Grads are only read: one gradient buffer for two params of one shape is fine."""
    a, b = np.zeros(3), np.zeros(3)
    g = np.ones(3)
    fd.optim.SGD([a, b], lr=0.5).step([g, g])
    np.testing.assert_array_equal(a, -0.5)
    np.testing.assert_array_equal(b, -0.5)


def test_grad_viewing_another_param_is_refused():
    params = fd.optim.flat_params([(3,), (3,)])
    opt = fd.optim.SGD(params)
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory with params\[1\]"):
        opt.step([params[1], np.ones(3, np.float32)])
    assert opt.step_count == 0


def test_overlap_among_many_params_is_found_and_named():
    buf = np.zeros(2000, np.float32)
    views = [buf[i * 10:(i + 1) * 10] for i in range(200)]
    with pytest.raises(ValueError, match=r"params\[200\] overlaps params\[57\]"):
        fd.optim.Adam(views + [buf[575:576]])


def test_grad_aliasing_among_many_params_is_refused():
    """More than a few tensors take the vectorized check."""
    params = fd.optim.flat_params([(3,)] * 20)
    grads = [np.ones(3, np.float32) for _ in params]
    opt = fd.optim.SGD(params)
    opt.step(grads)
    grads[13] = params[4]
    with pytest.raises(ValueError, match=r"grads\[13\] shares memory with params\[4\]"):
        opt.step(grads)
    assert opt.step_count == 1
