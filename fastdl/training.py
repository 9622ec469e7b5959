"""The training loop as a library: a network builder, an optimizer from a dict of
hyperparameters, one model trained with early stopping (:func:`train`), K models trained as
one population (:func:`train_population`), and their evaluation. The jobs
(``python -m fastdl demo`` and ``tune``) and the benchmarks train with these.

    import fastdl as fd
    splits = fd.data.load_digits(seed=0)              # ((X, y) train, dev, test); X (m, 64)
    model = fd.training.build_network(seed=0)         # 64-256-128-10
    history = fd.training.train(model, splits, epochs=40)
    loss, accuracy = fd.training.evaluate(model, *splits[2])

One epoch, for one model or K at once:

    lr = lr0 / (1 + 0.05 * epoch)                      (inverse-time decay, fastdl.schedules)
    for each mini-batch of the training split (shuffled from seed * 1000 + epoch):
        loss = softmax cross-entropy of model.forward(X) ; model.backward ; opt.step
    dev loss and dev accuracy in eval mode

Mini-batches are batch-first: X (N, n_in), labels y (N,) int. A population model (every layer
built with ``population=K``) takes the same X and gives logits (K, N, n_classes); its losses,
accuracies and hyperparameters are (K,).
"""

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from . import _validate, data, nn, optim, schedules
from .device import to_device, to_host

# name -> (class, default learning rate): the rates the digits network trains well with
OPTIMIZERS = {"adam": (optim.Adam, 2e-3), "adamw": (optim.AdamW, 2e-3),
              "momentum": (optim.Momentum, 0.1), "rmsprop": (optim.RMSprop, 1e-3),
              "sgd": (optim.SGD, 0.05)}
# the hyperparameters make_optimizer reads, besides lr and weight_decay
BETA_NAMES = {"adam": ("beta1", "beta2"), "adamw": ("beta1", "beta2"), "momentum": ("beta",),
              "rmsprop": ("beta",), "sgd": ()}
HIDDEN = (256, 128)
LR_DECAY_RATE = 0.05  # lr0 / (1 + 0.05 * epoch)


@dataclass
class History:
    """What :func:`train` and :func:`train_population` record, one entry per epoch (floats for
    one model, (K,) arrays for a population)."""

    train_loss: list = field(default_factory=list)  # mean loss over the epoch's mini-batches
    dev_loss: list = field(default_factory=list)  # after the epoch, in eval mode
    dev_accuracy: list = field(default_factory=list)
    lr: list = field(default_factory=list)  # the learning rate the epoch used
    epoch_seconds: list = field(default_factory=list)  # the training steps, not the evaluation
    frozen: object = None  # populations: (K,) bool, the models frozen after diverging

    def record(self, train_loss, dev_loss, dev_accuracy, lr, epoch_seconds):
        """Append one epoch's entries."""
        self.train_loss.append(train_loss)
        self.dev_loss.append(dev_loss)
        self.dev_accuracy.append(dev_accuracy)
        self.lr.append(lr)
        self.epoch_seconds.append(epoch_seconds)


def build_network(n_in=64, hidden=HIDDEN, n_classes=10, dropout=0.1, seed=0,
                  dtype=np.float32, device=None, population=None):
    """The demo network: per width in ``hidden`` a Linear (no bias) - BatchNorm - ReLU -
    Dropout(``dropout``) block, then a Linear output of ``n_classes`` logits; batch-first, an
    :class:`fastdl.nn.Sequential` (one flat parameter buffer).

    Shapes: X (N, n_in) -> logits (N, n_classes). Layer i's weights are drawn from ``seed + i``,
    its dropout masks from ``seed + 100 + i``.

    ``population=K`` builds K models in one (logits (K, N, n_classes)); ``dropout`` may be K
    rates and ``seed`` K seeds (default ``seed + k``); model k equals
    ``build_network(dropout=dropout[k], seed=seed[k])``::

        model = build_network(population=4, dropout=[0.0, 0.1, 0.2, 0.3], seed=[0, 1, 2, 3])
    """
    def seeds(offset):  # layer seeds from the model seed(s)
        if population is None:
            return seed + offset
        model_seeds = [seed + k for k in range(population)] if np.ndim(seed) == 0 else seed
        return [int(s) + offset for s in model_seeds]

    options = dict(dtype=dtype, device=device, population=population)
    layers, width = [], n_in
    for i, units in enumerate(hidden):
        layers += [nn.Linear(width, units, bias=False, seed=seeds(i), **options),
                   nn.BatchNorm(units, **options), nn.ReLU(),
                   nn.Dropout(dropout, seed=seeds(100 + i), population=population)]
        width = units
    layers.append(nn.Linear(width, n_classes, seed=seeds(len(hidden)), **options))
    return nn.Sequential(*layers)


