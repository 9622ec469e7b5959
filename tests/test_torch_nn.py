"""fastdl.torch's modules (BatchNorm1d/2d/3d, cross_entropy / CrossEntropyLoss, Dropout, patch)
against torch's own, option by option; skipped without torch."""

import copy
import pickle

import numpy as np
import pytest

import fastdl as fd

from helpers import SOFTMAX_TOLERANCE, assert_close, require

torch = require("torch")
import fastdl.torch.nn as fdt  # noqa: E402 (needs torch first)
from fastdl.torch import _tensors  # noqa: E402

nn, F = torch.nn, torch.nn.functional

FORWARD = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}
GRADIENT = {np.float32: dict(rtol=2e-3, atol=2e-4), np.float64: dict(rtol=1e-9, atol=1e-11)}
DTYPES = {"f32": torch.float32, "f64": torch.float64}


def close(got, want, tolerance, what=""):
    """Elementwise ``|got - want| <= atol + rtol * |want|`` for two tensors (or None each)."""
    assert (got is None) == (want is None), what
    if got is not None:
        dtype = np.float32 if want.dtype == torch.float32 else np.float64
        assert_close(got.detach().numpy(), want.detach().numpy(), dtype, tolerance, what)


def make(shape, dtype, rng, scale=1.0, shift=0.0):
    return torch.from_numpy(rng.standard_normal(shape) * scale + shift).to(dtype)


# -- batch normalization ------------------------------------------------------------------------

def as_layout(x, layout):
    """x (contiguous) in one of the layouts below, same values."""
    if layout == "contiguous":
        return x
    if layout == "channels-last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                            else torch.channels_last_3d)
    if layout == "channels-first":  # (C, N, ...) in memory: the notes' (features, examples)
        return x.movedim(1, 0).contiguous().movedim(0, 1)
    assert layout == "strided"  # no layout the kernels read: copied to contiguous
    return torch.cat([x, x], dim=-1)[..., ::2]


# (module, input shape, layout)
BN_LAYOUTS = {
    "1d-NC": ("BatchNorm1d", (8, 5), "contiguous"),
    "1d-NCL": ("BatchNorm1d", (4, 5, 6), "contiguous"),
    "1d-CN": ("BatchNorm1d", (8, 5), "channels-first"),
    "1d-NCL-strided": ("BatchNorm1d", (4, 5, 6), "strided"),
    "2d-NCHW": ("BatchNorm2d", (4, 5, 3, 6), "contiguous"),
    "2d-channels-last": ("BatchNorm2d", (4, 5, 3, 6), "channels-last"),
    "3d": ("BatchNorm3d", (2, 5, 3, 2, 4), "contiguous"),
    "3d-channels-last": ("BatchNorm3d", (2, 5, 3, 2, 4), "channels-last"),
}
BN_OPTIONS = {
    "default": {},
    "momentum-None": dict(momentum=None),
    "momentum-0.3": dict(momentum=0.3, eps=1e-3),
    "no-affine": dict(affine=False),
    "no-bias": dict(bias=False),
    "no-running-stats": dict(track_running_stats=False),
}


def bn_pair(name, options, dtype):
    """torch's module with random weight, bias and running statistics, and fastdl's loaded
    from its state_dict."""
    ref = getattr(nn, name)(5, dtype=dtype, **options)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
        if ref.track_running_stats:
            ref.running_mean.normal_()
            ref.running_var.uniform_(0.5, 2.0)
            ref.num_batches_tracked.fill_(3)
    ours = getattr(fdt, name)(5, dtype=dtype, **options)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("options", BN_OPTIONS.values(), ids=BN_OPTIONS)
