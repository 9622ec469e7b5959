"""``python -m fastdl demo``: train an L-layer network on the 8x8 handwritten digits that
scikit-learn ships (no download), end to end with fastdl.

64-256-128-10: two Linear (no bias) - BatchNorm - ReLU - Dropout blocks, then Linear and
softmax cross-entropy; Adam (or another optimizer), L2 weight decay on the weights only (not on
biases or BatchNorm's gamma and beta), a learning-rate schedule, mini-batches of 64, early
stopping on the dev loss. Prints the device, a progress bar per epoch, train / dev accuracy,
the notes' bias / variance diagnosis, time per epoch, a PNG of the curves, and last the test
accuracy.
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import data, nn, optim, schedules
from .device import (
    get_device,
    require_cuda,
    set_device,
    threads_beside_blas,
    to_device,
    to_host,
)

OPTIMIZERS = {"adam": (optim.Adam, 2e-3), "adamw": (optim.AdamW, 2e-3),
              "momentum": (optim.Momentum, 0.1), "rmsprop": (optim.RMSprop, 1e-3),
              "sgd": (optim.SGD, 0.05)}
HIDDEN = (256, 128)
HUMAN_ERROR = 0.005  # a proxy for the Bayes error on these digits (people misread few)


def load_digits(seed=0, dtype=np.float32):
    """The digits split 70 / 15 / 15 (seeded) and standardized with the training statistics:
    ``((X_train, y_train), (X_dev, y_dev), (X_test, y_test))``, X (m, 64), y (m,) int64."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    splits = data.train_dev_test_split(digits.data, digits.target.astype(np.int64),
                                       (0.7, 0.15, 0.15), seed=seed)
    scaler = data.Standardizer().fit(splits[0][0])
    return tuple((scaler.transform(X, dtype), y) for X, y in splits)


def build_network(n_in=64, hidden=HIDDEN, n_classes=10, dropout=0.1, seed=0,
                  dtype=np.float32, device=None, population=None):
    """Linear - BatchNorm - ReLU - Dropout blocks and a Linear output, batch-first.

    ``population=K`` builds K models in one (``dropout`` may be K rates, ``seed`` K seeds);
    model k equals ``build_network(dropout=dropout[k], seed=seed[k])``."""
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


@dataclass
class History:
    train_loss: list = field(default_factory=list)
    dev_loss: list = field(default_factory=list)
    dev_accuracy: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)
    frozen: object = None  # populations: (K,) bool, the models frozen after diverging


def evaluate(model, loss_fn, X, y):
    """(loss, accuracy) of ``model`` in eval mode on host arrays X, y (one batch)."""
    model.eval()
    logits = model.forward(to_device(X))
    loss = float(to_host(loss_fn.forward(logits, to_device(y))))
    accuracy = float(np.mean(np.argmax(to_host(logits), axis=1) == y))
    model.train()
    return loss, accuracy


def make_optimizer(name, model, hyper=None, population=False):
    """The optimizer ``name`` over ``model``'s param groups (weight decay on the weights
    only), from ``hyper``: lr, weight_decay, and beta1 / beta2 (Adam, AdamW) or beta (the
    Momentum beta, RMSprop's alpha); each a number, or (K,) values for a population. Non-finite
    gradients skip the step (per model for a population: a diverging model is frozen)."""
    hyper = dict(hyper or {})
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


def train(model, splits, epochs=40, optimizer="adam", hyper=None, batch_size=64, seed=0,
          patience=10, progress=None):
    """Train ``model`` on ``splits`` (from :func:`load_digits`); returns a :class:`History`.

    ``hyper`` as :func:`make_optimizer` (default lr per optimizer, weight decay 1e-4). The
    learning rate decays as ``lr0 / (1 + 0.05 * epoch)`` (inverse time); mini-batches are
    shuffled from ``seed`` and the epoch; early stopping keeps the parameters of the best dev
    loss. ``progress(epoch, history)`` is called after each epoch.
    """
    (X_train, y_train), (X_dev, y_dev), _ = splits
    opt = make_optimizer(optimizer, model, hyper)
    schedule = schedules.inverse_time(opt.lr, decay_rate=0.05)
    loss_fn = nn.SoftmaxCrossEntropy()
    stopper = nn.EarlyStopping(model, patience=patience)
    grads = model.grads()
    history = History()
    for epoch in range(epochs):
        start = time.perf_counter()
        opt.lr = schedule(epoch)
        total, seen = 0.0, 0
        with threads_beside_blas(grads[0]):
            for X, y in data.minibatches(X_train, y_train, batch_size,
                                         seed=seed * 1000 + epoch):
                loss = loss_fn.forward(model.forward(to_device(X)), to_device(y))
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step(grads)
                total += float(to_host(loss)) * len(y)
                seen += len(y)
        history.epoch_seconds.append(time.perf_counter() - start)
        dev_loss, dev_accuracy = evaluate(model, loss_fn, X_dev, y_dev)
        history.train_loss.append(total / seen)
        history.dev_loss.append(dev_loss)
        history.dev_accuracy.append(dev_accuracy)
        history.lr.append(opt.lr)
        if progress is not None:
            progress(epoch, history)
        if stopper.step(dev_loss):
            break
    stopper.restore()
    return history