def model_count(model):
    """K for a model whose layers were built with ``population=K``; None for one model."""
    layers = model.layers if isinstance(model, nn.Sequential) else [model]
    counts = {layer.population for layer in layers
              if getattr(layer, "population", None) is not None}
    if len(counts) > 1:
        raise ValueError(f"model's layers must all have one population; got populations "
                         f"{sorted(counts)}")
    return counts.pop() if counts else None


def make_optimizer(name, model, hyper=None, population=False):
    """The optimizer ``name`` ("adam", "adamw", "momentum", "rmsprop", "sgd") over ``model``'s
    param groups, weight decay on the weights only (not on biases or BatchNorm's gamma, beta).

    ``hyper`` (dict): ``lr`` (default per optimizer: :data:`OPTIMIZERS`), ``weight_decay``
    (1e-4), and ``beta1`` / ``beta2`` (Adam, AdamW: 0.9 / 0.999) or ``beta`` (Momentum's beta,
    0.9; RMSprop's alpha, 0.99); each a number, or (K,) values with ``population=True``; any
    other name is a ValueError. Non-finite gradients skip the step (per model in a population:
    a diverging model is frozen)::

        opt = make_optimizer("adam", model, {"lr": 1e-3, "beta2": 0.99})
    """
    _validate.option(name, "optimizer", tuple(OPTIMIZERS))
    hyper = dict(hyper or {})
    known = ("lr", "weight_decay") + BETA_NAMES[name]
    unknown = sorted(set(hyper) - set(known))
    if unknown:
        raise ValueError(f"hyper for {name} takes {known}; got unknown {unknown}")
    cls, default_lr = OPTIMIZERS[name]
    options = dict(lr=hyper.get("lr", default_lr), skip_nonfinite=True, population=population)
    if name in ("adam", "adamw"):
        options["betas"] = (hyper.get("beta1", 0.9), hyper.get("beta2", 0.999))
    elif name == "momentum":
        options["beta"] = hyper.get("beta", 0.9)
    elif name == "rmsprop":
        options["alpha"] = hyper.get("beta", 0.99)
    groups = model.param_groups(weight_decay=hyper.get("weight_decay", 1e-4))
    return cls(groups, **options)


