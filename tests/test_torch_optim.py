"""fastdl.torch's optimizers against torch.optim itself: the same steps, the same state dicts
(both ways), every lr scheduler, hooks, closures, grads that are None, and bad input."""

import copy
import math

import numpy as np
import pytest

from helpers import require

torch = require("torch")
import fastdl.torch as fdt  # noqa: E402

# (torch class, fastdl.torch class, options): every option of every algorithm
CASES = {
    "sgd": ("SGD", dict(lr=0.1)),
    "sgd-momentum": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "sgd-nesterov": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    "rmsprop": ("RMSprop", dict(lr=0.01)),
    "rmsprop-centered-momentum": ("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.5,
                                                  centered=True, weight_decay=0.1)),
    "adam": ("Adam", dict(lr=0.01)),
    "adam-amsgrad": ("Adam", dict(lr=0.01, betas=(0.8, 0.99), amsgrad=True, weight_decay=0.1,
                                  maximize=True)),
    "adam-decoupled": ("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "adamw": ("AdamW", dict(lr=0.01)),
    "adamw-amsgrad": ("AdamW", dict(lr=0.01, amsgrad=True, weight_decay=0.05)),
}
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def make_params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (2, 3, 4), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(step, *param_lists, none=()):
    """The same random grads for each list of params; params listed in ``none`` get None."""
    g = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in param_lists[0]]
    for params in param_lists:
        for j, (p, grad) in enumerate(zip(params, grads)):
            p.grad = None if j in none else grad.clone()


def assert_params_close(got, want, what=""):
    for j, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.detach(), b.detach(), **TOLERANCE[a.dtype],
                                   msg=f"{what} param {j}")


def pair(case, dtype=torch.float64, groups=False):
    name, options = CASES[case]
    want, got = make_params(dtype), None
    got = clone_params(want)
    if groups:  # two groups with their own lr and weight decay
        def split(ps):
            return [{"params": ps[:2]}, {"params": ps[2:], "lr": options["lr"] / 3,
                                         "weight_decay": 0.2}]
        return (getattr(torch.optim, name)(split(want), **options),
                getattr(fdt, name)(split(got), **options), want, got)
    return (getattr(torch.optim, name)(want, **options), getattr(fdt, name)(got, **options),
            want, got)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("case", CASES)
def test_steps_equal_torch(case, groups, dtype):
    ref, opt, want, got = pair(case, dtype, groups)
    for step in range(12):
        set_grads(step, want, got)
        ref.step()
        opt.step()
    assert_params_close(got, want, case)
    for j, (p, q) in enumerate(zip(want, got)):
        assert set(ref.state[p]) == set(opt.state[q])
        for key, value in ref.state[p].items():
            torch.testing.assert_close(opt.state[q][key].to(value.dtype), value,
                                       **TOLERANCE[dtype], msg=f"state {key} of param {j}")


@pytest.mark.parametrize("case", ["sgd-momentum", "rmsprop-centered-momentum", "adam-amsgrad"])
def test_grads_that_are_none_leave_params_and_step_counts_alone(case):
    ref, opt, want, got = pair(case)
    pattern = [(), (1,), (1, 3), (), (0,), (), (2,)]  # per step: params without a grad
    for step, none in enumerate(pattern):
        set_grads(step, want, got, none=none)
        before = [p.detach().clone() for p in got]
        ref.step()
        opt.step()
        for j in none:
            assert torch.equal(got[j], before[j])
    assert_params_close(got, want, case)
    for p, q in zip(want, got):
        if "step" in ref.state[p]:
            assert float(opt.state[q]["step"]) == float(ref.state[p]["step"])


def test_a_param_never_given_a_grad_has_no_state():
    ref, opt, want, got = pair("adam")
    for step in range(3):
        set_grads(step, want, got, none=(2,))
        ref.step()
        opt.step()
    assert got[2] not in opt.state and want[2] not in ref.state
    assert sorted(opt.state_dict()["state"]) == sorted(ref.state_dict()["state"]) == [0, 1, 3]