@pytest.mark.parametrize("name, shape, layout", BN_LAYOUTS.values(), ids=BN_LAYOUTS)
def test_batchnorm_matches_torch(name, shape, layout, options, training, dtype, rng):
    ref, ours = bn_pair(name, options, dtype)
    ref.train(training), ours.train(training)
    for step in range(3):
        x = as_layout(make(shape, dtype, rng, 3.0, 1.0), layout)
        x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_ours = ref(x_ref), ours(x_ours)
        close(y_ours, y_ref, FORWARD, f"y, step {step}")
        if layout != "channels-first":  # torch makes that one contiguous, fastdl keeps it
            assert y_ours.stride() == y_ref.stride()
        dy = make(shape, dtype, rng)
        dy = as_layout(dy, layout) if step == 1 else dy  # other steps: a dy layout copy
        y_ref.backward(dy), y_ours.backward(dy)
        close(x_ours.grad, x_ref.grad, GRADIENT, "dx")
        for p_ours, p_ref, what in [(ours.weight, ref.weight, "dweight"),
                                    (ours.bias, ref.bias, "dbias")]:
            close(None if p_ours is None else p_ours.grad,
                  None if p_ref is None else p_ref.grad, GRADIENT, what)
        for key, value in ref.state_dict().items():
            if key == "num_batches_tracked":
                assert ours.state_dict()[key].item() == value.item()
            else:
                close(ours.state_dict()[key], value, FORWARD, key)
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_batchnorm_momentum_none_is_the_cumulative_average(rng):
    bn = fdt.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    xs = [make((6, 3), torch.float64, rng, 2.0, 1.0) for _ in range(4)]
    for x in xs:
        bn(x)
    assert bn.num_batches_tracked.item() == 4
    want = torch.stack([x.mean(0) for x in xs]).mean(0)
    close(bn.running_mean, want, FORWARD, "running_mean")
    close(bn.running_var, torch.stack([x.var(0) for x in xs]).mean(0), FORWARD, "running_var")


def test_batchnorm_state_dict_loads_into_torch_and_back(rng):
    ours = fdt.BatchNorm2d(5, momentum=None)
    for _ in range(2):
        ours(make((4, 5, 3, 3), torch.float32, rng, 2.0, 1.0))
    ref = nn.BatchNorm2d(5, momentum=None)
    ref.load_state_dict(ours.state_dict())
    again = fdt.BatchNorm2d(5, momentum=None)
    again.load_state_dict(ref.state_dict())
    x = make((4, 5, 3, 3), torch.float32, rng)
    close(again.eval()(x), ref.eval()(x), FORWARD, "eval y")
    assert again.num_batches_tracked.item() == ref.num_batches_tracked.item() == 2


def test_batchnorm_keeps_torch_interface():
    ours = fdt.BatchNorm3d(4, eps=1e-3, momentum=0.2, affine=False, track_running_stats=False)
    assert isinstance(ours, nn.BatchNorm3d)
    assert repr(ours) == repr(nn.BatchNorm3d(4, eps=1e-3, momentum=0.2, affine=False,
                                             track_running_stats=False))
    assert dict(ours.named_parameters()) == {} and dict(ours.named_buffers()) == {}
    with pytest.raises(ValueError, match="expected 5D input"):
        ours(torch.zeros(2, 4, 3))


