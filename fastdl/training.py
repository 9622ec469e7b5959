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
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import _validate, data, nn, optim, schedules
from . import checkpoint as _checkpoint
from .device import to_device, to_host
from .dropout import Rows

# name -> (class, default learning rate): the rates the digits network trains well with
OPTIMIZERS = {"adam": (optim.Adam, 2e-3), "adamw": (optim.AdamW, 2e-3),
              "momentum": (optim.Momentum, 0.1), "rmsprop": (optim.RMSprop, 1e-3),
              "sgd": (optim.SGD, 0.05)}
# The hyperparameters make_optimizer takes, per optimizer: name -> (its param-group key, and
# its index in the pair for Adam's betas, else None). RMSprop's "beta" is its alpha.
_COMMON_KEYS = {"lr": ("lr", None), "weight_decay": ("weight_decay", None)}
OPTIMIZER_KEYS = {"adam": {**_COMMON_KEYS, "beta1": ("betas", 0), "beta2": ("betas", 1)},
                  "adamw": {**_COMMON_KEYS, "beta1": ("betas", 0), "beta2": ("betas", 1)},
                  "momentum": {**_COMMON_KEYS, "beta": ("beta", None)},
                  "rmsprop": {**_COMMON_KEYS, "beta": ("alpha", None)},
                  "sgd": dict(_COMMON_KEYS)}
OPTIMIZER_HYPER = {name: tuple(keys) for name, keys in OPTIMIZER_KEYS.items()}
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
                  dtype=np.float32, device=None, population=None, batchnorm_momentum=0.1,
                  sync_batchnorm=False):
    """The demo network: per width in ``hidden`` a Linear (no bias) - BatchNorm - ReLU -
    Dropout(``dropout``) block, then a Linear output of ``n_classes`` logits; batch-first, an
    :class:`fastdl.nn.Sequential` (one flat parameter buffer).

    Shapes: X (N, n_in) -> logits (N, n_classes). The layer at position i of the Sequential
    draws from ``nn.spawn_seed(seed, i)`` (its weights, or its dropout masks), as
    ``model.reset_model(k, seed)`` reseeds it.

    ``sync_batchnorm=True``: batch norm synchronized across the ranks of data-parallel
    training (``nn.BatchNorm(sync=True)``).

    ``population=K`` builds K models in one (logits (K, N, n_classes)); ``dropout`` and
    ``batchnorm_momentum`` may be K values and ``seed`` K seeds (default ``seed + k``); model k
    equals ``build_network(dropout=dropout[k], seed=seed[k], ...)``::

        model = build_network(population=4, dropout=[0.0, 0.1, 0.2, 0.3], seed=[0, 1, 2, 3])
    """
    model_seeds = [seed] if population is None else (
        [seed + k for k in range(population)] if np.ndim(seed) == 0 else list(seed))
    _validate.seed(model_seeds if population is not None else seed, "seed", population)

    def seeds(position):  # the layer seed(s) at ``position``
        layer_seeds = [nn.spawn_seed(int(s), position) for s in model_seeds]
        return layer_seeds[0] if population is None else layer_seeds

    options = dict(dtype=dtype, device=device, population=population)
    layers, width = [], n_in
    for units in hidden:
        position = len(layers)
        layers += [nn.Linear(width, units, bias=False, seed=seeds(position), **options),
                   nn.BatchNorm(units, momentum=batchnorm_momentum, sync=sync_batchnorm,
                                **options), nn.ReLU(),
                   nn.Dropout(dropout, seed=seeds(position + 3), population=population)]
        width = units
    layers.append(nn.Linear(width, n_classes, seed=seeds(len(layers)), **options))
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