def train_population(model, splits, hyper, epochs=10, optimizer="adam", batch_size=64,
                     seed=0, progress=None):
    """Train a population ``model`` (K models, e.g. ``build_network(population=K)``) on the
    same mini-batches as :func:`train` with ``seed``; ``hyper`` holds (K,) values (see
    :func:`make_optimizer`). Every operation is one call for all K models. Returns a
    :class:`History` whose entries are (K,) arrays, and ``history.frozen``: the models whose
    loss or gradients went non-finite (frozen since, while the others train on)."""
    (X_train, y_train), (X_dev, y_dev), _ = splits
    opt = make_optimizer(optimizer, model, hyper, population=True)
    n_models = len(np.atleast_1d(opt.lr))
    schedule = schedules.inverse_time(np.broadcast_to(opt.lr, (n_models,)).astype(float),
                                      decay_rate=0.05)
    loss_fn = nn.SoftmaxCrossEntropy(population=n_models)
    grads = model.grads()
    history = History()
    history.frozen = np.zeros(n_models, bool)
    dev_labels = to_device(np.ascontiguousarray(np.broadcast_to(y_dev, (n_models, len(y_dev)))))
    for epoch in range(epochs):
        start = time.perf_counter()
        opt.lr = schedule(epoch)
        total, seen = np.zeros(n_models), 0
        # a diverging model overflows: expected, and reported through history.frozen
        with threads_beside_blas(grads[0]), np.errstate(over="ignore", invalid="ignore"):
            for X, y in data.minibatches(X_train, y_train, batch_size,
                                         seed=seed * 1000 + epoch):
                labels = np.ascontiguousarray(np.broadcast_to(y, (n_models, len(y))))
                loss = loss_fn.forward(model.forward(to_device(X)), to_device(labels))
                model.backward(loss_fn.backward(), input_grad=False)
                info = opt.step(grads)
                history.frozen |= info.found_inf
                total += to_host(loss).astype(np.float64) * len(y)
                seen += len(y)
        history.epoch_seconds.append(time.perf_counter() - start)
        model.eval()
        with threads_beside_blas(grads[0]), np.errstate(over="ignore", invalid="ignore"):
            logits = model.forward(to_device(X_dev))
            dev_loss = to_host(loss_fn.forward(logits, dev_labels)).astype(np.float64)
        accuracy = np.mean(np.argmax(to_host(logits), axis=2) == y_dev, axis=1)
        model.train()
        history.train_loss.append(total / seen)
        history.dev_loss.append(dev_loss)
        history.dev_accuracy.append(accuracy)
        history.lr.append(np.array(opt.lr, copy=True))
        history.frozen |= ~np.isfinite(history.train_loss[-1])
        if progress is not None:
            progress(epoch, history)
    return history


def diagnosis(train_error, dev_error, human_error=HUMAN_ERROR, threshold=0.02):
    """The notes' bias / variance reading of train and dev error against human-level error."""
    avoidable_bias, variance = train_error - human_error, dev_error - train_error
    if avoidable_bias > threshold and variance > threshold:
        verdict = "high bias and high variance: a bigger network, then more data or regularization"
    elif avoidable_bias > threshold:
        verdict = "high bias: train longer or use a bigger network"
    elif variance > threshold:
        verdict = "high variance: more data or more regularization (L2, dropout)"
    else:
        verdict = "low bias and low variance"
    return (f"avoidable bias {avoidable_bias:.3f} (train error {train_error:.3f} vs human "
            f"~{human_error:.3f}), variance {variance:.3f} (dev - train): {verdict}")


