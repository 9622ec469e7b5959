"""Benchmark cases shared by ``python -m fastdl bench`` and the pytest-benchmark suite.

Each case builds a ``step()`` callable per implementation: ``fastdl``, ``numpy`` (the
textbook version, one array expression per formula line) and ``torch`` (PyTorch's
``fused=True`` optimizer, when PyTorch is installed). All float32, default options on both sides.
"""

import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

IMPLEMENTATIONS = ("fastdl", "numpy", "torch")


@dataclass
class OptimCase:
    """One optimizer workload. ``bytes_per_element`` counts the memory traffic of a fused step."""

    name: str
    shapes: list
    optimizer: str = "Adam"
    options: dict = field(default_factory=dict)
    bytes_per_element: int = 28  # Adam: p, m, v read and written, g read (float32)

    @property
    def size(self):
        return sum(math.prod(s) for s in self.shapes)


def _separate_shapes(n, low, high, seed=0):
    return [(int(s),) for s in np.random.default_rng(seed).integers(low, high + 1, n)]


OPTIM_CASES = {
    "adam_1e7": OptimCase("Adam, one tensor of 1e7", [(10_000_000,)]),
    "adam_200_tensors": OptimCase("Adam, 200 tensors of 1e3-1e4", _separate_shapes(200, 1000,
                                                                                   10_000)),
    "adam_1000": OptimCase("Adam, one tensor of 1000 (call overhead)", [(1000,)]),
    "adamw_clip_1e7": OptimCase("AdamW + max_grad_norm, 1e7 in 3 tensors",
                                [(4_000_000,), (3_000_000,), (3_000_000,)], "AdamW",
                                dict(max_grad_norm=1.0), bytes_per_element=32),
}


def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class TextbookAdam:
    """Adam / AdamW as the course notes write it in NumPy: every line a temporary array."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled=False, max_grad_norm=None):
        self.params, self.lr, self.eps = params, lr, eps
        self.beta1, self.beta2 = betas
        self.weight_decay, self.decoupled, self.max_grad_norm = weight_decay, decoupled, \
            max_grad_norm
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        if self.max_grad_norm is not None:
            norm = np.sqrt(sum(np.sum(g * g) for g in grads))
            clip = min(1.0, self.max_grad_norm / (norm + 1e-6))
            grads = [g * clip for g in grads]
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if self.decoupled:
                p *= 1 - self.lr * self.weight_decay
            m[...] = b1 * m + (1 - b1) * g
            v[...] = b2 * v + (1 - b2) * g ** 2
            m_hat = m / (1 - b1 ** self.t)
            v_hat = v / (1 - b2 ** self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def make_optim_step(case, implementation, seed=0):
    """A zero-argument callable doing one optimizer step of ``case`` with ``implementation``."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s, np.float32) for s in case.shapes]
    grads = [rng.standard_normal(s, np.float32) * np.float32(1e-2) for s in case.shapes]
    if implementation == "fastdl":
        from . import optim

        opt = getattr(optim, case.optimizer)(params, **case.options)
        return lambda: opt.step(grads)
    if implementation == "numpy":
        decoupled = case.optimizer == "AdamW"
        opt = TextbookAdam(params, weight_decay=0.01 if decoupled else 0.0,
                           decoupled=decoupled, **case.options)
        return lambda: opt.step(grads)
    if implementation == "torch":
        import torch

        tensors = [torch.from_numpy(p) for p in params]
        for t, g in zip(tensors, grads):
            t.requires_grad_(True)
            t.grad = torch.from_numpy(g)
        opt = getattr(torch.optim, case.optimizer)(tensors, fused=True)
        max_norm = case.options.get("max_grad_norm")
        if max_norm is None:
            return opt.step

        def step():
            torch.nn.utils.clip_grad_norm_(tensors, max_norm)
            opt.step()

        return step
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")


def triad_bandwidth(n=10_000_000, repeats=5):
    """The machine's memory bandwidth in GB/s, from a parallel STREAM triad a = b + s*c
    (12 bytes per float32 element), measured now so it drifts with the benchmarks."""
    from fastdl.kernels.measure import triad

    a, b, c = (np.ones(n, np.float32) for _ in range(3))
    triad(a, b, c, np.float32(3.0))
    best = min(_seconds(lambda: triad(a, b, c, np.float32(3.0)), 1) for _ in range(repeats))
    return 12 * n / best / 1e9


