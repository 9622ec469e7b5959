"""The cases of the pytest-benchmark suite (the optimizer cases live in ``fastdl.jobs.bench``,
which ``python -m fastdl bench`` shares): per case a ``make_*`` function building a
zero-argument callable per implementation, ``fastdl`` (and ``fastdl-serial``, the serial
kernels forced), ``numpy`` (the textbook version, one array expression per formula line) and
``torch`` (PyTorch CPU, when installed). All float32, default options on both sides.

Each case has a small smoke size (``case.smoke()``, the same name), which the normal test run
(benchmarks disabled) uses, so every case is checked in seconds; ``--benchmark-enable`` times
the full sizes.
"""

import dataclasses
import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

import fastdl as fd
from fastdl import data, nn, optim, training, tune
from fastdl.jobs.textbook import TextbookNetwork, textbook_cross_entropy


@contextmanager
def _parallel_threshold(implementation):
    """"fastdl-serial" forces the serial kernels, to measure what the parallel ones gain."""
    from fastdl.kernels import config

    default = config.PARALLEL_MIN_SIZE
    if implementation == "fastdl-serial":
        config.PARALLEL_MIN_SIZE = math.inf
    try:
        yield
    finally:
        config.PARALLEL_MIN_SIZE = default


# -- batch normalization ------------------------------------------------------------------------


@dataclass
class ShapeCase:
    """A case on one array of ``shape`` (``smoke_shape`` in the default test run)."""

    name: str
    shape: tuple
    smoke_shape: tuple

    @property
    def size(self):
        return math.prod(self.shape)

    def smoke(self):
        return dataclasses.replace(self, shape=self.smoke_shape)


@dataclass
class BatchNormCase(ShapeCase):
    """Forward + backward in training mode on x of ``shape``, channels along
    ``channel_axis``; ``out`` reuses the y and dx buffers."""

    channel_axis: int = 1
    out: bool = False


BATCHNORM_CASES = {
    "bn_8192x1024": BatchNormCase("(8192, 1024), fresh outputs", (8192, 1024), (64, 32)),
    "bn_8192x1024_out": BatchNormCase("(8192, 1024), out= buffers", (8192, 1024), (64, 32),
                                      out=True),
    "bn_nchw": BatchNormCase("(64, 64, 56, 56), fresh outputs", (64, 64, 56, 56), (4, 8, 6, 6)),
    "bn_features_examples": BatchNormCase("(1024, 8192) features x examples, axis 0",
                                          (1024, 8192), (32, 64), 0),
    "bn_channels_last": BatchNormCase("(64, 56, 56, 64) channels-last, axis -1",
                                      (64, 56, 56, 64), (4, 6, 6, 8), -1),
    "bn_1e6x3": BatchNormCase("(1000000, 3), fresh outputs", (1_000_000, 3), (1000, 3)),
    "bn_1e6x3_out": BatchNormCase("(1000000, 3), out= buffers", (1_000_000, 3), (1000, 3),
                                  out=True),
}

BATCHNORM_IMPLEMENTATIONS = ("fastdl", "fastdl-serial", "numpy", "torch")


def textbook_batch_norm(x, gamma, beta, dy, axis, eps=1e-5):
    """The notes' batch norm forward and backward in NumPy, one temporary per line:
    ``(y, dx, dgamma, dbeta)``."""
    others = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    mu = x.mean(axis=others, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=others, keepdims=True)
    inv_std = 1 / np.sqrt(var + eps)
    xhat = (x - mu) * inv_std
    shape = mu.shape
    y = gamma.reshape(shape) * xhat + beta.reshape(shape)
    m = x.size // x.shape[axis]
    dbeta = dy.sum(axis=others)
    dgamma = (dy * xhat).sum(axis=others)
    dx = gamma.reshape(shape) * inv_std * (dy - dbeta.reshape(shape) / m
                                           - xhat * dgamma.reshape(shape) / m)
    return y, dx, dgamma, dbeta


