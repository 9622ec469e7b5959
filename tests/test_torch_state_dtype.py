"""fastdl.torch's optimizers with low-precision state (SPEC.md, "Low-precision optimizer state"):
the same bits as the core fastdl.optim optimizers, live state views of the stored dtype
(bfloat16 tensors; bitsandbytes' state1/absmax1 names for 8-bit params), bit-identical state
dict round trips, torch.optim's float32 state converted on load, bad 8-bit layouts rejected,
and bitsandbytes' own Adam8bit as a second oracle."""

import copy

import numpy as np
import pytest

from helpers import OPTIM_TOLERANCE, require

torch = require("torch")
import fastdl as fd  # noqa: E402
import fastdl.torch as fdt  # noqa: E402

LOW = ["bfloat16", "int8"]
# class name, options, state buffers (torch's names, in torch's order: 8-bit state 1, 2)
OPTIMIZERS = {
    "sgd": ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01), ["momentum_buffer"]),
    "momentum": ("Momentum", dict(lr=0.05, beta=0.8), ["velocity"]),
    "rmsprop": ("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.5),
                ["square_avg", "momentum_buffer"]),
    "adam": ("Adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
             ["exp_avg", "exp_avg_sq"]),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=0.1), ["exp_avg", "exp_avg_sq"]),
}
BLOCK = 256
SPEC = OPTIM_TOLERANCE[np.float32]  # rtol 1e-4, atol 1e-5


def make_module(seed=0):
    """nn.Linear(64, 128): an 8192-element weight (8-bit state at the default
    min_8bit_size=4096) and a 128-element bias (float32 state)."""
    module = torch.nn.Linear(64, 128)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def backward(module, step):
    """The same batch at each ``step``: a squared error's grads into ``module``."""
    g = torch.Generator().manual_seed(100 + step)
    x, target = torch.randn(16, 64, generator=g), torch.randn(16, 128, generator=g)
    loss = (module(x) - target).square().mean()
    loss.backward()
    return loss


def make_opt(case, params, state_dtype, **extra):
    name, options, _ = OPTIMIZERS[case]
    return getattr(fdt, name)(params, **options, state_dtype=state_dtype, **extra)


def make_core(case, arrays, state_dtype):
    name, options, _ = OPTIMIZERS[case]
    return getattr(fd.optim, name)(arrays, **options, state_dtype=state_dtype)


def train(module, opt, steps, core=None, arrays=None):
    """``steps`` steps of ``opt`` (and of the core over ``arrays`` with the same grads)."""
    for step in steps:
        opt.zero_grad()
        backward(module, step)
        if core is not None:
            core.step([p.grad.detach().numpy().copy() for p in module.parameters()])
        opt.step()


def bits(t):
    """A tensor's stored bits as NumPy (bfloat16 as uint16)."""
    t = t.detach()
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def assert_state_equals_core(opt, params, core, case):
    """``opt.state`` holds, bit for bit, what the core optimizer's state_dict saves."""
    saved = core.state_dict()["state"]
    for j, p in enumerate(params):
        entry = opt.state[p]
        for i, name in enumerate(OPTIMIZERS[case][2], 1):
            want = saved[name][j]
            if isinstance(want, dict):  # 8-bit: codes and absmax
                assert np.array_equal(bits(entry[f"state{i}"]).reshape(-1),
                                      want["codes"].reshape(-1)), (j, name)
                assert np.array_equal(bits(entry[f"absmax{i}"]), want["absmax"]), (j, name)
            else:
                assert np.array_equal(bits(entry[name]).reshape(-1), want.reshape(-1)), (j, name)


def assert_same_bits(got, want, what=""):
    for a, b in zip(got, want):
        assert np.array_equal(bits(a), bits(b)), what


def expected_keys(case, state_dtype, small):
    names = OPTIMIZERS[case][2]
    keys = set() if case == "sgd" else {"step"}  # torch's SGD keeps no step
    if state_dtype == "int8" and not small:
        return keys | {f"{kind}{i}" for i in range(1, len(names) + 1)
                       for kind in ("state", "absmax")}
    return keys | set(names)


# -- the same bits as the core optimizer --------------------------------------------------------