def _seconds(fn, number):
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def time_steps(steps, budget=0.2, rounds=7):
    """Best mean time of one call for each of ``steps`` (name -> callable).

    The implementations take turns, round by round, so that a slow spell of a shared machine
    hits all of them alike; each round times a batch of calls worth ~``budget / rounds`` s.
    """
    numbers = {}
    for name, step in steps.items():
        step()  # compile / warm up
        once = _seconds(step, 1)
        numbers[name] = max(1, int(budget / rounds / max(once, 1e-7)))
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = min(best[name], _seconds(step, numbers[name]))
    return best


def machine_description():
    import numba

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith(
                "model name"))
    except (OSError, StopIteration):
        pass
    versions = f"numpy {np.__version__}, numba {numba.__version__}"
    if torch_available():
        import torch

        versions += f", torch {torch.__version__}"
    return f"{cpu}, {numba.get_num_threads()} threads; Python {platform.python_version()}, " \
           f"{versions}"


def run(quick=False):
    """Print a table: time per step of each implementation and fastdl's speed-up over each."""
    implementations = [i for i in IMPLEMENTATIONS if i != "torch" or torch_available()]
    print(f"fastdl optimizer benchmark — {machine_description()}")
    print(f"device: cpu; float32; implementations alternate round by round, best of 7 rounds;"
          f" {time.strftime('%Y-%m-%d')}")
    bandwidth = triad_bandwidth()
    print(f"memory bandwidth (STREAM triad, 2 threads, now): {bandwidth:.1f} GB/s\n")
    header = f"{'case':44s}" + "".join(f"{i + ' (ms)':>14s}" for i in implementations)
    header += "".join(f"{'vs ' + i:>10s}" for i in implementations[1:]) + f"{'fastdl GB/s':>13s}"
    print(header)
    print("-" * len(header))
    for case in OPTIM_CASES.values():
        steps = {i: make_optim_step(case, i) for i in implementations}
        times = time_steps(steps, 0.3 if quick else 1.5)
        row = f"{case.name:44s}" + "".join(f"{times[i] * 1e3:14.3f}" for i in implementations)
        row += "".join(f"{times[i] / times['fastdl']:9.1f}x" for i in implementations[1:])
        row += f"{case.bytes_per_element * case.size / times['fastdl'] / 1e9:13.1f}"
        print(row)
    if "torch" not in implementations:
        print("\n(PyTorch is not installed: `pip install -e .[compare]` adds it as a baseline)")


# -- batch normalization ------------------------------------------------------------------------


@dataclass
class BatchNormCase:
    """Forward + backward in training mode; ``out`` reuses the y and dx buffers."""

    name: str
    shape: tuple
    channel_axis: int = 1
    out: bool = False

    @property
    def size(self):
        return math.prod(self.shape)


BATCHNORM_CASES = {
    "bn_8192x1024": BatchNormCase("(8192, 1024), fresh outputs", (8192, 1024)),
    "bn_8192x1024_out": BatchNormCase("(8192, 1024), out= buffers", (8192, 1024), out=True),
    "bn_nchw": BatchNormCase("(64, 64, 56, 56), fresh outputs", (64, 64, 56, 56)),
    "bn_features_examples": BatchNormCase("(1024, 8192) features x examples, axis 0",
                                          (1024, 8192), 0),
    "bn_channels_last": BatchNormCase("(64, 56, 56, 64) channels-last, axis -1",
                                      (64, 56, 56, 64), -1),
    "bn_1e6x3": BatchNormCase("(1000000, 3), fresh outputs", (1_000_000, 3)),
    "bn_1e6x3_out": BatchNormCase("(1000000, 3), out= buffers", (1_000_000, 3), out=True),
}


def textbook_batch_norm(x, gamma, beta, dy, axis, eps=1e-5):
    """The notes' batch norm forward and backward in NumPy, one temporary per line."""
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