def make_batchnorm_step(case, implementation, seed=0):
    """A zero-argument callable doing forward + backward (training) of ``case``, or None when
    ``implementation`` cannot run it (PyTorch takes channels at axis 1 only)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape, np.float32)
    dy = rng.standard_normal(case.shape, np.float32)
    c = case.shape[case.channel_axis]
    gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
    running_mean, running_var = np.zeros(c, np.float32), np.ones(c, np.float32)
    if implementation in ("fastdl", "fastdl-serial"):
        y_out = np.empty_like(x) if case.out else None
        dx_out = np.empty_like(x) if case.out else None

        def step():
            with _parallel_threshold(implementation):
                _, cache = fd.batch_norm_forward(x, gamma, beta, running_mean, running_var,
                                                 channel_axis=case.channel_axis, out=y_out)
                return fd.batch_norm_backward(dy, cache, out=dx_out)

        return step
    if implementation == "numpy":
        return lambda: textbook_batch_norm(x, gamma, beta, dy, case.channel_axis)
    if implementation == "torch":
        import torch

        if case.channel_axis != 1:
            return None  # PyTorch's batch_norm takes channels at axis 1 only
        tensors = [torch.from_numpy(a).requires_grad_() for a in (x, gamma, beta)]
        t_mean, t_var, t_dy = map(torch.from_numpy, (running_mean, running_var, dy))

        def step():
            y = torch.nn.functional.batch_norm(tensors[0], t_mean, t_var, tensors[1],
                                               tensors[2], training=True)
            return torch.autograd.grad(y, tensors, t_dy)

        return step
    raise ValueError(f"implementation must be one of {BATCHNORM_IMPLEMENTATIONS}; got "
                     f"{implementation!r}")


# -- softmax cross-entropy and dropout ----------------------------------------------------------


@dataclass
class SoftmaxCase(ShapeCase):
    """Loss + gradient of the mean cross-entropy with index targets on logits of ``shape``
    (classes along ``axis``); ``out`` writes dlogits into a reused buffer."""

    axis: int = -1
    out: bool = False


SOFTMAX_CASES = {
    "xent_4096x1000": SoftmaxCase("(4096, 1000), fresh outputs", (4096, 1000), (64, 100)),
    "xent_4096x1000_out": SoftmaxCase("(4096, 1000), out= buffer", (4096, 1000), (64, 100),
                                      out=True),
    "xent_256x10": SoftmaxCase("(256, 10), fresh outputs", (256, 10), (256, 10)),
    "xent_64x70000": SoftmaxCase("(64, 70000), fresh outputs", (64, 70_000), (4, 7000)),
    "xent_100000x10": SoftmaxCase("(100000, 10), fresh outputs", (100_000, 10), (1000, 10)),
    "xent_classes_first": SoftmaxCase("(1000, 4096) classes x examples, axis 0",
                                      (1000, 4096), (100, 64), axis=0),
}

SOFTMAX_IMPLEMENTATIONS = ("fastdl", "fastdl-serial", "numpy", "torch")


def make_softmax_step(case, implementation, seed=0):
    """A zero-argument callable computing the loss and dlogits of ``case``."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(case.shape, np.float32) * np.float32(3)
    axis = case.axis % len(case.shape)
    labels = rng.integers(0, case.shape[axis], case.shape[1 - axis])
    if implementation in ("fastdl", "fastdl-serial"):
        out = np.empty_like(z) if case.out else None

        def step():
            with _parallel_threshold(implementation):
                return fd.softmax_cross_entropy(z, labels, axis=case.axis, out=out)

        return step
    if implementation == "numpy":
        return lambda: textbook_cross_entropy(z, labels, axis)
    if implementation == "torch":
        import torch

        logits = torch.from_numpy(z).requires_grad_()
        target = torch.from_numpy(labels)

        def step():  # classes first: the transposed view, which PyTorch reads in place
            loss = torch.nn.functional.cross_entropy(logits if axis == 1 else logits.T, target)
            return loss, torch.autograd.grad(loss, logits)

        return step
    raise ValueError(f"implementation must be one of {SOFTMAX_IMPLEMENTATIONS}; got "
                     f"{implementation!r}")


DROPOUT_CASES = {"dropout_1e7": ShapeCase("dropout forward + backward, 1e7, p = 0.5",
                                            (10_000_000,), (10_000,))}