def make_optimizer(name, model, hyper=None, population=False, state_dtype=None):
    """The optimizer ``name`` ("adam", "adamw", "momentum", "rmsprop", "sgd") over ``model``'s
    param groups, weight decay on the weights only (not on biases or BatchNorm's gamma, beta).

    ``hyper`` (dict): ``lr`` (default per optimizer: :data:`OPTIMIZERS`), ``weight_decay``
    (1e-4), and ``beta1`` / ``beta2`` (Adam, AdamW: 0.9 / 0.999) or ``beta`` (Momentum's beta,
    0.9; RMSprop's alpha, 0.99); each a number, or (K,) values with ``population=True``; any
    other name is a ValueError. Non-finite gradients skip the step (per model in a population:
    a diverging model is frozen). ``state_dtype``: the optimizer's (None, "float32",
    "bfloat16", "int8": :mod:`fastdl.optim`)::

        opt = make_optimizer("adam", model, {"lr": 1e-3, "beta2": 0.99})
    """
    _validate.option(name, "optimizer", tuple(OPTIMIZERS))
    hyper = dict(hyper or {})
    known = OPTIMIZER_HYPER[name]
    unknown = sorted(set(hyper) - set(known))
    if unknown:
        raise ValueError(f"hyper for {name} takes {known}; got unknown {unknown}")
    cls, default_lr = OPTIMIZERS[name]
    options = dict(lr=hyper.get("lr", default_lr), skip_nonfinite=True, population=population,
                   state_dtype=state_dtype)
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
        loss = to_host(loss_fn.forward(logits, to_device(y)))
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
          patience=10, progress=None, comm=None, checkpoint=None, watchdog=None,
          state_dtype=None):
    """Train one ``model`` on ``splits`` = ``((X_train, y_train), (X_dev, y_dev), test)`` (as
    :func:`fastdl.data.load_digits` gives them; the test split is not touched); returns a
    :class:`History` of floats.

    ``hyper`` and ``state_dtype`` as :func:`make_optimizer`. Each epoch uses
    ``lr = lr0 / (1 + 0.05 * epoch)`` and mini-batches of ``batch_size`` shuffled from
    ``seed * 1000 + epoch`` (the same seed, the same numbers); early stopping
    (:class:`fastdl.nn.EarlyStopping`, ``patience`` epochs) ends training and puts back the
    parameters of the best dev loss. ``progress(epoch, history)`` is called after each epoch::

        history = train(build_network(), splits, epochs=40, optimizer="adamw")

    Data-parallel training (``comm``: a ``fastdl.distributed`` communicator, every rank
    calling ``train`` on the same ``splits`` and a model built alike, batch norm with
    ``sync=True``): each rank takes its rows of every global batch (``fastdl.data.
    minibatches(rank=, world=)``), dropout keys its masks by global position, the loss's
    gradient is scaled to the rank's share of the global mean (its rows / the batch's) and
    one SUM-allreduce of the flat gradient buffer gives every rank the full gradient: the
    ranks train the model one process trains on the whole batches (to float rounding; one
    rank: bit for bit). Every rank evaluates the whole dev split.

    ``checkpoint``: a file path; after every epoch the model, optimizer, early stopping and
    history (rank 0 writes; atomically: ``fastdl.checkpoint``) are saved there, and a run that
    finds one there continues from it, bit for bit as if never stopped. ``watchdog``: a
    ``fastdl.distributed.Watchdog``, told of every step's progress.
    """
    _validate.integer(epochs, "epochs", minimum=1)
    if model_count(model) is not None:
        raise ValueError(f"train takes one model; got a population of {model_count(model)} "
                         f"models: use train_population")
    (X_train, y_train), (X_dev, y_dev), _ = splits
    rank, world = (0, 1) if comm is None else (comm.rank, comm.size)
    opt = make_optimizer(optimizer, model, hyper, state_dtype=state_dtype)
    schedule = schedules.inverse_time(opt.lr, decay_rate=LR_DECAY_RATE)
    loss_fn, dev_loss_fn = nn.SoftmaxCrossEntropy(), nn.SoftmaxCrossEntropy()
    stopper = nn.EarlyStopping(model, patience=patience)
    grads = model.grads()
    history, first_epoch, stopped = History(), 0, False
    if checkpoint is not None and os.path.exists(checkpoint):
        first_epoch, stopped = _resume(_checkpoint.load(checkpoint), model, opt, stopper,
                                       history)
    n_examples = len(y_train)
    for epoch in range(first_epoch, epochs):
        if stopped:
            break
        start = time.perf_counter()
        opt.lr = schedule(epoch)
        total = np.zeros(1)
        with nn._kernel_threads(model, grads[0], batch_size):
            for b, (X, y) in enumerate(data.minibatches(
                    X_train, y_train, batch_size, seed=seed * 1000 + epoch,
                    **({} if world == 1 else dict(rank=rank, world=world)))):
                where, share = {}, 1.0  # one process: the plain step, bit for bit
                if world > 1:
                    global_rows = min(batch_size, n_examples - b * batch_size)
                    where = dict(rows=Rows(global_rows * rank // world, global_rows))
                    share = len(y) / global_rows  # the local mean -> its share of the global
                loss = loss_fn.forward(model.forward(to_device(X), **where), to_device(y))
                model.backward(loss_fn.backward(share), input_grad=False)
                if world > 1:
                    comm.allreduce(model.flat_grads)
                opt.step(grads)
                if len(y):
                    total += float(to_host(loss)) * len(y)
                if watchdog is not None:
                    watchdog.progress()
        if world > 1:
            comm.allreduce(total)
        seconds = time.perf_counter() - start
        dev_loss, dev_accuracy = evaluate(model, X_dev, y_dev, dev_loss_fn)
        history.record(float(total[0]) / n_examples, dev_loss, dev_accuracy, opt.lr, seconds)
        if progress is not None:
            progress(epoch, history)
        stopped = stopper.step(dev_loss)
        if checkpoint is not None and rank == 0:
            _checkpoint.save(checkpoint, {
                "epoch": epoch + 1, "stopped": stopped, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "stopper": stopper.state_dict(),
                "history": {name: list(getattr(history, name)) for name in HISTORY_FIELDS}})
    stopper.restore()
    return history


# the entries of History a checkpoint keeps (epoch_seconds too: what the epochs took then)
HISTORY_FIELDS = ("train_loss", "dev_loss", "dev_accuracy", "lr", "epoch_seconds")


def _resume(state, model, opt, stopper, history):
    """Load a checkpoint :func:`train` wrote into its model, optimizer, stopper and history;
    returns (the next epoch, whether early stopping had ended the run)."""
    _validate.entries(state, "checkpoint",
                      ("epoch", "stopped", "model", "optimizer", "stopper", "history"))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    stopper.load_state_dict(state["stopper"])
    for name in HISTORY_FIELDS:
        getattr(history, name).extend(state["history"][name])
    return int(state["epoch"]), bool(state["stopped"])


class Population:
    """K models trained as one, an epoch at a time, whose models can start again between
    epochs (a new configuration in a freed slot) or copy one another (population-based
    training): what :func:`train_population` and :func:`fastdl.tune.optimize` run.

    ``model``: built with ``population=K`` (e.g. ``build_network(population=K)``); ``splits``
    as :func:`train`'s; ``hyper`` as :func:`make_optimizer`'s, each value a number or (K,)
    values. Every model sees the same mini-batches (shuffled from ``seed * 1000 + epoch``,
    ``epoch`` counting the population's epochs); model k's learning rate decays with its own
    age, ``lr0[k] / (1 + 0.05 * age[k])``, age = epochs trained since it (re)started.
    Model k at age a is the model :func:`train` would have after a epochs, fed the
    population's batches since its start::

        run = Population(build_network(population=16, seed=seeds), splits, "adam", hyper)
        for epoch in range(10):
            train_loss = run.train_epoch()             # (K,)
            dev_loss, dev_accuracy = run.evaluate()    # (K,), (K,)
            run.restart(3, seed=99, hyper={"lr": 1e-3})  # model 3 starts again
    """

    def __init__(self, model, splits, optimizer="adam", hyper=None, batch_size=64, seed=0):
        self.n_models = model_count(model)
        if self.n_models is None:
            raise ValueError("Population takes a model built with population=K (e.g. "
                             "build_network(population=K)); got a model of one: use train")
        self.model, self.optimizer_name = model, optimizer
        (self.X_train, self.y_train), (self.X_dev, self.y_dev), _ = splits
        self.batch_size = _validate.integer(batch_size, "batch_size", minimum=1)
        self.seed = _validate.integer(seed, "seed")
        self.opt = make_optimizer(optimizer, model, hyper, population=True)
        self.lr0 = np.broadcast_to(self.opt.lr, (self.n_models,)).astype(np.float64)
        self.age = np.zeros(self.n_models, np.int64)
        self.epoch = 0
        self.frozen = np.zeros(self.n_models, bool)  # diverged: non-finite loss or gradients
        self.loss_fn = nn.SoftmaxCrossEntropy(population=self.n_models)
        self.dev_loss_fn = nn.SoftmaxCrossEntropy(population=self.n_models)
        self._grads = model.grads()

    def learning_rates(self):
        """The (K,) learning rates of the next epoch: each model's own decay."""
        return self.lr0 / (1 + LR_DECAY_RATE * self.age)

    def train_epoch(self):
        """One epoch of every model on the same mini-batches; returns the (K,) mean training
        losses. A model whose loss or gradients turn non-finite is frozen (``frozen[k]``):
        the optimizer's per-model non-finite skipping stops it, the others train on."""
        self.opt.lr = self.learning_rates()
        total, seen = np.zeros(self.n_models), 0
        with nn._kernel_threads(self.model, self._grads[0], self.batch_size), \
                _quiet_overflow(self.n_models):
            for X, y in data.minibatches(self.X_train, self.y_train, self.batch_size,
                                         seed=self.seed * 1000 + self.epoch):
                loss = self.loss_fn.forward(self.model.forward(to_device(X)), to_device(y))
                self.model.backward(self.loss_fn.backward(), input_grad=False)
                self.frozen |= self.opt.step(self._grads).found_inf
                total += to_host(loss).astype(np.float64) * len(y)
                seen += len(y)
        self.epoch += 1
        self.age += 1
        train_loss = total / seen
        self.frozen |= ~np.isfinite(train_loss)
        return train_loss

    def evaluate(self):
        """``(dev_loss, dev_accuracy)``, (K,) each, in eval mode on the dev split."""
        return evaluate(self.model, self.X_dev, self.y_dev, self.dev_loss_fn)

    def restart(self, k, seed, hyper=None):
        """Model ``k`` starts again as a new model of seed ``seed`` (its layers reseeded as
        ``build_network(seed=seed)``'s) with the hyperparameters ``hyper`` (names as
        :func:`set_hyper`'s; those not given keep model k's values), its optimizer state,
        step count and age back to 0. The other models are untouched."""
        if hyper:
            self.set_hyper(k, hyper)
        self.model.reset_model(k, seed)
        self.opt.reset_model(k)
        self.age[k], self.frozen[k] = 0, False

    def copy(self, src, dst):
        """Model ``dst`` becomes a copy of model ``src``: parameters, statistics, dropout
        stream, optimizer state and step count, hyperparameters and age."""
        self.model.copy_model(src, dst)
        self.opt.copy_model(src, dst)
        self.lr0[dst], self.age[dst], self.frozen[dst] = \
            self.lr0[src], self.age[src], self.frozen[src]

    def set_hyper(self, k, hyper):
        """Set model ``k``'s hyperparameters from ``hyper`` ({name: number}): the optimizer's
        (``lr``, the initial rate; ``weight_decay``; ``beta1`` / ``beta2`` or ``beta``, as
        :func:`make_optimizer`), ``dropout`` (every Dropout layer's rate) and
        ``batchnorm_momentum`` (every BatchNorm layer's)."""
        names = OPTIMIZER_HYPER[self.optimizer_name] + ("dropout", "batchnorm_momentum")
        unknown = sorted(set(hyper) - set(names))
        if unknown:
            raise ValueError(f"hyper takes {names}; got unknown {unknown}")
        values = {name: _validate.number(v, f"hyper[{name!r}]") for name, v in hyper.items()}
        for name, value in values.items():
            if name == "lr":
                self.lr0[k] = value
            elif name in ("dropout", "batchnorm_momentum"):
                kind, attribute = ((nn.Dropout, "p") if name == "dropout"
                                   else (nn.BatchNorm, "momentum"))
                for layer in self.model.layers:
                    if isinstance(layer, kind):
                        setattr(layer, attribute,
                                _with_model_value(getattr(layer, attribute), k, value,
                                                  self.n_models))
            else:
                self._set_optimizer_value(k, name, value)

    def _set_optimizer_value(self, k, name, value):
        groups = self.opt.param_groups
        if name == "weight_decay":  # the decayed group only (the first: the weights)
            groups[0]["weight_decay"] = _with_model_value(groups[0]["weight_decay"], k, value,
                                                          self.n_models)
            return
        key, index = OPTIMIZER_KEYS[self.optimizer_name][name]
        for group in groups:
            if index is None:
                group[key] = _with_model_value(group[key], k, value, self.n_models)
            else:
                pair = list(group[key])
                pair[index] = _with_model_value(pair[index], k, value, self.n_models)
                group[key] = tuple(pair)


def _with_model_value(current, k, value, n_models):
    """A (K,) float64 copy of ``current`` (a number or (K,) values) with ``value`` at k."""
    values = np.array(np.broadcast_to(current, (n_models,)), np.float64)
    values[k] = value
    return values


def train_population(model, splits, hyper, epochs=10, optimizer="adam", batch_size=64,
                     seed=0, progress=None, population=None):
    """Train a population ``model`` of K models (every layer built with ``population=K``, e.g.
    ``build_network(population=K)``) on ``splits``, each on the mini-batches :func:`train`
    would use with ``seed``; every operation is one call for all K models (a
    :class:`Population` run for ``epochs``).

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
    run = Population(model, splits, optimizer, hyper, batch_size, seed)
    history = History()
    for epoch in range(epochs):
        lr = run.learning_rates()
        start = time.perf_counter()
        train_loss = run.train_epoch()
        seconds = time.perf_counter() - start
        dev_loss, dev_accuracy = run.evaluate()
        history.record(train_loss, dev_loss, dev_accuracy, lr, seconds)
        if progress is not None:
            progress(epoch, history)
    history.frozen = run.frozen
    return history