def test_batchnorm_output_takes_inplace_relu(rng):
    # outputs are base tensors, not views made inside the Function (autograd forbids
    # in-place ops on those): the ResNet pattern BatchNorm2d -> ReLU(inplace=True)
    x = make((2, 3, 4, 4), torch.float32, rng).contiguous(memory_format=torch.channels_last)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, ours = nn.BatchNorm2d(3), fdt.BatchNorm2d(3)
    torch.relu_(ref(x_ref)).sum().backward()
    torch.relu_(ours(x_ours)).sum().backward()
    close(x_ours.grad, x_ref.grad, GRADIENT, "dx")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_batchnorm_gradcheck(layout, training, rng):
    x = as_layout(make((3, 2, 2, 3), torch.float64, rng), layout).requires_grad_()
    w = make(2, torch.float64, rng, 0.5, 1.0).requires_grad_()
    b = make(2, torch.float64, rng).requires_grad_()
    mean, var = make(2, torch.float64, rng), torch.rand(2, dtype=torch.float64) + 0.5
    pool = _tensors.BufferPool()

    def f(x, w, b):  # training: batch statistics, no running ones to update between calls
        return fdt.BatchNormFunction.apply(x, w, b, None if training else mean,
                                           None if training else var, training, 0.1, 1e-5,
                                           pool)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_batchnorm_double_backward_raises(rng):
    x = make((6, 3), torch.float64, rng).requires_grad_()
    (dx,) = torch.autograd.grad(fdt.BatchNorm1d(3, dtype=torch.float64)(x).pow(2).sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        dx.sum().backward()


# -- cross-entropy ------------------------------------------------------------------------------

# logits shape (torch's: classes at axis 1, or 0 unbatched) and memory layout
CE_SHAPES = {
    "N,C": ((6, 5), "contiguous"),
    "N,C,d": ((4, 5, 3), "contiguous"),
    "N,C,d1,d2": ((3, 5, 2, 3), "contiguous"),
    "unbatched": ((5,), "contiguous"),
    "N,C,d-classes-last": ((4, 5, 3), "channels-last"),  # (N, d, C) in memory
    "N,C-classes-first": ((6, 5), "channels-first"),  # (C, N) in memory
}


def ce_layout(z, layout):
    if layout == "channels-last":
        return z.movedim(1, -1).contiguous().movedim(-1, 1)
    return as_layout(z, layout)


def ce_target(kind, shape, dtype, rng):
    """Index targets (int64, some ignored with ignore_index=2 / the default -100) or
    probabilities (rows not summing to 1, as torch allows)."""
    if kind == "probabilities":
        return torch.from_numpy(rng.random(shape)).to(dtype)
    class_axis = 0 if len(shape) == 1 else 1
    rows = shape[:class_axis] + shape[class_axis + 1:]
    labels = torch.from_numpy(np.asarray(rng.integers(0, shape[class_axis], rows)))
    if kind == "ignored" and labels.numel() > 2:
        labels.view(-1)[[0, 2]] = -100
    return labels


def grad_outputs(loss, rng):
    """Two upstream gradients: 1 (loss.backward()) and 2.5 for a reduced loss; two random
    per-position ones for "none"."""
    if loss.dim() == 0:
        return [torch.ones((), dtype=loss.dtype), torch.full((), 2.5, dtype=loss.dtype)]
    return [torch.from_numpy(rng.random(loss.shape)).to(loss.dtype) for _ in range(2)]


def check_cross_entropy(ours_fn, ref_fn, z, target, rng):
    """Loss and, for two upstream gradients through one graph (the second with the graph
    retained), the logits' gradient of fastdl's against torch's."""
    z_ours, z_ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss_ours, loss_ref = ours_fn(z_ours, target), ref_fn(z_ref, target)
    close(loss_ours, loss_ref, SOFTMAX_TOLERANCE, "loss")
    assert loss_ours.dtype == loss_ref.dtype and loss_ours.shape == loss_ref.shape
    for g in grad_outputs(loss_ref, rng):
        (grad_ours,) = torch.autograd.grad(loss_ours, z_ours, g, retain_graph=True)
        (grad_ref,) = torch.autograd.grad(loss_ref, z_ref, g, retain_graph=True)
        close(grad_ours, grad_ref, SOFTMAX_TOLERANCE, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "ignored", "probabilities"])
@pytest.mark.parametrize("shape, layout", CE_SHAPES.values(), ids=CE_SHAPES)
def test_cross_entropy_matches_torch(shape, layout, kind, reduction, smoothing, dtype, rng):
    z = ce_layout(make(shape, dtype, rng, 3.0), layout)
    target = ce_target(kind, shape, dtype, rng)
    options = dict(reduction=reduction, label_smoothing=smoothing)
    check_cross_entropy(lambda z, t: fdt.cross_entropy(z, t, **options),
                        lambda z, t: F.cross_entropy(z, t, **options), z, target, rng)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probabilities"])
def test_cross_entropy_loss_module_matches_torch(kind, reduction, rng):
    # ignore_index with probabilities is torch's error (a ValueError here: see below)
    options = dict(reduction=reduction, label_smoothing=0.1,
                   ignore_index=1 if kind == "index" else -100)
    ours, ref = fdt.CrossEntropyLoss(**options), nn.CrossEntropyLoss(**options)
    assert isinstance(ours, nn.CrossEntropyLoss) and repr(ours) == repr(ref)
    z = make((7, 4, 2), torch.float32, rng, 2.0)
    check_cross_entropy(ours, ref, z, ce_target(kind, (7, 4, 2), torch.float32, rng), rng)