def test_closure_runs_with_grad_and_its_loss_is_returned():
    params = make_params()
    opt = fdt.Adam(params, lr=0.01)

    def closure():
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.requires_grad and loss.item() > 0
    ref_params = make_params()
    ref = torch.optim.Adam(ref_params, lr=0.01)

    def ref_closure():
        ref.zero_grad()
        loss = sum((p ** 2).sum() for p in ref_params)
        loss.backward()
        return loss

    ref.step(ref_closure)
    assert_params_close(params, ref_params)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_and_a_real_training_loop_match_torch(set_to_none):
    """A torch MLP trained 10 steps with fastdl.torch.AdamW and with torch.optim.AdamW, under
    a scheduler, gives the same losses (float64: to 1e-9)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model = model.double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    losses = []
    for net, cls in ((model, torch.optim.AdamW), (twin, fdt.AdamW)):
        opt = cls(net.parameters(), lr=0.05, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        run = []
        for _ in range(10):
            opt.zero_grad(set_to_none=set_to_none)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            schedule.step()
            run.append(loss.item())
        losses.append(run)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-9, atol=1e-11)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5], gamma=0.3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "CosineAnnealingWarmRestarts":
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e)),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda e: 0.9),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=4),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=8),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.001, 0.05, step_size_up=3),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[2]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
}


@pytest.mark.parametrize("case", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_lr_scheduler(scheduler, case):
    """Schedulers write param_groups[i]["lr"] (OneCycleLR and CyclicLR the momentum or betas
    too): fastdl's steps follow them exactly."""
    ref, opt, want, got = pair(case, groups=True)
    schedules = [SCHEDULERS[scheduler](o) for o in (ref, opt)]
    for step in range(10):
        set_grads(step, want, got)
        ref.step()
        opt.step()
        for s in schedules:
            s.step(1.0) if scheduler == "ReduceLROnPlateau" else s.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    assert_params_close(got, want, scheduler)


TORCH_TWINS = [c for c in CASES]


@pytest.mark.parametrize("case", TORCH_TWINS)
def test_state_dict_moves_between_torch_and_fastdl_both_ways(case):
    """torch -> fastdl -> torch: 4 steps in one, the state loaded into the other, 4 more, and
    both continue identically to an uninterrupted torch run."""
    name, options = CASES[case]
    straight = make_params()
    straight_opt = getattr(torch.optim, name)(straight, **options)
    for step in range(12):
        set_grads(step, straight)
        straight_opt.step()

    a = make_params()
    torch_opt = getattr(torch.optim, name)(a, **options)
    for step in range(4):
        set_grads(step, a)
        torch_opt.step()
    b = clone_params(a)
    fastdl_opt = getattr(fdt, name)(b, **options)
    fastdl_opt.load_state_dict(torch_opt.state_dict())
    for step in range(4, 8):
        set_grads(step, b)
        fastdl_opt.step()
    saved = fastdl_opt.state_dict()
    assert set(saved["param_groups"][0]) == set(torch_opt.state_dict()["param_groups"][0])
    c = clone_params(b)
    back = getattr(torch.optim, name)(c, **options)
    back.load_state_dict(saved)
    for step in range(8, 12):
        set_grads(step, c)
        back.step()
    assert_params_close(c, straight, case)


def test_state_dict_is_a_copy_and_the_state_is_live():
    params = make_params()
    opt = fdt.Adam(params, lr=0.01)
    set_grads(0, params)
    opt.step()
    saved = opt.state_dict()
    live = opt.state[params[0]]["exp_avg"]
    before = live.clone()
    set_grads(1, params)
    opt.step()
    assert not torch.equal(live, before)  # the state entry follows the steps
    assert torch.equal(saved["state"][0]["exp_avg"], before)  # the saved copy does not
    assert float(opt.state[params[0]]["step"]) == 2.0
    assert saved["state"][0]["step"].dtype == torch.float32  # torch's layout


def test_momentum_round_trips_within_fastdl():
    a = make_params()
    opt = fdt.Momentum(a, lr=0.1, beta=0.8)
    for step in range(3):
        set_grads(step, a)
        opt.step()
    b = clone_params(a)
    twin = fdt.Momentum(b, lr=0.1, beta=0.8)
    twin.load_state_dict(opt.state_dict())
    for step in range(3, 6):
        set_grads(step, a, b)
        opt.step()
        twin.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert set(opt.state[a[0]]) == {"step", "velocity"}