def make_dropout_step(case, implementation, p=0.5, seed=0):
    """A zero-argument callable doing dropout forward and backward on ``case.shape``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape, np.float32)
    dy = rng.standard_normal(case.shape, np.float32)
    if implementation in ("fastdl", "fastdl-serial"):
        def step():
            with _parallel_threshold(implementation):
                _, mask = fd.dropout_forward(x, p, seed)
                return fd.dropout_backward(dy, mask, p)

        return step
    if implementation == "numpy":
        def step():  # the notes: D = np.random.rand(...) < keep_prob; A = A * D / keep_prob
            mask = rng.random(case.shape, np.float32) >= p
            return x * mask / (1 - p), dy * mask / (1 - p)

        return step
    if implementation == "torch":
        import torch

        tx, tdy = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)

        def step():
            y = torch.nn.functional.dropout(tx, p, training=True)
            return torch.autograd.grad(y, tx, tdy)

        return step
    raise ValueError(f"implementation must be one of {SOFTMAX_IMPLEMENTATIONS}; got "
                     f"{implementation!r}")


# -- one training epoch of a whole network ------------------------------------------------------


@dataclass
class EpochCase:
    """One epoch of Linear - BatchNorm - ReLU - Dropout(0.1) blocks of ``sizes``, softmax
    cross-entropy and Adam (L2 1e-4 on the weights), batch-first float32; ``data`` "digits"
    (the demo's training split, at most ``n_examples`` of it) or "synthetic" (``n_examples``
    Gaussian examples). The smoke case has ``smoke_sizes`` and ``smoke_examples``."""

    name: str
    sizes: tuple
    batch_size: int
    smoke_sizes: tuple
    smoke_examples: int
    data: str = "synthetic"
    n_examples: int = 8192

    @property
    def size(self):  # parameters
        return sum(a * b for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    def smoke(self):
        return dataclasses.replace(self, sizes=self.smoke_sizes, n_examples=self.smoke_examples)


EPOCH_CASES = {
    "epoch_digits": EpochCase("demo network 64-256-128-10 on digits, batch 64",
                              (64, 256, 128, 10), 64, (64, 32, 16, 10), 256, "digits"),
    "epoch_mlp_1024": EpochCase("784-1024-1024-10 on 8192 synthetic examples, batch 256",
                                (784, 1024, 1024, 10), 256, (784, 64, 64, 10), 512),
}

EPOCH_IMPLEMENTATIONS = ("fastdl", "numpy", "torch")


def torch_network(sizes, dropout, seed, lr, weight_decay, betas=(0.9, 0.999),
                  batchnorm_momentum=0.1):
    """The demo's network in PyTorch (Linear without bias - BatchNorm1d - ReLU - Dropout
    blocks, a Linear output) and fused Adam with L2 on the weights only: ``(model, opt)``."""
    import torch

    torch.manual_seed(seed)
    layers, width = [], sizes[0]
    for units in sizes[1:-1]:
        layers += [torch.nn.Linear(width, units, bias=False),
                   torch.nn.BatchNorm1d(units, momentum=batchnorm_momentum),
                   torch.nn.ReLU(), torch.nn.Dropout(dropout)]
        width = units
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, sizes[-1]))
    weights = [p for p in model.parameters() if p.ndim == 2]
    others = [p for p in model.parameters() if p.ndim != 2]
    opt = torch.optim.Adam([{"params": weights, "weight_decay": weight_decay},
                            {"params": others, "weight_decay": 0.0}], lr=lr, betas=betas,
                           fused=True)
    return model, opt


def _epoch_data(case, seed):
    if case.data == "digits":
        X, y = data.load_digits(seed)[0]
        return X[:case.n_examples], y[:case.n_examples]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((case.n_examples, case.sizes[0]), np.float32)
    return X, rng.integers(0, case.sizes[-1], case.n_examples)


def make_epoch_step(case, implementation, seed=0):
    """A zero-argument callable training one epoch of ``case`` with ``implementation``."""
    X, y = _epoch_data(case, seed)
    batches = list(data.minibatches(X, y, case.batch_size, seed=seed))
    n_in, hidden, n_out = case.sizes[0], case.sizes[1:-1], case.sizes[-1]
    if implementation == "fastdl":
        model = training.build_network(n_in, hidden, n_out, seed=seed, device="cpu")
        opt = optim.Adam(model.param_groups(weight_decay=1e-4), lr=1e-3)
        loss_fn, grads = nn.SoftmaxCrossEntropy(), model.grads()

        def epoch():
            with fd.cpu_threads(1):  # the cores go to BLAS (fd.cpu_threads says why)
                for xb, yb in batches:
                    loss_fn.forward(model.forward(xb), yb)
                    model.backward(loss_fn.backward(), input_grad=False)
                    opt.step(grads)

        return epoch
    if implementation == "numpy":
        net = TextbookNetwork(list(case.sizes), dropout=0.1, seed=seed, lr=1e-3)

        def epoch():
            for xb, yb in batches:
                net.train_step(xb, yb)

        return epoch
    if implementation == "torch":
        import torch

        model, opt = torch_network(case.sizes, 0.1, seed, lr=1e-3, weight_decay=1e-4)
        tensors = [(torch.from_numpy(xb), torch.from_numpy(yb)) for xb, yb in batches]

        def epoch():
            for xb, yb in tensors:
                opt.zero_grad(set_to_none=False)
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()

        return epoch
    raise ValueError(f"implementation must be one of {EPOCH_IMPLEMENTATIONS}; got "
                     f"{implementation!r}")


# -- many models at once ------------------------------------------------------------------------

POPULATION_IMPLEMENTATIONS = ("fastdl-population", "fastdl-sequential", "torch-sequential",
                              "torch-vmap-per-model-adam", "torch-vmap-fused-adam",
                              "torch-bmm-per-model-adam", "torch-bmm-fused-adam")

# The PyTorch ensembles: K models in one, trained as train_population trains a population
# (same initial weights, same batches, per-model dropout rates, batch norm in training mode,
# float32, the learning rate decayed per epoch, dev loss and accuracy in eval mode after each
# epoch). "vmap": torch.func.stack_module_state + functional_call + vmap over K copies of one
# module; "bmm": one hand-batched model, activations (K, features, N) so that every product is
# one bmm and each batch norm one F.batch_norm over (1, K * C, N). "per-model-adam": each
# model its own lr, betas and weight decay, as fastdl's population Adam (PER_MODEL_ADAM says
# how); "fused-adam": one torch.optim.Adam(fused=True) for all, with the population's median
# hyperparameters (no per-model learning rate).
TORCH_ENSEMBLES = ("vmap", "bmm")

# How "per-model-adam" runs (all with per-model lr, betas, weight decay; measured in one run,
# K = 16 and 64, the fastest is the default):
# "groups-fused": torch.optim.Adam(fused=True) with one param group per model and kind (weights
#     with L2, the rest without), its params views of the stacked tensors (one fused kernel per
#     group); "groups-foreach": the same with foreach=True; "batched": a hand-written Adam on the
#     stacked tensors, the hyperparameters as (K, 1, ...) tensors (about 12 torch ops a tensor).
PER_MODEL_ADAM = ("groups-fused", "groups-foreach", "batched")


def population_search_space(n_models, seed=0):
    """K random configurations of the demo network (lr, betas, L2, dropout), as arrays
    (batch norm's momentum stays the default 0.1, as the PyTorch ensembles')."""
    space = tune.default_space("adam")
    del space["batchnorm_momentum"]
    return tune.sample_space(space, n_models, seed=seed)


def make_population_run(implementation, n_models=16, epochs=10, seed=0, n_examples=None,
                        per_model_adam="groups-fused"):
    """A zero-argument callable training ``n_models`` demo networks (batch 64) with random
    hyperparameters for ``epochs`` on the digits, returning a :class:`fastdl.training.History`
    of (K,) arrays (the sequential implementations return None): as one fastdl population, one
    after another (fastdl or PyTorch), or as a PyTorch ensemble (see TORCH_ENSEMBLES).
    ``n_examples`` (the smoke run) keeps only that many of the training examples."""
    (X_all, y_all), dev, test = data.load_digits(seed)
    splits = ((X_all[:n_examples], y_all[:n_examples]), dev, test)
    values = population_search_space(n_models, seed)
    hyper = {k: np.asarray(v, np.float64) for k, v in values.items() if k != "dropout"}
    dropout = np.asarray(values["dropout"], np.float64)
    seeds = [seed + k for k in range(n_models)]
    if implementation == "fastdl-population":
        def run():
            model = training.build_network(population=n_models, dropout=dropout, seed=seeds,
                                           device="cpu")
            return training.train_population(model, splits, hyper, epochs, seed=seed)

        return run
    if implementation == "fastdl-sequential":
        def run():
            for k in range(n_models):
                model = training.build_network(dropout=float(dropout[k]), seed=seeds[k],
                                               device="cpu")
                training.train(model, splits, epochs, seed=seed, patience=epochs + 1,
                               hyper={name: float(v[k]) for name, v in hyper.items()})

        return run
    if implementation == "torch-sequential":
        import torch

        (X_train, y_train), _, _ = splits

        def run():
            for k in range(n_models):
                lr0 = float(hyper["lr"][k])
                model, opt = torch_network(
                    (64, *training.HIDDEN, 10), float(dropout[k]), seeds[k], lr=lr0,
                    weight_decay=float(hyper["weight_decay"][k]),
                    betas=(float(hyper["beta1"][k]), float(hyper["beta2"][k])))
                for epoch in range(epochs):
                    for group in opt.param_groups:
                        group["lr"] = lr0 / (1 + training.LR_DECAY_RATE * epoch)
                    for xb, yb in data.minibatches(X_train, y_train, 64, seed=seed * 1000 + epoch):
                        opt.zero_grad(set_to_none=False)
                        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xb)),
                                                                 torch.from_numpy(yb))
                        loss.backward()
                        opt.step()

        return run
    for kind in TORCH_ENSEMBLES:
        for adam in ("per-model-adam", "fused-adam"):
            if implementation == f"torch-{kind}-{adam}":
                def run(kind=kind, adam=adam):
                    ensemble = TorchEnsemble(kind, dropout, seeds)
                    return ensemble.train(splits, hyper, epochs, seed, per_model_adam
                                          if adam == "per-model-adam" else None)

                return run
    raise ValueError(f"implementation must be one of {POPULATION_IMPLEMENTATIONS}; got "
                     f"{implementation!r}")


def population_weights(dropout, seeds):
    """The initial parameters of fastdl's population of the demo network, as float32 arrays
    (K, ...): W0 (K, 256, 64), gamma0, beta0 (K, 256), W1 (K, 128, 256), gamma1, beta1 (K, 128),
    W2 (K, 10, 128), b2 (K, 10); the PyTorch ensembles start from them."""
    model = training.build_network(population=len(seeds), dropout=dropout, seed=seeds,
                                   device="cpu")
    first, bn0, second, bn1, last = (model.layers[i] for i in (0, 1, 4, 5, 8))
    return {name: np.array(a, np.float32) for name, a in [
        ("W0", first.W), ("gamma0", bn0.gamma), ("beta0", bn0.beta), ("W1", second.W),
        ("gamma1", bn1.gamma), ("beta1", bn1.beta), ("W2", last.W), ("b2", last.b)]}


class TorchEnsemble:
    """K demo networks (64-256-128-10: Linear without bias - BatchNorm1d - ReLU - Dropout
    blocks, a Linear output) in PyTorch as one ensemble, ``kind`` "vmap" or "bmm" (see
    TORCH_ENSEMBLES), starting from fastdl's initial weights (:func:`population_weights`).

    ``losses(x, y)`` gives the K models' mean cross-entropy on one shared batch (a (K,)
    tensor; the sum's backward gives each model the gradient of its own loss);
    ``train(...)`` trains as :func:`fastdl.training.train_population` does."""

    def __init__(self, kind, dropout, seeds):
        import torch

        self.kind, self.n_models = kind, len(seeds)
        weights = population_weights(dropout, seeds)
        rates = torch.tensor(np.asarray(dropout), dtype=torch.float32)
        self.rates = rates  # (K,)
        self.scales = torch.where(rates < 1, 1 / (1 - rates), torch.zeros_like(rates))
        self.training = True
        if kind == "bmm":
            self.params = {name: torch.nn.Parameter(torch.from_numpy(a))
                           for name, a in weights.items()}
            self.buffers = {f"{stat}{i}": torch.full((self.n_models, width), fill)
                            for i, width in enumerate(training.HIDDEN)
                            for stat, fill in (("mean", 0.0), ("var", 1.0))}
        elif kind == "vmap":
            from torch.func import stack_module_state

            models = [_torch_demo_network({name: a[k] for name, a in weights.items()})
                      for k in range(self.n_models)]
            params, self.buffers = stack_module_state(models)
            self.params = {name: torch.nn.Parameter(p.detach()) for name, p in params.items()}
            self.base = _torch_demo_network(None).to("meta")
        else:
            raise ValueError(f"kind must be one of {TORCH_ENSEMBLES}; got {kind!r}")
        # the params L2 applies to (the Linear weights), as fastdl's param_groups
        self.decayed = [p for p in self.params.values() if p.ndim == 3]
        self.others = [p for p in self.params.values() if p.ndim != 3]

    def logits(self, x):
        """(K, N, 10) logits of x (N, 64) ("vmap"), or (K, 10, N) ("bmm")."""
        import torch

        if self.kind == "vmap":
            from torch.func import functional_call, vmap

            def one(params, buffers, rate, scale):
                return functional_call(self.base, (params, buffers), (x, rate, scale,
                                                                      self.training))

            return vmap(one, randomness="different")(self.params, self.buffers, self.rates,
                                                     self.scales)
        F = torch.nn.functional
        P, B, K = self.params, self.buffers, self.n_models
        h = x.T
        for i in range(len(training.HIDDEN)):
            z = torch.matmul(P[f"W{i}"], h)  # (K, C, N): x broadcast to the K models at i = 0
            C, N = z.shape[1], z.shape[2]
            # per (model, channel) statistics over the N examples: channels of (1, K * C, N)
            h = F.batch_norm(z.reshape(1, K * C, N), B[f"mean{i}"].view(-1),
                             B[f"var{i}"].view(-1), P[f"gamma{i}"].view(-1),
                             P[f"beta{i}"].view(-1), self.training, 0.1, 1e-5).view(K, C, N)
            h = F.relu(h)
            if self.training:
                h = h * _torch_dropout_mask(h, self.rates[:, None, None],
                                            self.scales[:, None, None])
        return torch.baddbmm(P["b2"].unsqueeze(-1), P["W2"], h)

    def losses(self, x, y):
        """The K models' mean cross-entropy on (x, y): a (K,) tensor."""
        import torch

        logits = self.logits(x)
        target = y.expand(self.n_models, len(y))
        if self.kind == "vmap":
            logits = logits.transpose(1, 2)  # (K, 10, N): classes at axis 1, a view
        return torch.nn.functional.cross_entropy(logits, target, reduction="none").mean(1)

    def evaluate(self, X, y):
        """(loss, accuracy), (K,) float64 arrays, in eval mode on X (m, 64), y (m,)."""
        import torch

        self.training = False
        try:
            with torch.no_grad():
                x, target = torch.from_numpy(X), torch.from_numpy(y)
                losses = self.losses(x, target)
                logits = self.logits(x)
        finally:
            self.training = True
        classes = 2 if self.kind == "vmap" else 1
        correct = logits.argmax(classes).numpy() == y
        return losses.numpy().astype(np.float64), correct.mean(axis=-1)

    def optimizer(self, hyper, per_model_adam):
        """Adam over the ensemble: ``per_model_adam`` one of PER_MODEL_ADAM, or None for one
        fused Adam with the median hyperparameters. Returns (step, set_lr): ``set_lr(lr)``
        takes the (K,) learning rates of an epoch."""
        import torch

        if per_model_adam is None:
            median = {k: float(np.median(v)) for k, v in hyper.items()}
            opt = torch.optim.Adam([{"params": self.decayed,
                                     "weight_decay": median["weight_decay"]},
                                    {"params": self.others, "weight_decay": 0.0}],
                                   lr=median["lr"], betas=(median["beta1"], median["beta2"]),
                                   fused=True)

            def set_lr(lr):
                for group in opt.param_groups:
                    group["lr"] = float(np.median(lr))

            return opt.step, set_lr
        if per_model_adam == "batched":
            return _BatchedTorchAdam(self.decayed, self.others, hyper).step_and_set_lr()
        if per_model_adam not in PER_MODEL_ADAM:
            raise ValueError(f"per_model_adam must be one of {PER_MODEL_ADAM}; got "
                             f"{per_model_adam!r}")
        # model k's params are views of the stacked tensors, their grads views of the stacked
        # grads (which backward accumulates into in place: zero_grad(set_to_none=False))
        for p in self.params.values():
            p.grad = torch.zeros_like(p)
        groups = []
        for k in range(self.n_models):
            for params, decay in ((self.decayed, hyper["weight_decay"][k]), (self.others, 0.0)):
                views = []
                for p in params:
                    view = p.detach()[k]
                    view.grad = p.grad[k]
                    views.append(view)
                groups.append({"params": views, "lr": float(hyper["lr"][k]),
                               "betas": (float(hyper["beta1"][k]), float(hyper["beta2"][k])),
                               "weight_decay": float(decay)})
        fused = per_model_adam == "groups-fused"
        opt = torch.optim.Adam(groups, fused=fused, foreach=not fused)

        def set_lr(lr):
            for g, group in enumerate(opt.param_groups):
                group["lr"] = float(lr[g // 2])

        return opt.step, set_lr

    def train(self, splits, hyper, epochs, seed, per_model_adam):
        """Train as :func:`fastdl.training.train_population` (no non-finite skipping: PyTorch's
        Adam has none); returns a History of (K,) arrays."""
        import torch

        (X_train, y_train), (X_dev, y_dev), _ = splits
        step, set_lr = self.optimizer(hyper, per_model_adam)
        params = list(self.params.values())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        history = training.History()
        for epoch in range(epochs):
            lr = hyper["lr"] / (1 + training.LR_DECAY_RATE * epoch)
            set_lr(lr)
            total, seen = np.zeros(self.n_models), 0
            for xb, yb in data.minibatches(X_train, y_train, 64, seed=seed * 1000 + epoch):
                for g in grads:
                    g.zero_()
                losses = self.losses(torch.from_numpy(xb), torch.from_numpy(yb))
                losses.sum().backward()
                step()
                total += losses.detach().numpy() * len(yb)
                seen += len(yb)
            # backward accumulated into the same grad tensors (the per-model views rely on it)
            assert all(p.grad is g for p, g in zip(params, grads))
            dev_loss, dev_accuracy = self.evaluate(X_dev, y_dev)
            history.record(total / seen, dev_loss, dev_accuracy, lr, 0.0)
        return history


def _torch_dropout_mask(h, rates, scales):
    """Inverted dropout's scaled mask for ``h`` with per-model ``rates``: (u >= p) / (1 - p)."""
    import torch

    return (torch.rand_like(h) >= rates) * scales


@functools.cache
def _torch_demo_network_class():
    """The torch module of one demo network whose forward takes ``(x, rate, scale,
    training)``: a per-model dropout rate, which vmap passes in (one class, defined once:
    stack_module_state takes models of one class)."""
    import torch

    class DemoNetwork(torch.nn.Module):
        def __init__(self):
            super().__init__()
            widths = (64, *training.HIDDEN)
            self.linears = torch.nn.ModuleList(torch.nn.Linear(a, b, bias=False)
                                               for a, b in zip(widths[:-1], widths[1:]))
            self.norms = torch.nn.ModuleList(torch.nn.BatchNorm1d(b) for b in widths[1:])
            self.out = torch.nn.Linear(widths[-1], 10)

        def forward(self, x, rate, scale, training):
            F = torch.nn.functional
            for linear, norm in zip(self.linears, self.norms):
                h = F.batch_norm(linear(x), norm.running_mean, norm.running_var, norm.weight,
                                 norm.bias, training, 0.1, 1e-5)
                x = F.relu(h)
                if training:
                    x = x * _torch_dropout_mask(x, rate, scale)
            return self.out(x)

    return DemoNetwork


def _torch_demo_network(weights):
    """One demo network (:func:`_torch_demo_network_class`) with ``weights`` (W0, gamma0, ...
    of one model), or with torch's initialization for None."""
    import torch

    model = _torch_demo_network_class()()
    if weights is not None:
        with torch.no_grad():
            for i, (linear, norm) in enumerate(zip(model.linears, model.norms)):
                linear.weight.copy_(torch.from_numpy(weights[f"W{i}"]))
                norm.weight.copy_(torch.from_numpy(weights[f"gamma{i}"]))
                norm.bias.copy_(torch.from_numpy(weights[f"beta{i}"]))
            model.out.weight.copy_(torch.from_numpy(weights["W2"]))
            model.out.bias.copy_(torch.from_numpy(weights["b2"]))
    return model


class _BatchedTorchAdam:
    """A hand-written Adam over stacked (K, ...) tensors with per-model hyperparameters as
    (K, 1, ...) tensors, in PyTorch's order (L2 added to g on the decayed params)::

        g += wd * p ;  m = lerp(m, g, 1 - b1) ;  v = b2 * v + (1 - b2) * g * g
        p -= (lr / (1 - b1**t)) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)
    """

    def __init__(self, decayed, others, hyper):
        import torch

        self.params = [(p, True) for p in decayed] + [(p, False) for p in others]
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p, _ in self.params]
        self.hyper = {k: torch.tensor(v, dtype=torch.float32) for k, v in hyper.items()}
        self.lr = self.hyper["lr"].clone()
        self.t = 0

    def step_and_set_lr(self):
        """(step, set_lr), as :meth:`TorchEnsemble.optimizer` returns them."""
        import torch

        def set_lr(lr):
            self.lr = torch.tensor(lr, dtype=torch.float32)

        return self.step, set_lr

    def step(self):
        import torch

        self.t += 1
        H = self.hyper
        b1, b2 = H["beta1"], H["beta2"]
        step_size = self.lr / (1 - b1 ** self.t)
        root_bc2 = torch.sqrt(1 - b2 ** self.t)
        with torch.no_grad():
            for (p, decayed), (m, v) in zip(self.params, self.state):
                shape = (-1,) + (1,) * (p.ndim - 1)
                g = p.grad
                if decayed:
                    g = torch.addcmul(g, H["weight_decay"].view(shape), p)
                m.lerp_(g, (1 - b1).view(shape))
                v.mul_(b2.view(shape)).addcmul_(g, g * (1 - b2).view(shape))
                denom = (v.sqrt() / root_bc2.view(shape)).add_(1e-8)
                p.sub_(m / denom * step_size.view(shape))


# --- fastdl.torch against torch, through autograd and optimizer.step() ----------------------
# Implementations: "fastdl.torch" (fastdl's module / optimizer, or the model after
# fastdl.torch.patch) and "torch" (torch's own; for Adam, fused=True).

TORCH_IMPLEMENTATIONS = ("fastdl.torch", "torch")


@dataclass
class TorchCase:
    """One benchmark of the PyTorch adapter: ``kind`` (see :func:`make_torch_step`),
    ``shape`` (an input shape, or the sizes of the optimizer's tensors), ``smoke_shape``."""

    name: str
    kind: str
    shape: tuple
    smoke_shape: tuple
    bytes_per_element: int = 0  # read + written per element, for GB/s (0: not reported)

    @property
    def size(self):
        return sum(self.shape) if self.kind == "adam" else math.prod(self.shape)

    def smoke(self):
        return dataclasses.replace(self, shape=self.smoke_shape)


def _mixed_sizes(n, low, high, seed=0):
    return tuple(int(s) for s in np.random.default_rng(seed).integers(low, high, n))


TORCH_CASES = {
    "torch_batchnorm1d": TorchCase("BatchNorm1d(1024) on (8192, 1024), fwd + bwd", "batchnorm1d",
                                   (8192, 1024), (64, 16), 20),
    "torch_batchnorm2d": TorchCase("BatchNorm2d(64) on (64, 64, 56, 56), fwd + bwd",
                                   "batchnorm2d", (64, 64, 56, 56), (4, 8, 5, 5), 20),
    "torch_cross_entropy": TorchCase("cross_entropy on (4096, 1000), fwd + bwd",
                                     "cross_entropy", (4096, 1000), (16, 10), 8),
    "torch_adam_1e7": TorchCase("Adam step, one tensor of 1e7", "adam", (10_000_000,),
                                (1000,), 28),
    "torch_adam_200": TorchCase("Adam step, 200 tensors of 1e3-1e4", "adam",
                                _mixed_sizes(200, 1000, 10_000), _mixed_sizes(5, 10, 100), 28),
    "torch_adam_1000": TorchCase("Adam step, one tensor of 1000", "adam", (1000,), (10,), 28),
    "torch_mlp": TorchCase("MLP 784-1024-1024-10 step (BN1d, Dropout, CE, AdamW), batch 256",
                           "mlp", (256, 784), (8, 784)),
    "torch_cnn": TorchCase("CNN step, channels-last (conv-BN2d-ReLU x2, CE, AdamW), "
                           "batch 64 of 3x32x32", "cnn", (64, 3, 32, 32), (2, 3, 32, 32)),
}


def _torch_mlp():
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(784, 1024, bias=False), torch.nn.BatchNorm1d(1024), torch.nn.ReLU(),
        torch.nn.Dropout(0.2), torch.nn.Linear(1024, 1024, bias=False),
        torch.nn.BatchNorm1d(1024), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 10))