def test_cross_entropy_legacy_arguments_as_torch(rng):
    z, target = make((5, 3), torch.float64, rng), torch.tensor([0, 1, 2, 1, 0])
    with pytest.warns(UserWarning):
        ours = fdt.CrossEntropyLoss(size_average=False)
    with pytest.warns(UserWarning):
        ref = nn.CrossEntropyLoss(size_average=False)
    assert ours.reduction == ref.reduction == "sum"
    close(ours(z, target), ref(z, target), SOFTMAX_TOLERANCE, "loss")
    with pytest.warns(UserWarning):
        close(fdt.cross_entropy(z, target, reduce=False),
              F.cross_entropy(z, target, reduction="none"), SOFTMAX_TOLERANCE, "loss")


def test_cross_entropy_all_ignored_mean_is_nan_as_torch():
    z = torch.zeros(3, 4, requires_grad=True)
    target = torch.full((3,), -100)
    loss = fdt.cross_entropy(z, target)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(z.detach(), target))
    loss.backward()
    assert torch.equal(z.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", ["ignored", "probabilities"])
def test_cross_entropy_gradcheck(kind, reduction, rng):
    z = make((4, 3, 2), torch.float64, rng).requires_grad_()
    target = ce_target(kind, (4, 3, 2), torch.float64, rng)
    pool = _tensors.BufferPool()
    # gradcheck differentiates one graph several times: the second and later backward
    # passes recompute the gradient from the saved logits
    assert torch.autograd.gradcheck(
        lambda z: fdt.CrossEntropyFunction.apply(z, target, None, -100, reduction, 0.1, pool),
        (z,))


def test_cross_entropy_double_backward_raises(rng):
    z = make((4, 3), torch.float64, rng).requires_grad_()
    (dz,) = torch.autograd.grad(fdt.cross_entropy(z, torch.tensor([0, 1, 2, 0])), z,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        dz.sum().backward()
    (dz,) = torch.autograd.grad(fdt.cross_entropy(z, torch.tensor([0, 1, 2, 0])), z,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):  # not a silent constant
        (dz.pow(2).sum() + z.pow(2).sum()).backward()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["ignored", "probabilities"])
@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 3), (5,)], ids=["N,C", "N,C,d", "unbatched"])
def test_cross_entropy_class_weights_match_torch(shape, kind, reduction, smoothing, dtype, rng):
    # waits on fd.softmax_cross_entropy(..., weight=) (SPEC.md's class weights)
    weight = torch.from_numpy(rng.random(shape[0 if len(shape) == 1 else 1]) + 0.2).to(dtype)
    z = make(shape, dtype, rng, 3.0)
    target = ce_target(kind, shape, dtype, rng)
    options = dict(reduction=reduction, label_smoothing=smoothing)
    check_cross_entropy(lambda z, t: fdt.cross_entropy(z, t, weight=weight, **options),
                        lambda z, t: F.cross_entropy(z, t, weight=weight, **options), z,
                        target, rng)
    ours, ref = fdt.CrossEntropyLoss(weight, **options), nn.CrossEntropyLoss(weight, **options)
    check_cross_entropy(ours, ref, z, target, rng)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]


# -- dropout ------------------------------------------------------------------------------------

def fastdl_mask(shape, p, seed):
    """The mask fd.dropout_forward draws for ``seed`` (the reference for the modules')."""
    return fd.dropout_forward(np.ones(shape, np.float32), p, seed)[1]