def test_add_param_group_keeps_the_state_of_the_others():
    ref_params, params = make_params(), None
    params = clone_params(ref_params)
    ref = torch.optim.Adam(ref_params[:2], lr=0.01)
    opt = fdt.Adam(params[:2], lr=0.01)
    for step in range(3):
        set_grads(step, ref_params, params)
        ref.step()
        opt.step()
    ref.add_param_group({"params": ref_params[2:], "lr": 0.02})
    opt.add_param_group({"params": params[2:], "lr": 0.02})
    for step in range(3, 7):
        set_grads(step, ref_params, params)
        ref.step()
        opt.step()
    assert_params_close(params, ref_params)
    assert float(opt.state[params[0]]["step"]) == 7 and float(opt.state[params[2]]["step"]) == 4


def test_fastdl_extras_clip_skip_scale_and_ema():
    ref_params = make_params()
    params = clone_params(ref_params)
    ref = torch.optim.Adam(ref_params, lr=0.01)
    opt = fdt.Adam(params, lr=0.01, max_grad_norm=0.5, grad_scale=4.0, skip_nonfinite=True,
                   ema_decay=0.9)
    ema = [p.detach().clone() for p in params]
    for step in range(6):
        set_grads(step, ref_params, params)
        for p in params:
            p.grad *= 4.0  # a scaled loss: fastdl divides by grad_scale first
        if step == 3:
            params[1].grad[0] = float("inf")
            before = [p.detach().clone() for p in params]
            opt.step()
            assert opt.last_info.found_inf
            for p, b in zip(params, before):
                assert torch.equal(p, b)
            continue
        norm = torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
        ref.step()
        opt.step()
        assert math.isclose(opt.last_info.grad_norm, float(norm), rel_tol=1e-9)
        for e, p in zip(ema, params):
            e.mul_(0.9).add_(0.1 * p.detach())
    set_grads(3, ref_params)  # torch takes the step fastdl skipped last; compare at the end
    assert float(opt.state[params[0]]["step"]) == 5
    for e, got in zip(ema, opt.ema_params):
        torch.testing.assert_close(got, e, rtol=1e-9, atol=1e-11)