def _torch_cnn():
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1, stride=2, bias=False),
        torch.nn.BatchNorm2d(64), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(64, 10))


def make_torch_step(case, implementation, seed=0):
    """A zero-argument callable doing one ``case`` step with ``implementation``: a module's
    forward and backward in training mode (the input's grad included), or one optimizer step
    (grads set once), or one whole training step of a model."""
    import torch

    import fastdl.torch as fdt

    torch.manual_seed(seed)
    ours = implementation == "fastdl.torch"
    if case.kind in ("batchnorm1d", "batchnorm2d"):
        channels = case.shape[1]
        module = (getattr(fdt if ours else torch.nn, "BatchNorm1d" if case.kind ==
                          "batchnorm1d" else "BatchNorm2d"))(channels)
        x = torch.randn(case.shape, requires_grad=True)
        dy = torch.randn(case.shape)

        def step():
            module(x).backward(dy)
        return step
    if case.kind == "cross_entropy":
        logits = torch.randn(case.shape, requires_grad=True)
        target = torch.randint(0, case.shape[1], (case.shape[0],))
        loss_fn = fdt.cross_entropy if ours else torch.nn.functional.cross_entropy

        def step():
            loss_fn(logits, target).backward()
        return step
    if case.kind == "adam":
        params = [torch.nn.Parameter(torch.randn(n)) for n in case.shape]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = fdt.Adam(params, lr=1e-3) if ours else torch.optim.Adam(params, lr=1e-3,
                                                                         fused=True)
        return opt.step
    model = _torch_mlp() if case.kind == "mlp" else _torch_cnn()
    x = torch.randn(case.shape)
    if case.kind == "cnn":
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (case.shape[0],))
    loss_fn = fdt.CrossEntropyLoss() if ours else torch.nn.CrossEntropyLoss()
    if ours:
        model = fdt.patch(model)
    opt = (fdt.AdamW if ours else torch.optim.AdamW)(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        loss_fn(model(x), target).backward()
        opt.step()
    return step


# -- Optuna studies -------------------------------------------------------------------------------
# One study of ``n_trials`` trials of the demo network (``epochs`` each, the same space and data,
# TPE): fastdl's populations (fastdl.tune.optimize, K trials at once, with or without refilling
# pruned slots), or Optuna's ordinary use, ``study.optimize`` with one model per trial, in
# fastdl or in PyTorch.

STUDY_IMPLEMENTATIONS = ("fastdl-population", "optuna-fastdl-per-trial",
                         "optuna-torch-per-trial")


@dataclass
class StudyCase:
    name: str
    n_trials: int
    epochs: int
    population: int
    pruner: str = "none"  # or "median"
    refill: bool = True
    n_examples: int = None  # None: all 1258 training examples

    def smoke(self):
        return dataclasses.replace(self, n_trials=4, epochs=1, population=2, n_examples=128)


STUDY_CASES = {
    "study_64": StudyCase("64 trials of 10 epochs", 64, 10, 16),
    "study_64_median_refill": StudyCase("64 trials, median pruner, pruned slots refilled", 64,
                                        10, 16, "median"),
    "study_64_median_rounds": StudyCase("64 trials, median pruner, rounds of 16 (no refill)",
                                        64, 10, 16, "median", refill=False),
}


def _study(case, seed):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=case.population)
              if case.pruner == "median" else optuna.pruners.NopPruner())
    return optuna.create_study(sampler=optuna.samplers.TPESampler(constant_liar=True, seed=seed),
                               pruner=pruner)