@contextlib.contextmanager
def _eval_mode(model):
    """``model`` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _labels(y, n_models):
    """Labels (N,) as the loss of ``n_models`` models takes them: (K, N) for a population."""
    if n_models is None:
        return y
    return np.ascontiguousarray(np.broadcast_to(y, (n_models, len(y))))


def _quiet_overflow(n_models):
    # a diverging model of a population overflows: expected, and reported through
    # History.frozen; for one model it stays a warning
    if n_models is None:
        return contextlib.nullcontext()
    return np.errstate(over="ignore", invalid="ignore")


def evaluate(model, X, y, loss_fn=None):
    """``(loss, accuracy)`` of ``model`` in eval mode on host arrays X (m, n_in), y (m,), as
    one batch; the model's mode is restored after.

    loss = mean softmax cross-entropy (or ``loss_fn``'s), accuracy = mean(argmax(logits) == y).
    Python floats for one model; (K,) float64 arrays for a population (each model on the
    same X and y)::

        dev_loss, dev_accuracy = evaluate(model, X_dev, y_dev)
    """
    n_models = model_count(model)
    if loss_fn is None:
        loss_fn = nn.SoftmaxCrossEntropy(population=n_models)
    X = to_device(X)
    with _eval_mode(model), nn._kernel_threads(model, X, len(y)), _quiet_overflow(n_models):
        logits = model.forward(X)
        loss = to_host(loss_fn.forward(logits, to_device(_labels(y, n_models))))
    correct = np.argmax(to_host(logits), axis=-1) == y
    if n_models is None:
        return float(loss), float(np.mean(correct))
    return np.asarray(loss, np.float64), np.mean(correct, axis=-1)


def accuracy(model, X, y):
    """The fraction of X's examples (m, n_in) whose most probable class is y (m,), in eval
    mode: a float, or (K,) for a population. The model's mode is restored after."""
    with _eval_mode(model):
        logits = to_host(model.forward(to_device(X)))
    correct = np.argmax(logits, axis=-1) == y
    return float(np.mean(correct)) if model_count(model) is None else np.mean(correct, axis=-1)


def train(model, splits, epochs=40, optimizer="adam", hyper=None, batch_size=64, seed=0,
          patience=10, progress=None):
    """Train one ``model`` on ``splits`` = ``((X_train, y_train), (X_dev, y_dev), test)`` (as
    :func:`fastdl.data.load_digits` gives them; the test split is not touched); returns a
    :class:`History` of floats.

    ``hyper`` as :func:`make_optimizer`. Each epoch uses ``lr = lr0 / (1 + 0.05 * epoch)`` and
    mini-batches of ``batch_size`` shuffled from ``seed * 1000 + epoch`` (the same seed, the
    same numbers); early stopping (:class:`fastdl.nn.EarlyStopping`, ``patience`` epochs)
    ends training and puts back the parameters of the best dev loss. ``progress(epoch,
    history)`` is called after each epoch::

        history = train(build_network(), splits, epochs=40, optimizer="adamw")
    """
    _validate.integer(epochs, "epochs", minimum=1)
    if model_count(model) is not None:
        raise ValueError(f"train takes one model; got a population of {model_count(model)} "
                         f"models: use train_population")
    (X_train, y_train), (X_dev, y_dev), _ = splits
    opt = make_optimizer(optimizer, model, hyper)
    schedule = schedules.inverse_time(opt.lr, decay_rate=LR_DECAY_RATE)
    loss_fn, dev_loss_fn = nn.SoftmaxCrossEntropy(), nn.SoftmaxCrossEntropy()
    stopper = nn.EarlyStopping(model, patience=patience)
    grads = model.grads()
    history = History()
    for epoch in range(epochs):
        start = time.perf_counter()
        opt.lr = schedule(epoch)
        total, seen = 0.0, 0
        with nn._kernel_threads(model, grads[0], batch_size):
            for X, y in data.minibatches(X_train, y_train, batch_size,
                                         seed=seed * 1000 + epoch):
                loss = loss_fn.forward(model.forward(to_device(X)), to_device(y))
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step(grads)
                total += float(to_host(loss)) * len(y)
                seen += len(y)
        seconds = time.perf_counter() - start
        dev_loss, dev_accuracy = evaluate(model, X_dev, y_dev, dev_loss_fn)
        history.record(total / seen, dev_loss, dev_accuracy, opt.lr, seconds)
        if progress is not None:
            progress(epoch, history)
        if stopper.step(dev_loss):
            break
    stopper.restore()
    return history


def train_population(model, splits, hyper, epochs=10, optimizer="adam", batch_size=64,
                     seed=0, progress=None, population=None):
    """Train a population ``model`` of K models (every layer built with ``population=K``, e.g.
    ``build_network(population=K)``) on ``splits``, each on the mini-batches :func:`train`
    would use with ``seed``; every operation is one call for all K models.

    K is read from the model's layers (``population=K`` may say it too; a mismatch is a
    ValueError). ``hyper`` as :func:`make_optimizer`, each value a number or (K,) values; the
    learning rate decays per model as in :func:`train`; no early stopping. Returns a
    :class:`History` whose entries are (K,) arrays, and ``history.frozen`` (K,) bool: the
    models whose loss or gradients went non-finite (frozen since by the optimizer's per-model
    non-finite skipping, while the others train on). Model k ends as
    ``train(build_network(dropout=dropout[k], seed=seed[k]), ..., hyper={name: v[k]})`` would,
    without early stopping::

        model = build_network(population=3, dropout=[0.0, 0.1, 0.2], seed=[0, 1, 2])
        history = train_population(model, splits, {"lr": np.array([1e-3, 3e-3, 1e-2])})
    """
    _validate.integer(epochs, "epochs", minimum=1)
    n_models = model_count(model)
    if n_models is None:
        raise ValueError("train_population takes a model built with population=K (e.g. "
                         "build_network(population=K)); got a model of one: use train")
    if population is not None and _validate.integer(population, "population", 1) != n_models:
        raise ValueError(f"population must be the model's number of models {n_models}; got "
                         f"{population}")
    (X_train, y_train), (X_dev, y_dev), _ = splits
    opt = make_optimizer(optimizer, model, hyper, population=True)
    lr0 = np.broadcast_to(opt.lr, (n_models,)).astype(np.float64)  # one lr0 per model
    schedule = schedules.inverse_time(lr0, decay_rate=LR_DECAY_RATE)
    loss_fn = nn.SoftmaxCrossEntropy(population=n_models)
    dev_loss_fn = nn.SoftmaxCrossEntropy(population=n_models)
    grads = model.grads()
    history = History()
    history.frozen = np.zeros(n_models, bool)
    for epoch in range(epochs):
        start = time.perf_counter()
        opt.lr = schedule(epoch)
        total, seen = np.zeros(n_models), 0
        with nn._kernel_threads(model, grads[0], batch_size), _quiet_overflow(n_models):
            for X, y in data.minibatches(X_train, y_train, batch_size,
                                         seed=seed * 1000 + epoch):
                loss = loss_fn.forward(model.forward(to_device(X)),
                                       to_device(_labels(y, n_models)))
                model.backward(loss_fn.backward(), input_grad=False)
                info = opt.step(grads)
                history.frozen |= info.found_inf
                total += to_host(loss).astype(np.float64) * len(y)
                seen += len(y)
        seconds = time.perf_counter() - start
        dev_loss, dev_accuracy = evaluate(model, X_dev, y_dev, dev_loss_fn)
        history.record(total / seen, dev_loss, dev_accuracy, np.array(opt.lr, copy=True),
                       seconds)
        history.frozen |= ~np.isfinite(history.train_loss[-1])
        if progress is not None:
            progress(epoch, history)
    return history