def test_step_hooks_run():
    params = make_params()
    opt = fdt.SGD(params, lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    set_grads(0, params)
    opt.step()
    assert calls == ["pre", "post"]


def test_channels_last_params_are_stepped_in_their_layout():
    conv = torch.nn.Conv2d(3, 4, 3).double().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(conv)
    ref, opt = torch.optim.Adam(conv.parameters(), lr=0.01), fdt.Adam(twin.parameters(), lr=0.01)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    for _ in range(3):
        for net, o in ((conv, ref), (twin, opt)):
            o.zero_grad()
            net(x).square().sum().backward()
            o.step()
    assert twin.weight.is_contiguous(memory_format=torch.channels_last)
    assert_params_close(list(twin.parameters()), list(conv.parameters()))
    assert opt.state[twin.weight]["exp_avg"].stride() == twin.weight.stride()


def test_params_grads_and_state_are_used_in_place_and_the_plan_is_cached():
    params = make_params(torch.float32)
    opt = fdt.Adam(params, lr=0.01)
    set_grads(0, params)
    opt.step()
    core = opt._core
    for p, array in zip(params, core._params):
        assert np.shares_memory(array, p.detach().numpy())
    assert list(opt._grad_addresses) == [p.grad.data_ptr() for p in params]
    plan = opt._plan
    for p in params:
        p.grad.mul_(0.5)  # the same grad tensors, changed in place
    opt.step()
    assert opt._plan is plan  # nothing re-read
    params[1].grad = params[1].grad.clone()  # a new grad tensor: a new plan
    opt.step()
    assert opt._plan is not plan and opt._grad_addresses[1] == params[1].grad.data_ptr()
    state = opt.state[params[0]]["exp_avg"]
    assert np.shares_memory(state.numpy(), core._state["exp_avg"])


def test_torchs_own_optimizer_kernels_never_run(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch's optimizer kernel ran")

    for name in dir(torch):
        if name.startswith(("_fused_adam", "_fused_sgd", "_foreach_")):
            monkeypatch.setattr(torch, name, refuse)
    for case in CASES:
        _, opt, _, got = pair(case)
        for step in range(2):
            set_grads(step, got)
            opt.step()


def test_foreach_and_fused_are_accepted_and_ignored():
    params = make_params()
    opt = fdt.Adam(params, lr=0.01, foreach=True, fused=True)
    assert opt.param_groups[0]["fused"] is True
    set_grads(0, params)
    opt.step()


def _bad(*shapes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]


BAD_CONSTRUCTION = {
    "bfloat16": (lambda: fdt.Adam(_bad((3,), dtype=torch.bfloat16)), TypeError, "bfloat16"),
    "float16": (lambda: fdt.SGD(_bad((3,), dtype=torch.float16)), TypeError, "float16"),
    "mixed-dtypes": (lambda: fdt.Adam(_bad((3,)) + _bad((2,), dtype=torch.float64)),
                     TypeError, "one dtype"),
    "capturable": (lambda: fdt.Adam(_bad((3,)), capturable=True), ValueError, "capturable"),
    "differentiable": (lambda: fdt.SGD(_bad((3,)), differentiable=True), ValueError,
                       "differentiable"),
    "negative-lr": (lambda: fdt.Adam(_bad((3,)), lr=-1.0), ValueError, "lr"),
    "nesterov-without-momentum": (lambda: fdt.SGD(_bad((3,)), nesterov=True), ValueError,
                                  "nesterov"),
    "not-dense": (lambda: fdt.Adam([torch.nn.Parameter(torch.zeros(4, 4)[:, ::2])]),
                  ValueError, "dense"),
}


@pytest.mark.parametrize("case", BAD_CONSTRUCTION)
def test_bad_construction(case):
    make, error, words = BAD_CONSTRUCTION[case]
    with pytest.raises(error, match=words):
        make()


def test_bad_grads_raise_before_anything_changes():
    params = _bad((3,), (4,))
    opt = fdt.Adam(params, lr=0.1)
    cases = {
        "sparse": (torch.zeros(4).to_sparse(), TypeError, "sparse"),
    }
    for what, (grad, error, words) in cases.items():
        params[0].grad = torch.ones(3)
        params[1].grad = grad
        before = [p.detach().clone() for p in params]
        with pytest.raises(error, match=words):
            opt.step()
        for p, b in zip(params, before):
            assert torch.equal(p, b), what
    params[1].grad = torch.ones(4)
    params[0].grad = torch.ones(3, 2).t()[0]  # a non-contiguous grad of the right shape
    with pytest.raises(ValueError, match="strides"):
        opt.step()


def test_bad_lr_set_by_hand_raises_at_the_step():
    params = _bad((3,))
    opt = fdt.Adam(params, lr=0.1)
    params[0].grad = torch.ones(3)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(params[0], torch.zeros(3))


def test_bad_state_dicts_change_nothing():
    params = make_params()
    opt = fdt.Adam(params, lr=0.01)
    set_grads(0, params)
    opt.step()
    good = opt.state_dict()

    def edited(change):
        d = copy.deepcopy(good)
        change(d)
        return d

    bad = {
        "not-a-dict": ([1], TypeError),
        "no-state": (edited(lambda d: d.pop("state")), ValueError),
        "group-count": (edited(lambda d: d["param_groups"].append(d["param_groups"][0])),
                        ValueError),
        "shape": (edited(lambda d: d["state"][0].update(
            exp_avg=torch.zeros(2, dtype=torch.float64))), ValueError),
        "dtype": (edited(lambda d: d["state"][0].update(
            exp_avg=d["state"][0]["exp_avg"].float())), TypeError),
        "unknown-buffer": (edited(lambda d: d["state"][0].update(velocity=torch.zeros(5, 3))),
                           ValueError),
        "negative-step": (edited(lambda d: d["state"][0].update(step=torch.tensor(-1.0))),
                          ValueError),
        "bad-lr": (edited(lambda d: d["param_groups"][0].update(lr=-0.5)), ValueError),
        "unknown-param": (edited(lambda d: d["state"].update({9: {}})), ValueError),
    }
    before = copy.deepcopy(opt.state_dict())
    for name, (d, error) in bad.items():
        with pytest.raises(error):
            opt.load_state_dict(d)
        after = opt.state_dict()
        assert after["param_groups"] == before["param_groups"], name
        for j, entry in before["state"].items():
            for key, value in entry.items():
                assert torch.equal(after["state"][j][key], value), (name, key)
