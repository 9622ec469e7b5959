"""Bad input outside the optimizers (issue 13): one table per module of named cases, each a
clear error naming its argument that changes nothing (input arrays, out= buffers, layer state);
then zero-size inputs against PyTorch (the oracle: a required test dependency here).

A case is ``pytest.param(make, error, argument, id="module-case")``: ``make()`` builds fresh
inputs and returns ``(call, watched)``, the rejected call and the objects whose state
:func:`snapshot` records before and after it.
"""

import math

import numpy as np
import pytest
import torch

import fastdl as fd
from fastdl import data, gradcheck, nn, schedules, tune
from fastdl.averages import ewa
from fastdl.batchnorm import BatchNormCache

F32, F64 = np.float32, np.float64


def _with(overrides, **defaults):
    """A case's arguments: ``defaults`` with ``overrides`` (callables are called, so that each
    case gets fresh arrays)."""
    return {**defaults, **{k: (v() if callable(v) else v) for k, v in overrides.items()}}


def cases_of(fn, defaults):
    """Case builder of ``fn``: ``builder(**overrides)`` gives ``make() -> (call, args)`` with
    ``defaults()`` (fresh arrays) overridden."""
    def builder(**overrides):
        def make():
            args = _with(overrides, **defaults())
            return lambda: fn(**args), args
        return make
    return builder


# -- snapshots ------------------------------------------------------------------------------------