@pytest.mark.parametrize("state_dtype", LOW)
@pytest.mark.parametrize("case", OPTIMIZERS)
def test_steps_equal_the_core_optimizer_bit_for_bit(case, state_dtype):
    module = make_module()
    params = list(module.parameters())
    arrays = [p.detach().numpy().copy() for p in params]
    opt, core = make_opt(case, params, state_dtype), make_core(case, arrays, state_dtype)
    train(module, opt, range(5), core, arrays)
    for p, a in zip(params, arrays):
        assert np.array_equal(p.detach().numpy(), a)
    assert not np.array_equal(arrays[0], make_module().weight.detach().numpy())  # it moved
    assert_state_equals_core(opt, params, core, case)


@pytest.mark.parametrize("state_dtype", LOW)
@pytest.mark.parametrize("case", OPTIMIZERS)
def test_state_views_are_live_and_of_the_state_dtype(case, state_dtype):
    module = make_module()
    weight, bias = module.weight, module.bias
    opt = make_opt(case, module.parameters(), state_dtype)
    train(module, opt, range(1))
    names = OPTIMIZERS[case][2]
    core = opt._core
    for p, small in ((weight, False), (bias, True)):
        entry = opt.state[p]
        assert set(entry) == expected_keys(case, state_dtype, small)
        for key, value in entry.items():
            if key == "step":
                assert value.dtype == torch.float32 and float(value) == 1.0
            elif key.startswith("state"):
                assert value.dtype == torch.uint8 and value.shape == p.shape
                buffer = core._state[names[int(key[-1]) - 1]]
                assert np.shares_memory(value.numpy(), buffer.codes)
            elif key.startswith("absmax"):
                assert value.dtype == torch.float32 and value.shape == (p.numel() // BLOCK,)
                buffer = core._state[names[int(key[-1]) - 1]]
                assert np.shares_memory(value.numpy(), buffer.absmax)
            else:
                dtype = torch.bfloat16 if state_dtype == "bfloat16" else torch.float32
                assert value.dtype == dtype and value.shape == p.shape, key
                buffer = core._state[key]
                assert np.shares_memory(bits(value), getattr(buffer, "small", buffer))
    views = {(p, k): v for p in (weight, bias) for k, v in opt.state[p].items()}
    before = {key: v.clone() for key, v in views.items()}
    train(module, opt, range(1, 2))
    for (p, key), view in views.items():
        assert not torch.equal(view, before[p, key]), key  # the same tensors, stepped
        assert view is opt.state[p][key] or torch.equal(view, opt.state[p][key])
    assert float(views.get((weight, "step"), torch.tensor(2.0))) == 2.0


# -- state dicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state_dtype", LOW)
@pytest.mark.parametrize("case", OPTIMIZERS)
def test_state_dict_round_trips_bit_for_bit(case, state_dtype):
    module = make_module()
    opt = make_opt(case, module.parameters(), state_dtype)
    train(module, opt, range(3))
    saved = opt.state_dict()
    assert saved["fastdl"]["options"]["state_dtype"] == state_dtype
    assert saved["fastdl"]["options"]["min_8bit_size"] == 4096
    for j, p in enumerate(module.parameters()):
        assert set(saved["state"][j]) == set(opt.state[p])
        for key, value in saved["state"][j].items():  # copies of the stored bits
            live = opt.state[p][key]
            assert value.dtype == live.dtype and torch.equal(value, live)
            assert key == "step" or not np.shares_memory(bits(value), bits(live))
    twin = copy.deepcopy(module)
    resumed = make_opt(case, twin.parameters(), state_dtype)
    resumed.load_state_dict(copy.deepcopy(saved))
    again = resumed.state_dict()
    for j, entry in saved["state"].items():
        assert set(again["state"][j]) == set(entry)
        assert_same_bits([again["state"][j][k] for k in entry], list(entry.values()), j)
    train(module, opt, range(3, 6))
    train(twin, resumed, range(3, 6))
    assert_same_bits(list(twin.parameters()), list(module.parameters()), "params")
    final, resumed_final = opt.state_dict()["state"], resumed.state_dict()["state"]
    for j, entry in final.items():
        assert_same_bits([resumed_final[j][k] for k in entry], list(entry.values()), j)


@pytest.mark.parametrize("state_dtype", LOW)
def test_torch_adams_float32_state_dict_loads_by_converting(state_dtype):
    """torch.optim.Adam's float32 state goes in as the core store converts it (bfloat16:
    rounded to nearest even; int8: each block quantized on its absmax, the small bias kept
    float32); then the steps equal the core optimizer's loading the same state, bit for bit."""
    module = make_module()
    params = list(module.parameters())
    ref = torch.optim.Adam(params, lr=0.01)
    train(module, ref, range(3))
    twin = copy.deepcopy(module)
    opt = fdt.Adam(twin.parameters(), lr=0.01, state_dtype=state_dtype)
    opt.load_state_dict(ref.state_dict())
    arrays = [p.detach().numpy().copy() for p in twin.parameters()]
    core = fd.optim.Adam(arrays, lr=0.01, state_dtype=state_dtype)
    d = core.state_dict()
    d["step"] = np.array([3])
    d["state"] = {name: [ref.state[p][name].numpy().copy() for p in params]
                  for name in ("exp_avg", "exp_avg_sq")}
    core.load_state_dict(d)

    weight, bias = twin.weight, twin.bias
    assert float(opt.state[weight]["step"]) == 3.0
    assert_state_equals_core(opt, [weight, bias], core, "adam")
    for i, name in enumerate(("exp_avg", "exp_avg_sq"), 1):
        want = ref.state[module.weight][name]
        if state_dtype == "bfloat16":  # torch's cast rounds to nearest even too
            assert np.array_equal(bits(opt.state[weight][name]), bits(want.to(torch.bfloat16)))
            assert np.array_equal(bits(opt.state[bias][name]),
                                  bits(ref.state[module.bias][name].to(torch.bfloat16)))
        else:
            block_max = want.reshape(-1, BLOCK).abs().amax(dim=1)
            assert torch.equal(opt.state[weight][f"absmax{i}"], block_max)
            assert opt.state[weight][f"state{i}"].dtype == torch.uint8
            assert torch.equal(opt.state[bias][name], ref.state[module.bias][name])
    train(twin, opt, range(3, 6), core, arrays)
    for p, a in zip(twin.parameters(), arrays):
        assert np.array_equal(p.detach().numpy(), a)
    assert float(opt.state[weight]["step"]) == 6.0
    # and near torch's own float32 continuation (3 steps of lr 0.01 apart by the state's
    # rounding: here at most 1.4e-4 (bfloat16) and 1.1e-3 (int8), 1.4e-4 on average (int8))
    train(module, ref, range(3, 6))
    for p, q in zip(twin.parameters(), params):
        apart = (p - q).detach().abs()
        assert float(apart.max()) <= 2e-3 and float(apart.mean()) <= 3e-4


def test_an_8bit_state_dict_loads_into_a_float_optimizer_dequantized():
    module = make_module()
    opt = fdt.Adam(module.parameters(), lr=0.01, state_dtype="int8")
    train(module, opt, range(2))
    twin = copy.deepcopy(module)
    plain = fdt.Adam(twin.parameters(), lr=0.01)
    plain.load_state_dict(opt.state_dict())
    from fastdl.kernels.quantize import SIGNED_CODES, UNSIGNED_CODES

    for i, (name, table) in enumerate((("exp_avg", SIGNED_CODES),
                                       ("exp_avg_sq", UNSIGNED_CODES)), 1):
        codes = opt.state[module.weight][f"state{i}"].numpy().reshape(-1, BLOCK)
        absmax = opt.state[module.weight][f"absmax{i}"].numpy()[:, None]
        want = (table[codes] * absmax).reshape(module.weight.shape)
        np.testing.assert_array_equal(plain.state[twin.weight][name].numpy(), want)
        assert torch.equal(plain.state[twin.bias][name], opt.state[module.bias][name])


@pytest.mark.parametrize("target", ["int8", "float32", None])
def test_a_bfloat16_state_dict_loads_into_other_state_dtypes(target):
    """bfloat16 entries are exact in float32: a float32 optimizer takes their values, an int8
    one quantizes them (the same codes as from those float32 values)."""
    module = make_module()
    opt = fdt.Adam(module.parameters(), lr=0.01, state_dtype="bfloat16")
    train(module, opt, range(2))
    saved = opt.state_dict()
    twin = copy.deepcopy(module)
    other = fdt.Adam(twin.parameters(), lr=0.01, state_dtype=target)
    other.load_state_dict(saved)
    as_float32 = copy.deepcopy(saved)
    for entry in as_float32["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            entry[key] = entry[key].float()
    check = fdt.Adam(copy.deepcopy(module).parameters(), lr=0.01, state_dtype=target)
    check.load_state_dict(as_float32)
    for p, q in zip(twin.parameters(), check.param_groups[0]["params"]):
        assert set(other.state[p]) == set(check.state[q])
        assert_same_bits(list(other.state[p].values()), list(check.state[q].values()))
    if target != "int8":
        assert torch.equal(other.state[twin.bias]["exp_avg"],
                           saved["state"][1]["exp_avg"].float())


def test_bad_8bit_state_dicts_are_rejected_and_change_nothing():
    module = make_module()
    opt = fdt.Adam(module.parameters(), lr=0.01, state_dtype="int8")
    train(module, opt, range(2))
    good = opt.state_dict()

    def edited(change):
        d = copy.deepcopy(good)
        change(d)
        return d

    def other_min_8bit_size(size, keep_fastdl=True):
        twin = copy.deepcopy(module)
        other = fdt.Adam(twin.parameters(), lr=0.01, state_dtype="int8", min_8bit_size=size)
        train(twin, other, range(2))
        d = other.state_dict()
        if not keep_fastdl:
            del d["fastdl"]
        return d

    bad = {
        "absmax-of-other-blocks": (edited(lambda d: d["state"][0].update(
            absmax1=torch.zeros(64))), ValueError,
            r"\['state'\]\[0\]\['absmax1'\].*\(32,\).*another block layout"),
        "codes-shape": (edited(lambda d: d["state"][0].update(
            state2=torch.zeros(8192, dtype=torch.uint8))), ValueError,
            r"\['state'\]\[0\]\['state2'\].*shape"),
        "codes-dtype": (edited(lambda d: d["state"][0].update(
            state1=d["state"][0]["state1"].to(torch.int8))), TypeError,
            r"\['state1'\] must be uint8"),
        "absmax-dtype": (edited(lambda d: d["state"][0].update(
            absmax1=d["state"][0]["absmax1"].double())), TypeError,
            r"\['absmax1'\] must be float32"),
        "codes-without-absmax": (edited(lambda d: d["state"][0].pop("absmax2")), ValueError,
                                 r"'state2' but no 'absmax2'"),
        "codes-and-floats": (edited(lambda d: d["state"][0].update(
            exp_avg=torch.zeros(128, 64))), ValueError, "twice"),
        "unknown-8bit-number": (edited(lambda d: d["state"][0].update(
            state3=torch.zeros(128, 64, dtype=torch.uint8))), ValueError, "'state3'"),
        "float64-state": (edited(lambda d: d["state"][1].update(
            exp_avg=d["state"][1]["exp_avg"].double())), TypeError, r"\['exp_avg'\].*float32"),
        "larger-min_8bit_size": (other_min_8bit_size(100_000), ValueError,
                                 r"\['fastdl'\]\['options'\]\['min_8bit_size'\] is 100000"),
        "smaller-min_8bit_size": (other_min_8bit_size(64), ValueError, "min_8bit_size"),
        "smaller-min_8bit_size-no-options": (other_min_8bit_size(64, keep_fastdl=False),
                                             ValueError,
                                             r"\['state'\]\[1\]\['state1'\].*min_8bit_size"),
    }
    before = copy.deepcopy(good)
    weight = module.weight.detach().clone()
    for name, (d, error, words) in bad.items():
        with pytest.raises(error, match=words):
            opt.load_state_dict(d)
        after = opt.state_dict()
        for j, entry in before["state"].items():
            assert_same_bits([after["state"][j][k] for k in entry], list(entry.values()), name)
    train(module, opt, range(2, 3))  # still steps
    assert not torch.equal(module.weight, weight)


@pytest.mark.parametrize("case,option", [("Adam", dict(amsgrad=True)),
                                         ("AdamW", dict(amsgrad=True)),
                                         ("RMSprop", dict(centered=True))])
def test_int8_rejects_what_bitsandbytes_has_no_8bit_form_of(case, option):
    with pytest.raises(ValueError, match=next(iter(option))):
        getattr(fdt, case)(make_module().parameters(), state_dtype="int8", **option)


def test_bad_state_dtype_and_min_8bit_size():
    with pytest.raises(ValueError, match="state_dtype"):
        fdt.Adam(make_module().parameters(), state_dtype="int4")
    with pytest.raises(TypeError, match="state_dtype"):
        fdt.Adam(make_module().double().parameters(), state_dtype="bfloat16")
    with pytest.raises(ValueError, match="min_8bit_size"):
        fdt.Adam(make_module().parameters(), state_dtype="int8", min_8bit_size=0)


# -- the rest of torch's interface ------------------------------------------------------------


@pytest.mark.parametrize("state_dtype", LOW)
def test_add_param_group_and_none_grads_keep_the_low_precision_state(state_dtype):
    """The bias added as a second group after 3 steps ends bit-identical to a twin that had it
    from the start with grads of None for those 3 steps; the weight's stored state is kept
    across the rebuild."""
    module, twin = make_module(), make_module()
    opt = fdt.Adam([module.weight], lr=0.01, state_dtype=state_dtype)
    both = fdt.Adam([{"params": [twin.weight]}, {"params": [twin.bias], "lr": 0.02}], lr=0.01,
                    state_dtype=state_dtype)
    for step in range(3):
        for net, o in ((module, opt), (twin, both)):
            o.zero_grad()
            backward(net, step)
            net.bias.grad = None
            o.step()
    assert twin.bias not in both.state
    kept = {k: v.clone() for k, v in opt.state[module.weight].items()}
    opt.add_param_group({"params": [module.bias], "lr": 0.02})
    for key, value in kept.items():
        assert torch.equal(opt.state[module.weight][key], value), key
    for step in range(3, 6):
        for net, o in ((module, opt), (twin, both)):
            o.zero_grad()
            backward(net, step)
            o.step()
    assert_same_bits(list(module.parameters()), list(twin.parameters()))
    assert float(opt.state[module.bias]["step"]) == 3.0
    assert float(opt.state[module.weight]["step"]) == 6.0
    for p, q in zip(module.parameters(), twin.parameters()):
        assert_same_bits(list(opt.state[p].values()), list(both.state[q].values()))


@pytest.mark.parametrize("state_dtype", LOW)
def test_closure_hooks_and_scheduler_follow_the_core(state_dtype):
    module = make_module()
    params = list(module.parameters())
    arrays = [p.detach().numpy().copy() for p in params]
    opt = fdt.AdamW(params, lr=0.01, state_dtype=state_dtype)
    core = fd.optim.AdamW(arrays, lr=0.01, state_dtype=state_dtype)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    for step in range(6):
        def closure(step=step):
            opt.zero_grad()
            return backward(module, step)

        core.lr = opt.param_groups[0]["lr"]
        loss = opt.step(closure)  # the closure runs first: the core gets the same grads
        assert loss.requires_grad
        core.step([p.grad.detach().numpy().copy() for p in params])
        schedule.step()
    assert calls == ["pre", "post"] * 6
    assert opt.param_groups[0]["lr"] == 0.01 * 0.5 ** 3
    for p, a in zip(params, arrays):
        assert np.array_equal(p.detach().numpy(), a)
    assert_state_equals_core(opt, params, core, "adamw")


# -- bitsandbytes' Adam8bit, the second oracle ------------------------------------------------


def _bnb():
    return require("bitsandbytes")


def _bnb_pair(lr=1e-3):
    bnb = _bnb()
    module = make_module()
    twin = copy.deepcopy(module)
    ref = bnb.optim.Adam8bit(module.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=0, min_8bit_size=4096)
    opt = fdt.Adam(twin.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                   state_dtype="int8")
    return module, ref, twin, opt


def test_adam8bit_of_bitsandbytes_and_int8_adam_run_alike():
    """10 steps each from the same module on the same batches. The bias (under min_8bit_size:
    float32 state in both) stays within SPEC's rtol 1e-4 / atol 1e-5. The 8-bit weight does
    not, all of it: bitsandbytes' CPU quantizer (0.50.2) picks a code that is not the
    nearest for a few values in each step (test_bitsandbytes_cpu_codes_are_not_always_the_
    nearest), and a code one step apart at the bottom of the unsigned map moves
    sqrt(exp_avg_sq) by tens of percent, so a few elements part: here 1.2% outside SPEC's
    tolerance, at most 0.22 lr apart, 7e-7 apart on average against a mean movement of
    3.7e-3 (on 8 seeds 1.1-2.8%, 0.4 lr, 1.6e-6; another loss, up to 1.4 lr). Held: >= 95%
    of the weight within SPEC's tolerance, mean |difference| <= 5e-6, max <= 2 lr."""
    lr = 1e-3
    module, ref, twin, opt = _bnb_pair(lr)
    start = module.weight.detach().clone()
    for step in range(10):
        for net, o in ((module, ref), (twin, opt)):
            o.zero_grad()
            backward(net, step)
            o.step()
    torch.testing.assert_close(twin.bias.detach(), module.bias.detach(), **SPEC)
    got, want = twin.weight.detach(), module.weight.detach()
    difference = (got - want).abs()
    within = difference <= SPEC["atol"] + SPEC["rtol"] * want.abs()
    assert float(within.float().mean()) >= 0.95
    assert float(difference.mean()) <= 5e-6
    assert float(difference.max()) <= 2 * lr
    assert float((want - start).abs().mean()) > 1e-3  # both moved, alike
    assert ref.state[module.weight]["state1"].dtype == opt.state[twin.weight]["state1"].dtype


def test_from_the_same_8bit_state_each_step_matches_adam8bit():
    """In lockstep: before each step fastdl loads bitsandbytes' params and state (its codes
    and absmax under the same keys state1/absmax1/state2/absmax2; its float32 bias state under
    torch's names). One step from the same state: params within SPEC's tolerance, absmax
    within 1e-6, and at most 5% of the codes differ (3.5% of exp_avg_sq's at the first step,
    when every value is near the bottom of the unsigned map, where bitsandbytes' pick can be
    7 codes off; 0.1-0.5% later), each pair at most the map's widest spacing apart in value
    (1.4% of the block's absmax signed, 0.7% unsigned): the quantizer's choice, the float
    update being the same."""
    functional = _bnb().functional
    signed = functional.create_dynamic_map(signed=True)
    unsigned = functional.create_dynamic_map(signed=False)
    module, ref, twin, opt = _bnb_pair()
    for step in range(10):
        if step:
            with torch.no_grad():
                for p, q in zip(twin.parameters(), module.parameters()):
                    p.copy_(q)
            w, b = ref.state[module.weight], ref.state[module.bias]
            d = opt.state_dict()
            d["state"] = {
                0: {"step": torch.tensor(float(w["step"])),
                    **{k: w[k].clone() for k in ("state1", "absmax1", "state2", "absmax2")}},
                1: {"step": torch.tensor(float(b["step"])), "exp_avg": b["state1"].clone(),
                    "exp_avg_sq": b["state2"].clone()}}
            opt.load_state_dict(d)
        for net, o in ((module, ref), (twin, opt)):
            o.zero_grad()
            backward(net, step)
            o.step()
        for p, q in zip(twin.parameters(), module.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), **SPEC)
        mine, theirs = opt.state[twin.weight], ref.state[module.weight]
        for i, table in ((1, signed), (2, unsigned)):
            torch.testing.assert_close(mine[f"absmax{i}"], theirs[f"absmax{i}"], rtol=1e-6,
                                       atol=0)
            codes, their_codes = mine[f"state{i}"].long(), theirs[f"state{i}"].long()
            assert float((codes != their_codes).float().mean()) <= 0.05, (step, i)
            widest = float(table.sort().values.diff().max())
            apart = (table[codes] - table[their_codes]).abs()
            assert float(apart.max()) <= widest * (1 + 1e-5), (step, i)
        torch.testing.assert_close(opt.state[twin.bias]["exp_avg"],
                                   ref.state[module.bias]["state1"], **SPEC)


def test_bitsandbytes_cpu_codes_are_not_always_the_nearest():
    """What parts the two: the same float32 state quantized by fastdl (loaded into the int8
    Adam) and by bitsandbytes' CPU quantize_blockwise gives the same absmax, bit for bit, and
    the same codes but for a few, where fastdl's code is the nearer (never the farther)."""
    bnb = _bnb()
    functional = bnb.functional
    g = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.zeros(128, 64))
    opt = fdt.Adam([w], state_dtype="int8")
    m = torch.randn(128, 64, generator=g) * 0.01
    v = (torch.randn(128, 64, generator=g) * 0.01).square() * 1e-3
    d = opt.state_dict()
    d["state"] = {0: {"step": torch.tensor(1.0), "exp_avg": m, "exp_avg_sq": v}}
    opt.load_state_dict(d)
    differ = 0
    for i, (x, signed) in enumerate(((m, True), (v, False)), 1):
        table = functional.create_dynamic_map(signed=signed)
        codes, absmax = torch.ops.bitsandbytes.quantize_blockwise(x.reshape(-1), table, BLOCK)
        mine = opt.state[w][f"state{i}"].reshape(-1)
        assert torch.equal(opt.state[w][f"absmax{i}"], absmax)
        scaled = x.reshape(-1) / absmax.repeat_interleave(BLOCK)
        nearer = (scaled - table[mine.long()]).abs() <= (scaled - table[codes.long()]).abs()
        assert bool(nearer.all()), i
        differ += int((mine != codes).sum())
    assert differ <= 0.05 * 2 * m.numel()