def test_dropout_masks_follow_the_documented_seed():
    x = torch.ones(6, 50)
    modules = [fdt.Dropout(0.4), fdt.Dropout(0.4)]
    masks = []
    for call in range(2):
        for d in modules:
            y = d(x)
            seed = fdt.mask_seed(torch.initial_seed(), d.index, call)
            mask = fastdl_mask((6, 50), 0.4, seed)
            assert torch.equal(y, torch.from_numpy(mask * np.float32(1 / 0.6)))
            masks.append(mask)
    assert modules[1].index == modules[0].index + 1 and modules[0].calls == 2
    # two modules, two calls: four different masks, each ~40 % dropped
    assert len({m.tobytes() for m in masks}) == 4
    assert all(0.25 < 1 - m.mean() < 0.55 for m in masks)


def test_dropout_masks_reproduce_with_the_seed():
    d, x = fdt.Dropout(0.5), torch.ones(4, 64)
    try:
        torch.manual_seed(7)
        first = [d(x) for _ in range(3)]
        torch.manual_seed(7)
        d.calls = 0
        assert all(torch.equal(a, d(x)) for a in first)
        torch.manual_seed(8)
        d.calls = 0
        assert not torch.equal(first[0], d(x))
    finally:
        torch.manual_seed(12345)


def test_dropout_copies_get_their_own_masks():
    d, x = fdt.Dropout(0.5), torch.ones(4, 64)
    twin, unpickled = copy.deepcopy(d), pickle.loads(pickle.dumps(d))
    assert len({d.index, twin.index, unpickled.index}) == 3
    assert not torch.equal(d(x), twin(x))


@pytest.mark.parametrize("case", ["eval", "p=0", "empty"])
def test_dropout_identity_as_torch(case):
    d = fdt.Dropout(0.0 if case == "p=0" else 0.5)
    if case == "eval":
        d.eval()
    x = torch.randn(0 if case == "empty" else 3, 4, requires_grad=True)
    assert d(x) is x and nn.Dropout(d.p).train(d.training)(x) is x
    assert d.calls == 0


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels-last", "strided"])
def test_dropout_backward_is_mask_times_scale(layout, dtype, rng):
    d = fdt.Dropout(0.3)
    x = as_layout(make((2, 3, 4, 5), dtype, rng), layout).requires_grad_()
    y = d(x)
    assert y.stride() == (x.contiguous() if layout == "strided" else x).stride()
    # the mask is keyed by the position in the memory the kernel reads (channels-last:
    # the (N, H, W, C) order)
    moved = layout == "channels-last"
    mask = fastdl_mask((2, 4, 5, 3) if moved else (2, 3, 4, 5), 0.3,
                       fdt.mask_seed(torch.initial_seed(), d.index, 0))
    mask = torch.from_numpy(mask)
    mask = mask.movedim(-1, 1) if moved else mask
    scale = 1 / (1 - 0.3)
    close(y, x * mask * scale, FORWARD, "y")
    dy = make((2, 3, 4, 5), dtype, rng)
    y.backward(dy)
    close(x.grad, dy * mask * scale, FORWARD, "dx")


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_dropout_inplace_writes_over_the_input(layout, rng):
    plain, inplace = fdt.Dropout(0.5), fdt.Dropout(0.5, inplace=True)
    inplace.index = plain.index  # the same masks, for the comparison
    x = make((4, 6) if layout == "contiguous" else (4, 12), torch.float64, rng)
    x.requires_grad_()
    part = slice(None) if layout == "contiguous" else slice(None, None, 2)
    want = plain(x[:, part])
    h = (x * 1)[:, part]  # strided: no layout the kernel reads, written back after a copy
    y = inplace(h)
    assert y is h and torch.equal(y, want)
    (y * 2).sum().backward()
    close(x.grad[:, part], 2 * (want != 0) / 0.5, FORWARD, "dx")
    if layout == "strided":
        assert torch.equal(x.grad[:, 1::2], torch.zeros(4, 6, dtype=torch.float64))
    kept = x.detach().clone()
    for leaf_or_view in [x, x[:, :3]]:  # torch's rule for in-place ops, checked first
        with pytest.raises(RuntimeError, match="leaf"):
            inplace(leaf_or_view)
    assert torch.equal(x, kept) and inplace.calls == 1