class TextbookNetwork:
    """The notes' L-layer network in NumPy, one array expression per formula line: blocks of
    Linear (no bias) - batch norm - ReLU - inverted dropout, a Linear output, softmax
    cross-entropy, Adam with L2 on the weights. Batch-first; float32."""

    def __init__(self, sizes, dropout=0.1, seed=0, lr=1e-3, weight_decay=1e-4, momentum=0.1):
        rng = np.random.default_rng(seed)
        self.rng, self.p, self.weight_decay, self.momentum = rng, dropout, weight_decay, momentum
        self.W = [(rng.standard_normal((n_out, n_in)) * np.sqrt(2 / n_in)).astype(np.float32)
                  for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        hidden = sizes[1:-1]
        self.gamma = [np.ones(n, np.float32) for n in hidden]
        self.beta = [np.zeros(n, np.float32) for n in hidden]
        self.running = [(np.zeros(n, np.float32), np.ones(n, np.float32)) for n in hidden]
        self.b = np.zeros(sizes[-1], np.float32)
        self.params = self.W + self.gamma + self.beta + [self.b]
        self.opt = TextbookAdam(self.params, lr=lr)

    @property
    def lr(self):
        return self.opt.lr

    @lr.setter
    def lr(self, value):
        self.opt.lr = value

    def forward(self, X, training=True):
        A, caches = X, []
        for l, (gamma, beta) in enumerate(zip(self.gamma, self.beta)):
            Z = A @ self.W[l].T
            if training:
                mu, var = Z.mean(axis=0), Z.var(axis=0)
                running_mean, running_var = self.running[l]
                m = Z.shape[0]
                running_mean[...] = (1 - self.momentum) * running_mean + self.momentum * mu
                running_var[...] = ((1 - self.momentum) * running_var
                                    + self.momentum * var * m / (m - 1))
            else:
                mu, var = self.running[l]
            inv_std = 1 / np.sqrt(var + 1e-5)
            xhat = (Z - mu) * inv_std
            R = np.maximum(gamma * xhat + beta, 0)
            mask = self.rng.random(R.shape, np.float32) >= self.p if training else None
            caches.append((A, xhat, inv_std, R, mask))
            A = R * mask / (1 - self.p) if training else R
        return A @ self.W[-1].T + self.b, (A, caches)

    def train_step(self, X, y):
        logits, (A, caches) = self.forward(X)
        loss, dlogits = textbook_cross_entropy(logits, y, 1)
        dW = [None] * len(self.W)
        dW[-1], db = dlogits.T @ A, dlogits.sum(axis=0)
        dA = dlogits @ self.W[-1]
        dgamma, dbeta = [None] * len(self.gamma), [None] * len(self.gamma)
        for l in reversed(range(len(self.gamma))):
            A_prev, xhat, inv_std, R, mask = caches[l]
            dR = dA * mask / (1 - self.p)
            dY = dR * (R > 0)
            m = dY.shape[0]
            dbeta[l], dgamma[l] = dY.sum(axis=0), (dY * xhat).sum(axis=0)
            dZ = self.gamma[l] * inv_std * (dY - dbeta[l] / m - xhat * dgamma[l] / m)
            dW[l] = dZ.T @ A_prev + self.weight_decay * self.W[l]
            dA = dZ @ self.W[l]
        dW[-1] = dW[-1] + self.weight_decay * self.W[-1]
        self.opt.step(dW + dgamma + dbeta + [db])
        return loss

    def accuracy(self, X, y):
        logits, _ = self.forward(X, training=False)
        return float(np.mean(np.argmax(logits, axis=1) == y))


BATCHNORM_IMPLEMENTATIONS = ("fastdl", "fastdl-serial", "numpy", "torch")


def make_batchnorm_step(case, implementation, seed=0):
    """A zero-argument callable doing forward + backward (training) of ``case``, or None when
    ``implementation`` cannot run it (PyTorch takes channels at axis 1 only). "fastdl-serial"
    forces the serial kernels, to measure what the parallel ones gain."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape, np.float32)
    dy = rng.standard_normal(case.shape, np.float32)
    c = case.shape[case.channel_axis]
    gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
    running_mean, running_var = np.zeros(c, np.float32), np.ones(c, np.float32)
    if implementation in ("fastdl", "fastdl-serial"):
        from fastdl.kernels import config

        from .batchnorm import batch_norm_backward, batch_norm_forward

        y_out = np.empty_like(x) if case.out else None
        dx_out = np.empty_like(x) if case.out else None
        threshold = config.PARALLEL_MIN_SIZE if implementation == "fastdl" else math.inf

        def step():
            default, config.PARALLEL_MIN_SIZE = config.PARALLEL_MIN_SIZE, threshold
            try:
                _, cache = batch_norm_forward(x, gamma, beta, running_mean, running_var,
                                              channel_axis=case.channel_axis, out=y_out)
                return batch_norm_backward(dy, cache, out=dx_out)
            finally:
                config.PARALLEL_MIN_SIZE = default

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


@dataclass
class SoftmaxCase:
    """Loss + gradient of the mean cross-entropy with index targets; ``out`` writes dlogits
    into a reused buffer."""

    name: str
    shape: tuple
    axis: int = -1
    out: bool = False

    @property
    def size(self):
        return math.prod(self.shape)


SOFTMAX_CASES = {
    "xent_4096x1000": SoftmaxCase("(4096, 1000), fresh outputs", (4096, 1000)),
    "xent_4096x1000_out": SoftmaxCase("(4096, 1000), out= buffer", (4096, 1000), out=True),
    "xent_256x10": SoftmaxCase("(256, 10), fresh outputs", (256, 10)),
    "xent_64x70000": SoftmaxCase("(64, 70000), fresh outputs", (64, 70_000)),
    "xent_100000x10": SoftmaxCase("(100000, 10), fresh outputs", (100_000, 10)),
    "xent_classes_first": SoftmaxCase("(1000, 4096) classes x examples, axis 0",
                                      (1000, 4096), axis=0),
}

SOFTMAX_IMPLEMENTATIONS = ("fastdl", "fastdl-serial", "numpy", "torch")


def textbook_cross_entropy(z, labels, axis):
    """The notes' softmax regression in NumPy: probabilities, mean loss, gradient p - y."""
    shifted = z - z.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    total = e.sum(axis=axis, keepdims=True)
    index = np.expand_dims(labels, axis)
    m = labels.size
    loss = -(np.take_along_axis(shifted, index, axis) - np.log(total)).sum() / m
    grad = e / total
    np.put_along_axis(grad, index, np.take_along_axis(grad, index, axis) - 1, axis)
    grad /= m
    return loss, grad


def make_softmax_step(case, implementation, seed=0):
    """A zero-argument callable computing the loss and dlogits of ``case``."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(case.shape, np.float32) * np.float32(3)
    axis = case.axis % len(case.shape)
    labels = rng.integers(0, case.shape[axis], case.shape[1 - axis])
    if implementation in ("fastdl", "fastdl-serial"):
        from .softmax import softmax_cross_entropy

        out = np.empty_like(z) if case.out else None

        def step():
            with _parallel_threshold(implementation):
                return softmax_cross_entropy(z, labels, axis=case.axis, out=out)

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


DROPOUT_CASES = {"dropout_1e7": SoftmaxCase("dropout forward + backward, 1e7, p = 0.5",
                                            (10_000_000,))}


def make_dropout_step(case, implementation, p=0.5, seed=0):
    """A zero-argument callable doing dropout forward and backward on ``case.shape``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape, np.float32)
    dy = rng.standard_normal(case.shape, np.float32)
    if implementation in ("fastdl", "fastdl-serial"):
        from .dropout import dropout_backward, dropout_forward

        def step():
            with _parallel_threshold(implementation):
                _, mask = dropout_forward(x, p, seed)
                return dropout_backward(dy, mask, p)

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
    """One epoch of Linear - BatchNorm - ReLU - Dropout(0.1) blocks, softmax cross-entropy and
    Adam (L2 1e-4 on the weights), batch-first float32; ``data`` "digits" (the demo's
    training split) or "synthetic" (``n_examples`` Gaussian examples)."""

    name: str
    sizes: tuple
    batch_size: int
    data: str = "synthetic"
    n_examples: int = 8192

    @property
    def size(self):  # parameters
        return sum(a * b for a, b in zip(self.sizes[:-1], self.sizes[1:]))