def plot(history, path):
    """Loss curves and the learning rate per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(len(history.train_loss))
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, history.train_loss, label="train")
    ax_loss.plot(epochs, history.dev_loss, label="dev")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_loss.legend()
    ax_lr.plot(epochs, history.lr)
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning-rate schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _progress_bar(epochs, enabled=True):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        def report(epoch, history):
            print(f"epoch {epoch + 1}/{epochs}: loss {history.train_loss[-1]:.4f}, dev accuracy "
                  f"{history.dev_accuracy[-1]:.3f}", flush=True)

        return report, lambda: None
    bar = tqdm(total=epochs, desc="training", unit="epoch")

    def report(epoch, history):
        bar.set_postfix(loss=f"{history.train_loss[-1]:.4f}",
                        dev_acc=f"{history.dev_accuracy[-1]:.3f}")
        bar.update(1)

    return report, bar.close


def accuracy(model, X, y):
    model.eval()
    predictions = np.argmax(to_host(model.forward(to_device(X))), axis=1)
    return float(np.mean(predictions == y))


def select_device(name, program):
    """Select device ``name`` for a command and say which it is (the command's first line);
    None, with the reason on stderr, when a GPU was asked for and none is usable."""
    from .bench import machine_description

    set_device(name)
    device = get_device()
    if device == "cuda":
        try:
            require_cuda()
        except RuntimeError as error:
            print(f"{program}: {error}", file=sys.stderr)
            return None
    print(f"device: {device} ({machine_description()})", flush=True)
    return device


def run(argv=None):
    parser = argparse.ArgumentParser(prog="fastdl demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fastdl-demo",
                        help="folder for the PNG of the curves (default: fastdl-demo)")
    parser.add_argument("--compare", action="store_true",
                        help="also train the NumPy textbook version and compare")
    parser.add_argument("--no-progress", action="store_true", help="a line per epoch instead "
                        "of a progress bar")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    device = select_device(args.device, "fastdl demo")
    if device is None:
        return 2
    splits = load_digits(args.seed)
    (X_train, y_train), (X_dev, y_dev), (X_test, y_test) = splits
    print(f"digits: {len(y_train)} train, {len(y_dev)} dev, {len(y_test)} test examples of 64 "
          f"pixels; network 64-{'-'.join(map(str, HIDDEN))}-10, {args.optimizer}", flush=True)
    model = build_network(seed=args.seed, device=device)
    report, close = _progress_bar(args.epochs, not args.no_progress)
    start = time.perf_counter()
    history = train(model, splits, args.epochs, args.optimizer, seed=args.seed,
                    progress=report)
    total = time.perf_counter() - start
    close()
    train_accuracy = accuracy(model, X_train, y_train)
    dev_accuracy = accuracy(model, X_dev, y_dev)
    print(f"train accuracy: {train_accuracy:.3f}  dev accuracy: {dev_accuracy:.3f}")
    print("diagnosis: " + diagnosis(1 - train_accuracy, 1 - dev_accuracy))
    seconds = history.epoch_seconds
    print(f"time: {total:.2f} s for {len(seconds)} epochs; first epoch {seconds[0]:.3f} s "
          f"(compilation included), then {np.median(seconds[1:] or seconds) * 1e3:.1f} ms "
          f"per epoch")
    if args.compare:
        _compare(splits, args, np.median(seconds[1:] or seconds))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "curves.png")
    plot(history, path)
    print(f"curves: {path}")
    print(f"test accuracy: {accuracy(model, X_test, y_test):.3f}")
    return 0


def _compare(splits, args, fastdl_epoch):
    """Train the NumPy textbook version of the same network and print both."""
    from .bench import TextbookNetwork

    (X_train, y_train), (X_dev, y_dev), (X_test, y_test) = splits
    net = TextbookNetwork([64, *HIDDEN, 10], dropout=0.1, seed=args.seed, lr=2e-3,
                          weight_decay=1e-4)
    times = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        net.lr = 2e-3 / (1 + 0.05 * epoch)
        for X, y in data.minibatches(X_train, y_train, 64, seed=args.seed * 1000 + epoch):
            net.train_step(X, y)
        times.append(time.perf_counter() - start)
    print(f"numpy textbook: {np.median(times) * 1e3:.1f} ms per epoch "
          f"({np.median(times) / fastdl_epoch:.1f}x fastdl's time), dev accuracy "
          f"{net.accuracy(X_dev, y_dev):.3f}, test accuracy {net.accuracy(X_test, y_test):.3f}")