def snapshot(obj):
    """A comparable record of ``obj``'s state: arrays by identity and contents, layers and
    other stateful objects by their attributes (reused output buffers left out: a rejected
    call may size one, it never writes one the layer's state refers to)."""
    if isinstance(obj, np.ndarray):
        return ("array", id(obj), obj.dtype, obj.shape, obj.copy())
    if isinstance(obj, BatchNormCache):
        return ("cache",) + tuple(snapshot(v) for v in obj)
    if isinstance(obj, (nn.Layer, data.Standardizer, nn.EarlyStopping)):
        return ("object", type(obj)) + tuple(
            (k, snapshot(v)) for k, v in sorted(vars(obj).items()) if k not in ("_buffers",))
    if isinstance(obj, dict):
        return ("dict",) + tuple((k, snapshot(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__,) + tuple(snapshot(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, np.generic)):
        return ("value", obj)
    return ("identity", id(obj))  # kernels' ops, samplers: compared as the same object


def same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def assert_rejected(make, error, argument):
    call, watched = make()
    before = snapshot(watched)
    with pytest.raises(error) as excinfo:
        call()
    assert argument in str(excinfo.value), f"{argument!r} not named in: {excinfo.value}"
    assert same(before, snapshot(watched)), "a rejected call changed its inputs or state"


def read_only(a):
    a.flags.writeable = False
    return a


def rand(*shape, dtype=F32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# -- batch_norm_forward / batch_norm_backward --------------------------------------------------

def bn(**kwargs):
    """A batch-norm forward call on (8, 4) float32 with tracked statistics, ``kwargs``
    overriding (``x``, ``gamma``, ... or any keyword)."""
    def make():
        args = _with(kwargs, x=rand(8, 4), gamma=rand(4, seed=1), beta=rand(4, seed=2),
                    running_mean=np.zeros(4, F32), running_var=np.ones(4, F32))
        return lambda: fd.batch_norm_forward(**args), args
    return make


def _bn_backward_defaults():
    _, cache = fd.batch_norm_forward(rand(8, 4), rand(4, seed=1), None, None, None)
    return dict(dy=rand(8, 4, seed=3), cache=cache)


bn_backward = cases_of(fd.batch_norm_backward, _bn_backward_defaults)


BATCHNORM = [
    pytest.param(bn(momentum=2.0), ValueError, "momentum", id="batchnorm-momentum-range"),
    pytest.param(bn(momentum="0.1"), TypeError, "momentum", id="batchnorm-momentum-type"),
    pytest.param(bn(eps=0.0), ValueError, "eps", id="batchnorm-eps-zero"),
    pytest.param(bn(population="y"), TypeError, "population", id="batchnorm-population-type"),
    pytest.param(bn(training="yes"), TypeError, "training", id="batchnorm-training-type"),
    pytest.param(bn(channel_axis=1.0), TypeError, "channel_axis", id="batchnorm-axis-type"),
    pytest.param(bn(channel_axis=2), ValueError, "channel_axis", id="batchnorm-axis-range"),
    pytest.param(bn(x=lambda: rand(8, 4).tolist()), TypeError, "x", id="batchnorm-x-list"),
    pytest.param(bn(x=lambda: np.ones((8, 4), np.int32)), TypeError, "x", id="batchnorm-x-int"),
    pytest.param(bn(gamma=lambda: rand(4, dtype=F64)), TypeError, "gamma",
                 id="batchnorm-gamma-dtype"),
    pytest.param(bn(gamma=lambda: rand(5)), ValueError, "gamma", id="batchnorm-gamma-shape"),
    pytest.param(bn(gamma=[1.0] * 4), TypeError, "gamma", id="batchnorm-gamma-list"),
    pytest.param(bn(running_var=lambda: read_only(np.ones(4, F32))), ValueError, "running_var",
                 id="batchnorm-running-read-only"),
    pytest.param(bn(out=lambda: np.zeros((8, 4), F64)), TypeError, "out",
                 id="batchnorm-out-dtype"),
    pytest.param(bn(out=lambda: read_only(np.zeros((8, 4), F32))), ValueError, "out",
                 id="batchnorm-out-read-only"),
    pytest.param(bn(out=lambda: np.zeros((8, 5), F32)), ValueError, "out",
                 id="batchnorm-out-shape"),
    pytest.param(bn(x=lambda: rand(0, 8, 4), gamma=None, beta=None, running_mean=None,
                    running_var=None, population=True), ValueError, "x",
                 id="batchnorm-zero-models"),
    pytest.param(bn_backward(dy=lambda: rand(8, 4, dtype=F64)), TypeError, "dy",
                 id="batchnorm-backward-dy-dtype"),
    pytest.param(bn_backward(dy=lambda: rand(8, 5)), ValueError, "dy",
                 id="batchnorm-backward-dy-shape"),
    pytest.param(bn_backward(out=lambda: np.zeros((8, 4), F64)), TypeError, "out",
                 id="batchnorm-backward-out-dtype"),
    pytest.param(bn_backward(out=lambda: read_only(np.zeros((8, 4), F32))), ValueError, "out",
                 id="batchnorm-backward-out-read-only"),
    pytest.param(bn_backward(cache=lambda: (rand(8, 4),)), TypeError, "cache",
                 id="batchnorm-backward-cache-type"),
]


# -- softmax / log_softmax / softmax_cross_entropy ---------------------------------------------

def normalize(function, **kwargs):
    def make():
        args = _with(kwargs, z=rand(4, 5))
        return lambda: function(**args), args
    return make


def xent(**kwargs):
    """A cross-entropy call on logits (4, 5) float32 writing its gradient over the logits."""
    def make():
        logits = rand(4, 5)
        args = _with(kwargs, logits=logits, target=np.array([0, 1, 4, 2]), out=logits)
        return lambda: fd.softmax_cross_entropy(**args), args
    return make


def xent_overlapping_weight():
    """weight= a view of the logits that the gradient is written over."""
    logits = rand(5, 5)
    args = dict(logits=logits, target=np.array([0, 1, 4, 2, 3]), out=logits, weight=logits[0])
    return lambda: fd.softmax_cross_entropy(**args), args


SOFTMAX = [
    pytest.param(normalize(fd.softmax, z=[1.0, 2.0]), TypeError, "z", id="softmax-z-list"),
    pytest.param(normalize(fd.softmax, axis=1.0), TypeError, "axis", id="softmax-axis-type"),
    pytest.param(normalize(fd.softmax, axis=2), ValueError, "axis", id="softmax-axis-range"),
    pytest.param(normalize(fd.softmax, out=lambda: np.zeros((4, 5), F64)), TypeError, "out",
                 id="softmax-out-dtype"),
    pytest.param(normalize(fd.softmax, out=lambda: read_only(np.zeros((4, 5), F32))),
                 ValueError, "out", id="softmax-out-read-only"),
    pytest.param(normalize(fd.log_softmax, out=lambda: np.zeros((4, 6), F32)), ValueError,
                 "out", id="log_softmax-out-shape"),
    pytest.param(normalize(fd.log_softmax, out=lambda: read_only(np.zeros((4, 5), F32))),
                 ValueError, "out", id="log_softmax-out-read-only"),
    pytest.param(xent(reduction="x"), ValueError, "reduction", id="xent-reduction"),
    pytest.param(xent(label_smoothing=1.5), ValueError, "label_smoothing",
                 id="xent-label_smoothing-range"),
    pytest.param(xent(label_smoothing="0.1"), TypeError, "label_smoothing",
                 id="xent-label_smoothing-type"),
    pytest.param(xent(ignore_index="-100"), TypeError, "ignore_index",
                 id="xent-ignore_index-type"),
    pytest.param(xent(population="y"), TypeError, "population", id="xent-population-type"),
    pytest.param(xent(axis="-1"), TypeError, "axis", id="xent-axis-type"),
    pytest.param(xent(target=lambda: np.array([0, 1, 5, 2])), ValueError, "target",
                 id="xent-label-range"),
    pytest.param(xent(target=[0, 1, 4, 2]), TypeError, "target", id="xent-target-list"),
    pytest.param(xent(out=lambda: np.zeros((4, 5), F64)), TypeError, "out", id="xent-out-dtype"),
    pytest.param(xent(out=lambda: read_only(np.zeros((4, 5), F32))), ValueError, "out",
                 id="xent-out-read-only"),
    pytest.param(xent(logits=lambda: np.zeros((4, 0), F32), target=lambda: np.zeros(4, int),
                      out=None), ValueError, "class", id="xent-zero-classes"),
    pytest.param(xent(logits=lambda: np.zeros((4, 0), F32), target=lambda: np.zeros((4, 0), F32),
                      out=None), ValueError, "class", id="xent-zero-classes-probabilities"),
    pytest.param(xent(logits=lambda: np.zeros((0, 4, 5), F32),
                      target=lambda: np.zeros((0, 4), int), out=None, population=True),
                 ValueError, "logits", id="xent-zero-models"),
    pytest.param(xent(weight=[1.0] * 5), TypeError, "weight", id="xent-weight-list"),
    pytest.param(xent(weight=lambda: np.ones(5, F64)), TypeError, "weight",
                 id="xent-weight-dtype"),
    pytest.param(xent(weight=lambda: np.ones(5, np.int64)), TypeError, "weight",
                 id="xent-weight-int"),
    pytest.param(xent(weight=lambda: np.ones(4, F32)), ValueError, "weight",
                 id="xent-weight-length"),
    pytest.param(xent(weight=lambda: np.ones((1, 5), F32)), ValueError, "weight",
                 id="xent-weight-per-model-without-population"),
    pytest.param(xent(logits=lambda: rand(2, 4, 5), target=lambda: np.zeros((2, 4), int),
                      out=None, population=True, weight=lambda: np.ones((3, 5), F32)),
                 ValueError, "weight", id="xent-weight-models"),
    pytest.param(xent(weight=lambda: np.ones((5, 2), F32)[:, 0]), ValueError, "weight",
                 id="xent-weight-non-contiguous"),
    pytest.param(xent(weight=lambda: np.float32(1.0)), TypeError, "weight",
                 id="xent-weight-scalar"),
    pytest.param(xent_overlapping_weight, ValueError, "weight", id="xent-weight-overlaps-out"),
]


# -- dropout_forward / dropout_backward --------------------------------------------------------

def drop(**kwargs):
    def make():
        args = _with(kwargs, x=rand(3, 5), p=0.5, seed=0)
        return lambda: fd.dropout_forward(**args), args
    return make


def _drop_backward_defaults():
    dy = rand(3, 5)
    return dict(dy=dy, mask=fd.dropout_forward(dy, 0.5, 0)[1], p=0.5)


drop_backward = cases_of(fd.dropout_backward, _drop_backward_defaults)


DROPOUT = [
    pytest.param(drop(p=1.5), ValueError, "p", id="dropout-p-range"),
    pytest.param(drop(p="0.5"), TypeError, "p", id="dropout-p-type"),
    pytest.param(drop(seed=1.5), TypeError, "seed", id="dropout-seed-type"),
    pytest.param(drop(population="y"), TypeError, "population", id="dropout-population-type"),
    pytest.param(drop(x=lambda: rand(3, 5).tolist()), TypeError, "x", id="dropout-x-list"),
    pytest.param(drop(out=lambda: np.zeros((3, 5), F64)), TypeError, "out",
                 id="dropout-out-dtype"),
    pytest.param(drop(out=lambda: read_only(np.zeros((3, 5), F32))), ValueError, "out",
                 id="dropout-out-read-only"),
    pytest.param(drop(mask_out=lambda: np.zeros((3, 5), np.uint8)), TypeError, "mask_out",
                 id="dropout-mask_out-dtype"),
    pytest.param(drop(mask_out=lambda: read_only(np.zeros((3, 5), bool))), ValueError,
                 "mask_out", id="dropout-mask_out-read-only"),
    pytest.param(drop(x=lambda: rand(0, 5), population=True), ValueError, "x",
                 id="dropout-zero-models"),
    pytest.param(drop_backward(mask=lambda: np.ones((3, 5), np.uint8)), TypeError, "mask",
                 id="dropout-backward-mask-dtype"),
    pytest.param(drop_backward(mask=lambda: np.ones((3, 4), bool)), ValueError, "mask",
                 id="dropout-backward-mask-shape"),
    pytest.param(drop_backward(mask=[[True] * 5] * 3), TypeError, "mask",
                 id="dropout-backward-mask-list"),
    pytest.param(drop_backward(p=-0.5), ValueError, "p", id="dropout-backward-p-range"),
    pytest.param(drop_backward(out=lambda: read_only(np.zeros((3, 5), F32))), ValueError, "out",
                 id="dropout-backward-out-read-only"),
    pytest.param(drop_backward(out=lambda: np.zeros((3, 5), F64)), TypeError, "out",
                 id="dropout-backward-out-dtype"),
]


# -- nn layers: constructors, forward, backward ------------------------------------------------

def construct(cls, *args, watched=(), **kwargs):
    def make():
        given = [a() if callable(a) and not isinstance(a, type) else a for a in watched]
        return lambda: cls(*args, **kwargs, **dict(zip(("storage", "grad_storage"), given))), \
            given
    return make


def trained(layer, x, dout=None, **forward):
    """``layer`` after one forward (and backward, with ``dout``): state worth protecting."""
    layer.forward(x, **forward)
    if dout is not None:
        layer.backward(dout)
    return layer


def layer_call(build, method, *args, **kwargs):
    def make():
        layer = build()
        return lambda: getattr(layer, method)(*args, **kwargs), [layer] + list(args)
    return make


def linear():
    return trained(nn.Linear(4, 3, seed=0), rand(2, 4), rand(2, 3))


def batchnorm():
    return trained(nn.BatchNorm(4), rand(8, 4), rand(8, 4, seed=1))


def dropout():
    return trained(nn.Dropout(0.5, seed=1), rand(3, 5), rand(3, 5))


def xent_layer():
    layer = nn.SoftmaxCrossEntropy()
    layer.forward(rand(4, 5), np.array([0, 1, 4, 2]))
    layer.backward(2.0)
    return layer


def relu():
    return trained(nn.ReLU(), rand(3, 5), rand(3, 5))


def storage(dtype=F32, n=4):
    return [np.full(n, 7, dtype), np.full(n, 7, dtype)]


NN = [
    pytest.param(construct(nn.Linear, 0, 3), ValueError, "n_in", id="nn-linear-n_in-range"),
    pytest.param(construct(nn.Linear, "4", 3), TypeError, "n_in", id="nn-linear-n_in-type"),
    pytest.param(construct(nn.Linear, 4, 3.0), TypeError, "n_out", id="nn-linear-n_out-type"),
    pytest.param(construct(nn.Linear, 4, 3, init="x"), ValueError, "init", id="nn-linear-init"),
    pytest.param(construct(nn.Linear, 4, 3, bias="yes"), TypeError, "bias",
                 id="nn-linear-bias-type"),
    pytest.param(construct(nn.Linear, 4, 3, feature_axis=2), ValueError, "feature_axis",
                 id="nn-linear-feature_axis"),
    pytest.param(construct(nn.Linear, 4, 3, dtype=np.int32), TypeError, "dtype",
                 id="nn-linear-dtype"),
    pytest.param(construct(nn.Linear, 4, 3, seed=1.5), TypeError, "seed", id="nn-linear-seed"),
    pytest.param(construct(nn.Linear, 4, 3, device="tpu"), ValueError, "device",
                 id="nn-linear-device"),
    pytest.param(construct(nn.Linear, 4, 3, population="y"), TypeError, "population",
                 id="nn-linear-population-type"),
    pytest.param(construct(nn.Linear, 4, 3, population=0), ValueError, "population",
                 id="nn-linear-population-zero"),
    pytest.param(layer_call(linear, "forward", rand(2, 4, dtype=F64)), TypeError, "x",
                 id="nn-linear-forward-dtype"),
    pytest.param(layer_call(linear, "forward", rand(2, 5)), ValueError, "features",
                 id="nn-linear-forward-features"),
    pytest.param(layer_call(linear, "forward", rand(2, 4).tolist()), TypeError, "x",
                 id="nn-linear-forward-list"),
    pytest.param(layer_call(linear, "backward", rand(3, 3)), ValueError, "dout",
                 id="nn-linear-backward-shape"),
    pytest.param(layer_call(linear, "backward", rand(2, 3), input_grad="no"), TypeError,
                 "input_grad", id="nn-linear-backward-input_grad"),
    pytest.param(construct(nn.BatchNorm, 4, momentum=2), ValueError, "momentum",
                 id="nn-batchnorm-momentum-range"),
    pytest.param(construct(nn.BatchNorm, 4, momentum="0.1"), TypeError, "momentum",
                 id="nn-batchnorm-momentum-type"),
    pytest.param(construct(nn.BatchNorm, 4, eps=0), ValueError, "eps", id="nn-batchnorm-eps"),
    pytest.param(construct(nn.BatchNorm, 0), ValueError, "num_features",
                 id="nn-batchnorm-num_features"),
    pytest.param(construct(nn.BatchNorm, 4, channel_axis=1.5), TypeError, "channel_axis",
                 id="nn-batchnorm-channel_axis-type"),
    pytest.param(construct(nn.BatchNorm, 4, channel_axis=5), ValueError, "channel_axis",
                 id="nn-batchnorm-channel_axis-range"),
    pytest.param(construct(nn.BatchNorm, 4, dtype="int32"), TypeError, "dtype",
                 id="nn-batchnorm-dtype"),
    pytest.param(construct(nn.BatchNorm, 4, population="y"), TypeError, "population",
                 id="nn-batchnorm-population-type"),
    pytest.param(construct(nn.BatchNorm, 4, watched=[lambda: storage(F64)]), TypeError,
                 "storage[0]", id="nn-batchnorm-storage-dtype"),
    pytest.param(construct(nn.BatchNorm, 4, watched=[storage, lambda: storage(n=5)]),
                 ValueError, "grad_storage[0]", id="nn-batchnorm-grad_storage-shape"),
    pytest.param(construct(nn.BatchNorm, 4, watched=[lambda: np.zeros((2, 4), F32)]),
                 TypeError, "storage", id="nn-batchnorm-storage-type"),
    pytest.param(layer_call(batchnorm, "forward", rand(8, 4, dtype=F64)), TypeError, "x",
                 id="nn-batchnorm-forward-dtype"),
    pytest.param(layer_call(batchnorm, "forward", rand(8, 4).tolist()), TypeError, "x",
                 id="nn-batchnorm-forward-list"),
    pytest.param(layer_call(batchnorm, "forward", rand(8, 5)), ValueError, "gamma",
                 id="nn-batchnorm-forward-channels"),
    pytest.param(layer_call(batchnorm, "forward", rand(1, 4)), ValueError, "more than one",
                 id="nn-batchnorm-forward-one-value"),
    pytest.param(layer_call(batchnorm, "backward", rand(8, 4, dtype=F64)), TypeError, "dy",
                 id="nn-batchnorm-backward-dtype"),
    pytest.param(construct(nn.Dropout, 1.5), ValueError, "p", id="nn-dropout-p-range"),
    pytest.param(construct(nn.Dropout, "0.5"), TypeError, "p", id="nn-dropout-p-type"),
    pytest.param(construct(nn.Dropout, 0.5, seed="1"), TypeError, "seed", id="nn-dropout-seed"),
    pytest.param(construct(nn.Dropout, 0.5, population="y"), TypeError, "population",
                 id="nn-dropout-population-type"),
    pytest.param(layer_call(dropout, "forward", rand(3, 5).tolist()), TypeError, "x",
                 id="nn-dropout-forward-list"),
    pytest.param(layer_call(dropout, "forward", np.ones((3, 5), np.int32)), TypeError, "x",
                 id="nn-dropout-forward-int"),
    pytest.param(layer_call(dropout, "backward", rand(3, 4)), ValueError, "mask",
                 id="nn-dropout-backward-shape"),
    pytest.param(construct(nn.SoftmaxCrossEntropy, reduction="x"), ValueError, "reduction",
                 id="nn-xent-reduction"),
    pytest.param(construct(nn.SoftmaxCrossEntropy, axis=1.0), TypeError, "axis",
                 id="nn-xent-axis-type"),
    pytest.param(construct(nn.SoftmaxCrossEntropy, label_smoothing=2), ValueError,
                 "label_smoothing", id="nn-xent-label_smoothing-range"),
    pytest.param(construct(nn.SoftmaxCrossEntropy, label_smoothing="0"), TypeError,
                 "label_smoothing", id="nn-xent-label_smoothing-type"),
    pytest.param(construct(nn.SoftmaxCrossEntropy, ignore_index=1.5), TypeError,
                 "ignore_index", id="nn-xent-ignore_index-type"),
    pytest.param(construct(nn.SoftmaxCrossEntropy, population="y"), TypeError, "population",
                 id="nn-xent-population-type"),
    pytest.param(construct(nn.SoftmaxCrossEntropy, weight=[1.0, 2.0]), TypeError, "weight",
                 id="nn-xent-weight-list"),
    pytest.param(construct(nn.SoftmaxCrossEntropy, weight=np.ones(3, np.int64)), TypeError,
                 "weight", id="nn-xent-weight-int"),
    pytest.param(construct(nn.SoftmaxCrossEntropy, weight=np.ones((2, 3), F32)), ValueError,
                 "weight", id="nn-xent-weight-per-model-without-population"),
    pytest.param(construct(nn.SoftmaxCrossEntropy, population=2, weight=np.ones((3, 5), F32)),
                 ValueError, "weight", id="nn-xent-weight-models"),
    pytest.param(layer_call(lambda: nn.SoftmaxCrossEntropy(weight=np.ones(4, F32)), "forward",
                            rand(4, 5), np.array([0, 1, 4, 2])),
                 ValueError, "weight", id="nn-xent-forward-weight-classes"),
    pytest.param(layer_call(xent_layer, "forward", rand(4, 5), np.array([0, 1, 5, 2])),
                 ValueError, "target", id="nn-xent-forward-label-range"),
    pytest.param(layer_call(xent_layer, "forward", rand(4, 5).tolist(), np.array([0, 1, 4, 2])),
                 TypeError, "logits", id="nn-xent-forward-list"),
    pytest.param(layer_call(xent_layer, "backward", "2"), TypeError, "dout",
                 id="nn-xent-backward-dout-type"),
    pytest.param(construct(nn.ReLU, population="y"), TypeError, "population",
                 id="nn-relu-population-type"),
    pytest.param(layer_call(relu, "forward", rand(3, 5).tolist()), TypeError, "x",
                 id="nn-relu-forward-list"),
    pytest.param(layer_call(relu, "backward", rand(3, 4)), ValueError, "dout",
                 id="nn-relu-backward-shape"),
    pytest.param(construct(nn.Sequential, nn.Linear(4, 3), "relu"), TypeError, "layers[1]",
                 id="nn-sequential-layer-type"),
    pytest.param(construct(nn.EarlyStopping, nn.ReLU(), patience=0), ValueError, "patience",
                 id="nn-earlystopping-patience"),
    pytest.param(construct(nn.EarlyStopping, nn.ReLU(), min_delta="0"), TypeError, "min_delta",
                 id="nn-earlystopping-min_delta"),
    pytest.param(construct(nn.EarlyStopping, "model"), TypeError, "model",
                 id="nn-earlystopping-model"),
    pytest.param(layer_call(lambda: nn.EarlyStopping(nn.Linear(2, 2)), "step", "0.5"),
                 TypeError, "dev_loss", id="nn-earlystopping-step-type"),
]


# -- data --------------------------------------------------------------------------------------

def batches(**kwargs):
    def make():
        args = _with(kwargs, X=rand(10, 3), Y=np.arange(10))
        return lambda: next(data.minibatches(**args)), args
    return make


def split(**kwargs):
    def make():
        args = _with(kwargs, X=rand(10, 3), Y=np.arange(10))
        return lambda: data.train_dev_test_split(**args), args
    return make


def standardize(X, **kwargs):
    def make():
        scaler = data.Standardizer().fit(rand(10, 3))
        given = X()
        return lambda: scaler.transform(given, **kwargs), [scaler, given]
    return make


DATA = [
    pytest.param(batches(X=lambda: rand(10, 3).tolist()), TypeError, "X", id="data-batches-X"),
    pytest.param(batches(batch_size=0), ValueError, "batch_size", id="data-batches-size"),
    pytest.param(batches(batch_size="8"), TypeError, "batch_size", id="data-batches-size-type"),
    pytest.param(batches(axis=2), ValueError, "axis", id="data-batches-axis-range"),
    pytest.param(batches(axis="0"), TypeError, "axis", id="data-batches-axis-type"),
    pytest.param(batches(Y=lambda: np.arange(9)), ValueError, "Y", id="data-batches-Y-length"),
    pytest.param(batches(Y=lambda: np.array(3)), ValueError, "Y", id="data-batches-Y-scalar"),
    pytest.param(batches(shuffle="no"), TypeError, "shuffle", id="data-batches-shuffle-type"),
    pytest.param(split(fractions=(0.6, 0.6, 0.2)), ValueError, "fractions", id="data-split-sum"),
    pytest.param(split(fractions="abc"), TypeError, "fractions", id="data-split-string"),
    pytest.param(split(fractions=("a", 0.5, 0.5)), TypeError, "fractions[0]",
                 id="data-split-fraction-type"),
    pytest.param(split(Y=lambda: np.arange(5)), ValueError, "Y", id="data-split-Y-length"),
    pytest.param(construct(data.Standardizer, axis=2), ValueError, "axis",
                 id="data-standardizer-axis"),
    pytest.param(construct(data.Standardizer, axis="0"), TypeError, "axis",
                 id="data-standardizer-axis-type"),
    pytest.param(construct(data.Standardizer, eps=-1.0), ValueError, "eps",
                 id="data-standardizer-eps"),
    pytest.param(standardize(lambda: rand(4, 1)), ValueError, "X",
                 id="data-standardizer-features"),
    pytest.param(standardize(lambda: rand(4, 3, 1)), ValueError, "X",
                 id="data-standardizer-rank"),
    pytest.param(standardize(lambda: rand(4, 3), dtype=np.int32), TypeError, "dtype",
                 id="data-standardizer-int-dtype"),
    pytest.param(standardize(lambda: rand(4, 3).tolist()), TypeError, "X",
                 id="data-standardizer-list"),
    pytest.param(standardize(lambda: np.full((4, 3), "a")), TypeError, "X",
                 id="data-standardizer-strings"),
    pytest.param(layer_call(data.Standardizer, "transform", rand(4, 3)), ValueError, "fit",
                 id="data-standardizer-unfitted"),
]


# -- schedules, ewa, gradcheck -----------------------------------------------------------------

def plain(function, *args, **kwargs):
    def make():
        return lambda: function(*args, **kwargs), [a for a in args if isinstance(a, np.ndarray)]
    return make


def check_linear(**kwargs):
    """check_layer on a trained Linear: a rejected check must not run the layer."""
    def make():
        layer = trained(nn.Linear(4, 3, dtype=F64, seed=0), rand(2, 4, dtype=F64),
                        rand(2, 3, dtype=F64))
        return lambda: gradcheck.check_layer(layer, rand(2, 4, dtype=F64), **kwargs), [layer]
    return make


SCHEDULES = [
    pytest.param(plain(schedules.inverse_time, -1.0, 0.5), ValueError, "lr0",
                 id="schedules-lr0-range"),
    pytest.param(plain(schedules.inverse_time, "0.1", 0.5), TypeError, "lr0",
                 id="schedules-lr0-type"),
    pytest.param(plain(schedules.inverse_time, 0.1, math.nan), ValueError, "decay_rate",
                 id="schedules-decay_rate-nan"),
    pytest.param(plain(schedules.exponential, 0.1, base="x"), TypeError, "base",
                 id="schedules-base-type"),
    pytest.param(plain(schedules.inverse_sqrt, np.array([0.1, -0.1])), ValueError, "lr0",
                 id="schedules-per-model-range"),
    pytest.param(plain(schedules.staircase, 0.1, 0.5, 0), ValueError, "step_size",
                 id="schedules-step_size-range"),
    pytest.param(plain(schedules.staircase, 0.1, 0.5, 1.5), TypeError, "step_size",
                 id="schedules-step_size-type"),
    pytest.param(plain(schedules.piecewise, [10], [0.1]), ValueError, "values",
                 id="schedules-piecewise-values"),
    pytest.param(plain(schedules.piecewise, [10, 5], [0.1, 0.01, 0.001]), ValueError,
                 "boundaries", id="schedules-piecewise-order"),
    pytest.param(plain(schedules.inverse_time(0.1, 0.5), -1), ValueError, "epoch",
                 id="schedules-epoch-range"),
    pytest.param(plain(schedules.exponential(0.1), "1"), TypeError, "epoch",
                 id="schedules-epoch-type"),
    pytest.param(plain(ewa, np.arange(5.0), 1.0), ValueError, "beta", id="ewa-beta-range"),
    pytest.param(plain(ewa, np.arange(5.0), "0.9"), TypeError, "beta", id="ewa-beta-type"),
    pytest.param(plain(ewa, np.ones((2, 3)), 0.9), ValueError, "values", id="ewa-values-2d"),
    pytest.param(plain(ewa, np.array(["a", "b"]), 0.9), TypeError, "values",
                 id="ewa-values-strings"),
    pytest.param(plain(gradcheck.numerical_gradient, lambda: 0.0, [1.0, 2.0]), TypeError, "x",
                 id="gradcheck-numerical-x-list"),
    pytest.param(plain(gradcheck.numerical_gradient, lambda: 0.0, np.ones(3), eps=0.0),
                 ValueError, "eps", id="gradcheck-numerical-eps"),
    pytest.param(plain(gradcheck.numerical_gradient, lambda: 0.0, np.ones((3, 4)).T),
                 ValueError, "x", id="gradcheck-numerical-non-contiguous"),
    pytest.param(plain(gradcheck.relative_difference, np.ones(3), np.ones((3, 3))), ValueError,
                 "shape", id="gradcheck-relative-shapes"),
    pytest.param(check_linear(eps=0.0), ValueError, "eps", id="gradcheck-check_layer-eps"),
    pytest.param(check_linear(loss="xent"), TypeError, "loss", id="gradcheck-check_layer-loss"),
    pytest.param(plain(gradcheck.check_layer, "relu", np.ones((2, 3))), TypeError, "layer",
                 id="gradcheck-check_layer-layer"),
]


# -- tune ----------------------------------------------------------------------------------------

SPACE = {"lr": tune.loguniform(1e-4, 1e-1), "drop": tune.uniform(0.0, 0.5)}


def results():
    return [{"lr": 1e-3 * (i + 1), "drop": 0.1 * i, "dev_accuracy": 0.5 + 0.1 * i}
            for i in range(4)]


def narrow(records=results, **kwargs):
    def make():
        given = records()
        return lambda: tune.coarse_to_fine(SPACE, given, **kwargs), [given]
    return make


def without(i, key):
    def records():
        given = results()
        del given[i][key]
        return given
    return records


TUNE = [
    pytest.param(plain(tune.uniform, "a", 1.0), TypeError, "lo", id="tune-uniform-lo-type"),
    pytest.param(plain(tune.uniform, 0.0, math.inf), ValueError, "hi", id="tune-uniform-inf"),
    pytest.param(plain(tune.uniform, 1.0, 0.0), ValueError, "lo < hi", id="tune-uniform-order"),
    pytest.param(plain(tune.uniform, True, 2.0), TypeError, "lo", id="tune-uniform-bool"),
    pytest.param(plain(tune.loguniform, 0.0, 1.0), ValueError, "lo", id="tune-loguniform-zero"),
    pytest.param(plain(tune.beta_range, 0.9, 1.0), ValueError, "hi", id="tune-beta_range-one"),
    pytest.param(plain(tune.choice, []), ValueError, "option", id="tune-choice-empty"),
    pytest.param(plain(tune.sample_space, SPACE, 0), ValueError, "n", id="tune-sample-n-range"),
    pytest.param(plain(tune.sample_space, SPACE, "4"), TypeError, "n", id="tune-sample-n-type"),
    pytest.param(plain(tune.random_search, {"lr": 0.1}, 3), TypeError, "space['lr']",
                 id="tune-space-sampler"),
    pytest.param(narrow(keep=0.0), ValueError, "keep", id="tune-keep-zero"),
    pytest.param(narrow(keep=1.5), ValueError, "keep", id="tune-keep-fraction-range"),
    pytest.param(narrow(keep=5), ValueError, "keep", id="tune-keep-count-range"),
    pytest.param(narrow(keep=0), ValueError, "keep", id="tune-keep-count-zero"),
    pytest.param(narrow(keep="all"), TypeError, "keep", id="tune-keep-type"),
    pytest.param(narrow(keep=True), TypeError, "keep", id="tune-keep-bool"),
    pytest.param(narrow(records=without(2, "drop")), ValueError, "results[2]",
                 id="tune-results-missing-key"),
    pytest.param(narrow(records=lambda: results()[0]), TypeError, "results",
                 id="tune-results-dict"),
    pytest.param(narrow(records=lambda: results() + ["x"]), TypeError, "results[4]",
                 id="tune-results-entry-type"),
]


@pytest.mark.parametrize("make, error, argument",
                         BATCHNORM + SOFTMAX + DROPOUT + NN + DATA + SCHEDULES + TUNE)
def test_bad_input_is_a_clear_error_that_changes_nothing(make, error, argument):
    assert_rejected(make, error, argument)


def test_a_missing_key_is_named_with_its_result():
    with pytest.raises(ValueError, match=r"results\[2\] has no value for 'drop'"):
        tune.coarse_to_fine(SPACE, without(2, "drop")())


@pytest.mark.parametrize("keep, count", [(0.25, 1), (0.5, 2), (1.0, 4), (1, 1), (3, 3),
                                         (np.int64(2), 2)])
def test_coarse_to_fine_keeps_a_fraction_or_a_count(keep, count):
    top = tune.best(results())[:count]  # the results ranked on dev_accuracy
    finer = tune.coarse_to_fine(SPACE, results(), keep=keep)
    want = tune.coarse_to_fine(SPACE, top, keep=1.0)  # narrowed around exactly those
    assert repr(finer) == repr(want)
    if count < 4:  # and not around all of them
        assert repr(finer) != repr(tune.coarse_to_fine(SPACE, results(), keep=1.0))


# -- the state a rejected layer call leaves: the counters and caches themselves -----------------

def test_a_rejected_dropout_forward_draws_no_mask():
    layer = nn.Dropout(0.5, seed=3)
    with pytest.raises(TypeError):
        layer.forward(np.ones((4, 6), np.int32))
    assert layer.calls == 0
    x = rand(4, 6)
    np.testing.assert_array_equal(layer.forward(x), nn.Dropout(0.5, seed=3).forward(x))


def test_storage_is_not_filled_when_grad_storage_is_rejected():
    given = storage()
    with pytest.raises(ValueError, match="grad_storage"):
        nn.BatchNorm(4, storage=given, grad_storage=storage(n=5))
    assert all(np.all(a == 7) for a in given)


# -- Standardizer: never broadcast, never truncated ---------------------------------------------

def test_standardizer_gives_integer_input_float_output():
    X = np.array([[0, 10], [1, 20], [2, 30], [3, 40]], np.int64)
    scaler = data.Standardizer().fit(X)
    want = (X - X.mean(axis=0)) / X.std(axis=0)
    out = scaler.transform(X)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, want, rtol=1e-12)
    assert scaler.transform(X, dtype=np.float32).dtype == np.float32
    assert scaler.transform(X.astype(F32)).dtype == np.float32
    notes = data.Standardizer(axis=1).fit(np.ascontiguousarray(X.T))
    np.testing.assert_allclose(notes.transform(np.ascontiguousarray(X.T)), want.T, rtol=1e-12)


# -- zero-size inputs, against PyTorch -------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target", ["index", "probabilities"])
@pytest.mark.parametrize("shape, axis", [((0, 5), -1), ((5, 0), 0), ((0, 5, 3), 1)],
                         ids=["rows", "notes-columns", "spatial"])
def test_cross_entropy_of_an_empty_batch_is_torchs(shape, axis, target, reduction):
    logits = np.zeros(shape, F32)
    row_shape = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    y = np.zeros(row_shape, np.int64) if target == "index" else np.zeros(shape, F32)
    loss, dlogits = fd.softmax_cross_entropy(logits, y, axis=axis, reduction=reduction,
                                             label_smoothing=0.1)
    t_logits = torch.from_numpy(np.moveaxis(logits, axis, 1).copy()).requires_grad_()
    t_y = torch.from_numpy(y if target == "index" else np.moveaxis(y, axis, 1).copy())
    t_loss = torch.nn.functional.cross_entropy(t_logits, t_y, reduction=reduction,
                                               label_smoothing=0.1)
    t_loss.sum().backward()
    want = t_loss.detach().numpy()
    assert np.shape(loss) == want.shape and np.asarray(loss).dtype == F32
    np.testing.assert_array_equal(loss, want)  # NaN for "mean", 0 for "sum", empty for "none"
    assert dlogits.shape == shape
    assert t_logits.grad.shape == np.moveaxis(dlogits, axis, 1).shape


def test_cross_entropy_of_an_empty_population_batch_is_nan_per_model():
    loss, dlogits = fd.softmax_cross_entropy(np.zeros((3, 0, 5), F32), np.zeros((3, 0), int),
                                             population=True)
    assert loss.shape == (3,) and np.all(np.isnan(loss)) and dlogits.shape == (3, 0, 5)
    layer = nn.SoftmaxCrossEntropy(reduction="sum")
    assert layer.forward(np.zeros((0, 5), F32), np.zeros(0, int)) == 0
    assert layer.backward().shape == (0, 5)


def test_torch_has_no_loss_over_zero_classes():  # the oracle for the ValueError in the table
    with pytest.raises(IndexError):
        torch.nn.functional.cross_entropy(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("function, oracle", [(fd.softmax, torch.softmax),
                                              (fd.log_softmax, torch.log_softmax)])
@pytest.mark.parametrize("shape, axis", [((0, 5), -1), ((3, 0), -1), ((0,), 0), ((2, 0, 4), 1),
                                         ((0, 5, 4), 1)])
def test_softmax_of_an_empty_array_is_torchs(function, oracle, shape, axis):
    z = np.zeros(shape, F64)
    out = function(z, axis=axis)
    want = oracle(torch.from_numpy(z), axis).numpy()
    assert out.shape == want.shape and out.dtype == F64


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (2, 3, 0, 4)], ids=["batch", "channels",
                                                                        "spatial"])
def test_batch_norm_of_an_empty_input_is_torchs(shape, training):
    x, c = np.zeros(shape, F32), shape[1]
    rm, rv = np.full(c, 0.5, F32), np.full(c, 2.0, F32)
    t_rm, t_rv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    t_x = torch.from_numpy(x.copy()).requires_grad_()
    t_y = torch.nn.functional.batch_norm(t_x, t_rm, t_rv, training=training)
    t_y.sum().backward()
    y, cache = fd.batch_norm_forward(x, None, None, rm, rv, training=training)
    assert y.shape == tuple(t_y.shape) and y.dtype == F32
    np.testing.assert_array_equal(rm, t_rm.numpy())  # untouched: no batch to average
    np.testing.assert_array_equal(rv, t_rv.numpy())
    dx, dgamma, dbeta = fd.batch_norm_backward(np.zeros(shape, F32), cache)
    assert dx.shape == tuple(t_x.grad.shape)
    assert dgamma.shape == dbeta.shape == (c,) and not dgamma.any() and not dbeta.any()


def test_batch_norm_of_an_empty_batch_gives_zero_parameter_gradients_as_torch():
    t_x = torch.zeros(0, 3, requires_grad=True)
    t_g, t_b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    torch.nn.functional.batch_norm(t_x, None, None, t_g, t_b, training=True).sum().backward()
    layer = nn.BatchNorm(3)
    layer.forward(rand(8, 3))
    layer.backward(rand(8, 3, seed=1))  # nonzero gradients, to be overwritten
    layer.forward(np.zeros((0, 3), F32))
    assert layer.backward(np.zeros((0, 3), F32)).shape == (0, 3)
    np.testing.assert_array_equal(layer.dgamma, t_g.grad.numpy())
    np.testing.assert_array_equal(layer.dbeta, t_b.grad.numpy())


def test_dropout_of_an_empty_input_is_empty():
    want = torch.nn.functional.dropout(torch.zeros(0, 3), 0.5).shape
    y, mask = fd.dropout_forward(np.zeros((0, 3), F32), 0.5, seed=0)
    assert y.shape == mask.shape == tuple(want) and mask.dtype == np.bool_
    assert fd.dropout_backward(np.zeros((0, 3), F32), mask, 0.5).shape == (0, 3)
    layer = nn.Dropout(0.5, seed=0)
    assert layer.forward(np.zeros((0, 3), F32)).shape == (0, 3) and layer.calls == 1


def test_linear_on_an_empty_batch_has_zero_weight_gradients_as_torch():
    t_layer = torch.nn.Linear(4, 3)
    t_layer(torch.zeros(0, 4)).sum().backward()
    layer = nn.Linear(4, 3, seed=0)
    layer.forward(rand(2, 4))
    layer.backward(rand(2, 3))  # nonzero gradients, to be overwritten
    assert layer.forward(np.zeros((0, 4), F32)).shape == (0, 3)
    assert layer.backward(np.zeros((0, 3), F32)).shape == (0, 4)
    np.testing.assert_array_equal(layer.dW, t_layer.weight.grad.numpy())
    np.testing.assert_array_equal(layer.db, t_layer.bias.grad.numpy())