EPOCH_CASES = {
    "epoch_digits": EpochCase("demo network 64-256-128-10 on digits, batch 64",
                              (64, 256, 128, 10), 64, "digits"),
    "epoch_mlp_1024": EpochCase("784-1024-1024-10 on 8192 synthetic examples, batch 256",
                                (784, 1024, 1024, 10), 256),
}

EPOCH_IMPLEMENTATIONS = ("fastdl", "numpy", "torch")


def _torch_network(sizes, dropout, seed, lr, weight_decay, betas=(0.9, 0.999)):
    """The demo's network in PyTorch (Linear without bias - BatchNorm1d - ReLU - Dropout
    blocks, a Linear output) and fused Adam with L2 on the weights only."""
    import torch

    torch.manual_seed(seed)
    layers, width = [], sizes[0]
    for units in sizes[1:-1]:
        layers += [torch.nn.Linear(width, units, bias=False), torch.nn.BatchNorm1d(units),
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
        from .demo import load_digits

        return load_digits(seed)[0]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((case.n_examples, case.sizes[0]), np.float32)
    return X, rng.integers(0, case.sizes[-1], case.n_examples)


def make_epoch_step(case, implementation, seed=0):
    """A zero-argument callable training one epoch of ``case`` with ``implementation``."""
    from . import data

    X, y = _epoch_data(case, seed)
    batches = [(xb, yb) for xb, yb in data.minibatches(X, y, case.batch_size, seed=seed)]
    n_in, hidden, n_out = case.sizes[0], case.sizes[1:-1], case.sizes[-1]
    if implementation == "fastdl":
        from . import nn, optim
        from .demo import build_network
        from .device import cpu_threads

        model = build_network(n_in, hidden, n_out, seed=seed, device="cpu")
        opt = optim.Adam(model.param_groups(weight_decay=1e-4), lr=1e-3)
        loss_fn, grads = nn.SoftmaxCrossEntropy(), model.grads()

        def epoch():
            with cpu_threads(1):  # the cores go to BLAS (fd.cpu_threads says why)
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

        model, opt = _torch_network(case.sizes, 0.1, seed, lr=1e-3, weight_decay=1e-4)
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

POPULATION_IMPLEMENTATIONS = ("fastdl-population", "fastdl-sequential", "torch-sequential")


def population_search_space(n_models, seed=0):
    """K random configurations of the demo network (lr, betas, L2, dropout), as arrays."""
    from .tune import default_space, sample_space

    return sample_space(default_space("adam"), n_models, seed=seed)


def make_population_run(implementation, n_models=16, epochs=10, seed=0):
    """A zero-argument callable training ``n_models`` demo networks (batch 64) with random
    hyperparameters for ``epochs`` on the digits: as one population, or one after another."""
    from .demo import build_network, load_digits, train, train_population

    splits = load_digits(seed)
    values = population_search_space(n_models, seed)
    hyper = {k: np.asarray(v, np.float64) for k, v in values.items() if k != "dropout"}
    dropout = np.asarray(values["dropout"], np.float64)
    seeds = [seed + k for k in range(n_models)]
    if implementation == "fastdl-population":
        def run():
            model = build_network(population=n_models, dropout=dropout, seed=seeds,
                                  device="cpu")
            return train_population(model, splits, hyper, epochs, seed=seed)

        return run
    if implementation == "fastdl-sequential":
        def run():
            for k in range(n_models):
                model = build_network(dropout=float(dropout[k]), seed=seeds[k], device="cpu")
                train(model, splits, epochs, seed=seed, patience=epochs + 1,
                      hyper={name: float(v[k]) for name, v in hyper.items()})

        return run
    if implementation == "torch-sequential":
        import torch

        from . import data

        (X_train, y_train), _, _ = splits

        def run():
            for k in range(n_models):
                lr0 = float(hyper["lr"][k])
                model, opt = _torch_network(
                    (64, 256, 128, 10), float(dropout[k]), seeds[k], lr=lr0,
                    weight_decay=float(hyper["weight_decay"][k]),
                    betas=(float(hyper["beta1"][k]), float(hyper["beta2"][k])))
                for epoch in range(epochs):
                    for group in opt.param_groups:
                        group["lr"] = lr0 / (1 + 0.05 * epoch)
                    for xb, yb in data.minibatches(X_train, y_train, 64, seed=seed * 1000 + epoch):
                        opt.zero_grad(set_to_none=False)
                        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xb)),
                                                                 torch.from_numpy(yb))
                        loss.backward()
                        opt.step()

        return run
    raise ValueError(f"implementation must be one of {POPULATION_IMPLEMENTATIONS}; got "
                     f"{implementation!r}")