def make_study_run(case, implementation, seed=0):
    """A zero-argument callable running one study of ``case`` with ``implementation``;
    returns the study."""
    (X, y), dev, test = data.load_digits(seed)
    splits = ((X[:case.n_examples], y[:case.n_examples]), dev, test)
    space = tune.default_space("adam")
    distributions = tune.optuna_distributions(space)
    if implementation == "fastdl-population":
        def run():
            study = _study(case, seed)
            return tune.optimize(study, space, case.n_trials, population=case.population,
                                 epochs=case.epochs, splits=splits, seed=seed,
                                 refill=case.refill)

        return run

    def suggest(trial):  # Optuna's ordinary use: the objective suggests each value
        params = {name: trial.suggest_float(name, d.low, d.high, log=d.log)
                  for name, d in distributions.items()}
        return tune.hyper_from_params(space, params)

    if implementation == "optuna-fastdl-per-trial":
        def objective(trial):
            hyper = suggest(trial)
            model = training.build_network(dropout=hyper.pop("dropout"),
                                           batchnorm_momentum=hyper.pop("batchnorm_momentum"),
                                           seed=trial.number, device="cpu")
            history = training.train(model, splits, case.epochs, hyper=hyper, seed=seed,
                                     patience=case.epochs + 1)
            return history.dev_loss[-1]

    elif implementation == "optuna-torch-per-trial":
        import torch

        (X_train, y_train), (X_dev, y_dev), _ = splits
        X_dev, y_dev = torch.from_numpy(X_dev), torch.from_numpy(y_dev)

        def objective(trial):
            hyper = suggest(trial)
            lr0 = hyper["lr"]
            model, opt = torch_network((64, *training.HIDDEN, 10), hyper["dropout"],
                                       trial.number, lr=lr0, weight_decay=hyper["weight_decay"],
                                       betas=(hyper["beta1"], hyper["beta2"]),
                                       batchnorm_momentum=hyper["batchnorm_momentum"])
            for epoch in range(case.epochs):
                model.train()
                for group in opt.param_groups:
                    group["lr"] = lr0 / (1 + training.LR_DECAY_RATE * epoch)
                for xb, yb in data.minibatches(X_train, y_train, 64, seed=seed * 1000 + epoch):
                    opt.zero_grad(set_to_none=False)
                    torch.nn.functional.cross_entropy(model(torch.from_numpy(xb)),
                                                      torch.from_numpy(yb)).backward()
                    opt.step()
                model.eval()
                with torch.no_grad():
                    dev_loss = float(torch.nn.functional.cross_entropy(model(X_dev), y_dev))
            return dev_loss
    else:
        raise ValueError(f"implementation must be one of {STUDY_IMPLEMENTATIONS}; got "
                         f"{implementation!r}")

    def run():
        study = _study(case, seed)
        study.optimize(objective, n_trials=case.n_trials)
        return study

    return run


def tune_command(case, workers, models, out, seed=0):
    """``python -m fastdl tune`` running ``case``'s study with ``workers`` x ``models`` (an
    embedded journal file under ``out``, created fresh by the caller)."""
    import sys

    return [sys.executable, "-m", "fastdl", "tune", "--device", "cpu", "--trials",
            str(case.n_trials), "--epochs", str(case.epochs), "--models", str(models),
            "--workers", str(workers), "--seed", str(seed), "--out", str(out)]