def test_dropout_gradcheck(rng):
    x = make((3, 4), torch.float64, rng).requires_grad_()
    pool = _tensors.BufferPool()
    assert torch.autograd.gradcheck(
        lambda x: fdt.DropoutFunction.apply(x, 0.4, 1234, False, pool), (x,))


def test_dropout_double_backward_raises(rng):
    x = make((3, 4), torch.float64, rng).requires_grad_()
    (dx,) = torch.autograd.grad(fdt.Dropout(0.5)(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        dx.sum().backward()


# -- a model, patch -----------------------------------------------------------------------------

def small_model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(p=0.0),
                          nn.Linear(8, 3)).to(dtype)
    torch.manual_seed(12345)
    return model


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_patched_model_trains_as_torch(dtype, rng):
    ref = small_model(dtype)
    ours = copy.deepcopy(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)  # before patching
    loss_ref, loss_ours = nn.CrossEntropyLoss(label_smoothing=0.1), nn.CrossEntropyLoss(
        label_smoothing=0.1)
    assert fdt.patch(ours) is ours and fdt.patch(loss_ours) is loss_ours
    assert [type(m) for m in ours] == [nn.Linear, fdt.BatchNorm1d, nn.ReLU, fdt.Dropout,
                                       nn.Linear]
    assert type(loss_ours) is fdt.CrossEntropyLoss
    tolerance = FORWARD if dtype == torch.float64 else GRADIENT
    for step in range(5):
        x, target = make((16, 6), dtype, rng), torch.from_numpy(rng.integers(0, 3, 16))
        losses = []
        for model, opt, loss_fn in [(ref, opt_ref, loss_ref), (ours, opt_ours, loss_ours)]:
            opt.zero_grad()
            loss = loss_fn(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss)
        close(losses[1], losses[0], tolerance, f"loss, step {step}")
    for (name, want), got in zip(ref.state_dict().items(), ours.state_dict().values()):
        close(got, want, tolerance, name)
    x = make((5, 6), dtype, rng)
    close(ours.eval()(x), ref.eval()(x), tolerance, "eval output")


def test_patch_replaces_exact_classes_and_keeps_everything():
    class MyBatchNorm(nn.BatchNorm1d):
        pass

    model = nn.Sequential(
        nn.BatchNorm1d(3, momentum=0.3, eps=1e-3), nn.Sequential(nn.BatchNorm2d(2, affine=False)),
        nn.BatchNorm3d(4, track_running_stats=False), nn.Dropout(0.25, inplace=True),
        nn.CrossEntropyLoss(weight=torch.ones(3), ignore_index=2, label_smoothing=0.1,
                            reduction="sum"),
        MyBatchNorm(3), nn.SyncBatchNorm(3), fdt.Dropout(0.5))
    model.eval()
    model[0].train()
    tensors = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    fastdl_dropout = model[7]
    index = fastdl_dropout.index
    assert fdt.patch(model) is model
    assert [type(m) for m in model] == [fdt.BatchNorm1d, nn.Sequential, fdt.BatchNorm3d,
                                        fdt.Dropout, fdt.CrossEntropyLoss, MyBatchNorm,
                                        fdt.SyncBatchNorm, fdt.Dropout]
    assert type(model[1][0]) is fdt.BatchNorm2d
    assert model[7] is fastdl_dropout and fastdl_dropout.index == index  # left alone
    assert all(t is tensors[name] for name, t in model.state_dict(keep_vars=True).items())
    assert model[0].training and not model[2].training
    assert (model[0].momentum, model[0].eps, model[1][0].affine) == (0.3, 1e-3, False)
    assert (model[3].p, model[3].inplace) == (0.25, True)
    assert (model[4].ignore_index, model[4].label_smoothing, model[4].reduction) == \
        (2, 0.1, "sum")
    bn = nn.BatchNorm1d(2)
    assert fdt.patch(bn) is bn and type(bn) is fdt.BatchNorm1d
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fdt.patch([bn])


# -- the kernels are fastdl's -------------------------------------------------------------------

def test_fastdl_kernels_run_not_torchs(monkeypatch, rng):
    def refuse(*args, **kwargs):
        raise AssertionError("torch's kernel was called")

    for owner, name in [(F, "batch_norm"), (torch, "batch_norm"), (F, "cross_entropy"),
                        (torch._C._nn, "cross_entropy_loss"), (F, "dropout"),
                        (torch, "dropout"), (torch._VF, "dropout"), (torch, "log_softmax"),
                        (F, "log_softmax"), (F, "nll_loss")]:
        monkeypatch.setattr(owner, name, refuse)
    x = make((8, 4), torch.float32, rng)
    for torch_module in [nn.BatchNorm1d(4), nn.Dropout(0.5)]:
        with pytest.raises(AssertionError, match="torch's kernel"):
            torch_module(x)
    with pytest.raises(AssertionError, match="torch's kernel"):
        nn.CrossEntropyLoss()(x, torch.zeros(8, dtype=torch.long))
    x.requires_grad_()
    h = fdt.Dropout(0.5)(fdt.BatchNorm1d(4)(x))
    fdt.CrossEntropyLoss()(h, torch.from_numpy(rng.integers(0, 4, 8))).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# -- output memory ------------------------------------------------------------------------------

def test_pool_reuses_a_buffer_only_when_no_tensor_holds_it(rng):
    pool = _tensors.BufferPool(per_key=4)
    like = torch.zeros(1)

    def new():
        return pool.output((3, 4), torch.float32, like)[0]

    t = new()
    ptr = t.data_ptr()
    del t
    assert new().data_ptr() == ptr  # released: reused
    holders = {
        "tensor": lambda t: t,
        "view": lambda t: t[1:],
        "numpy": lambda t: t.numpy(),
        "saved by autograd": lambda t: (t * torch.ones(4, requires_grad=True)).sum(),
    }
    for what, hold in holders.items():
        t = new()
        ptr = t.data_ptr()
        held = hold(t)
        del t
        assert new().data_ptr() != ptr, what
        del held
    outputs = [new() for _ in range(6)]  # 4 pooled, 2 fresh beyond the bound
    assert len(pool._buffers[(3, 4), np.dtype(np.float32)]) == 4
    assert len({t.data_ptr() for t in outputs}) == 6
    assert copy.deepcopy(pool)._buffers == {} and pickle.loads(pickle.dumps(pool))._buffers == {}


@pytest.mark.parametrize("module", ["BatchNorm1d", "Dropout", "CrossEntropyLoss"])
def test_module_outputs_reuse_memory_once_released(module, rng):
    m = {"BatchNorm1d": lambda: fdt.BatchNorm1d(4), "Dropout": lambda: fdt.Dropout(0.5),
         "CrossEntropyLoss": lambda: fdt.CrossEntropyLoss()}[module]()
    target = torch.from_numpy(rng.integers(0, 4, 8))

    def step():
        """Forward and backward of a leaf x; returns (output, x) with x.grad from the
        module's backward."""
        x = make((8, 4), torch.float32, rng).requires_grad_()
        y = m(x, target) if module == "CrossEntropyLoss" else m(x)
        y.sum().backward()
        return y, x

    y, x = step()
    if module != "CrossEntropyLoss":  # the loss is a fresh 0-d tensor
        ptr = y.data_ptr()
        kept = y.detach().clone()
        y2 = step()[0]  # y alive: another buffer, and y unchanged
        assert y2.data_ptr() != ptr and torch.equal(y, kept)
        del y2
        assert step()[0].data_ptr() != ptr
        del y
        y, x = step()
        assert y.data_ptr() == ptr
    # the gradient became the leaf's .grad: its memory is not reused while x.grad holds it
    # (the graph of a live output holds x too: AccumulateGrad keeps its leaf)
    grad = x.grad
    del y
    ptr, kept = grad.data_ptr(), grad.clone()
    x2 = step()[1]
    assert x2.grad.data_ptr() != ptr and torch.equal(grad, kept)
    del grad, x, x2
    buffers = m._pool._buffers[(8, 4), np.dtype(np.float32)]
    free = [b.ctypes.data for b, count in zip(buffers, _tensors._refcounts(buffers))
            if count == _tensors._FREE]
    assert ptr in free
    y, x = step()  # the output (not the loss) and the gradient take the first free buffers
    taken = [x.grad.data_ptr()] if module == "CrossEntropyLoss" else [y.data_ptr(),
                                                                     x.grad.data_ptr()]
    assert taken == free[:len(taken)]


def test_batchnorm_output_saved_downstream_is_not_reused(rng):
    bn = fdt.BatchNorm1d(4)
    w = torch.ones(4, requires_grad=True)
    x = make((8, 4), torch.float32, rng)
    y = bn(x)
    ptr, kept = y.data_ptr(), y.detach().clone()
    loss = (y * w).sum()  # mul saves y for its backward
    del y
    assert bn(x).data_ptr() != ptr
    loss.backward()
    assert torch.equal(w.grad, kept.sum(0))
    del loss
    assert bn(x).data_ptr() == ptr
    # ReLU(inplace=True) saves its result, which is y itself
    ref = nn.BatchNorm1d(4)
    ref.load_state_dict(bn.state_dict())
    x, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = bn(x)
    ptr = y.data_ptr()
    loss = torch.relu_(y).sum()
    del y
    assert bn(x).data_ptr() != ptr
    loss.backward()
    torch.relu_(ref(x_ref)).sum().backward()
    close(x.grad, x_ref.grad, GRADIENT, "dx through relu_")
    # ReluBackward released y before BatchNorm's backward ran: dx may take y's memory
    del loss
    assert ptr in {x.grad.data_ptr(), bn(x).data_ptr()}


# -- bad input ----------------------------------------------------------------------------------

BAD_INPUTS = {
    "bfloat16": (lambda: torch.zeros(4, 3, dtype=torch.bfloat16), TypeError, "float32"),
    "float16": (lambda: torch.zeros(4, 3, dtype=torch.float16), TypeError, "float32"),
    "int64": (lambda: torch.zeros(4, 3, dtype=torch.long), TypeError, "float32"),
    "sparse": (lambda: torch.zeros(4, 3).to_sparse(), TypeError, "sparse|strided"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=BAD_INPUTS)
def test_bad_inputs_raise_and_change_nothing(bad):
    make_input, error, match = bad
    bn = fdt.BatchNorm1d(3)
    for module in [bn, fdt.Dropout(0.5), fdt.Dropout(0.5).eval()]:
        with pytest.raises(error, match=match):
            module(make_input())
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_var, torch.ones(3))
    with pytest.raises(error, match=match):
        fdt.cross_entropy(make_input(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(error, match=match):
        fdt.CrossEntropyLoss(weight=make_input()[0])(torch.zeros(4, 3),
                                                     torch.zeros(4, dtype=torch.long))


def test_bad_shapes_raise_and_change_nothing():
    bn = fdt.BatchNorm1d(3)
    for x, match in [(torch.zeros(2, 3, 4, 5), "expected 2D or 3D"),
                     (torch.zeros(1, 3), "more than one value per channel"),
                     (torch.zeros(4, 5), "shape")]:
        with pytest.raises(ValueError, match=match):
            bn(x)
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_mean, torch.zeros(3))
    z = torch.zeros(4, 3, requires_grad=True)
    for target, error, match in [
            (torch.zeros(5, dtype=torch.long), ValueError, "shape"),
            (torch.tensor([0, 1, 3, 0]), ValueError, "class index 3"),
            (torch.zeros(4, 2), ValueError, "shape"),
            (torch.zeros(4, 3, dtype=torch.float64), TypeError, "dtype"),
            (torch.zeros(4, 3, requires_grad=True), ValueError, "requires grad"),
            (torch.zeros(4, 3), ValueError, "ignore_index"),
            ([0, 1, 2, 0], TypeError, "torch.Tensor")]:
        with pytest.raises(error, match=match):
            fdt.cross_entropy(z, target, ignore_index=-100 if match != "ignore_index" else 0)
    with pytest.raises(ValueError, match="class axis"):
        fdt.cross_entropy(torch.zeros(()), torch.zeros((), dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        fdt.cross_entropy(z, torch.zeros(4, dtype=torch.long), reduction="avg")
