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
import contextlib
import os
import time

import numpy as np

from .. import cpu_threads, data, nn, training
from .common import compile_ahead, progress_bar, select_device
from .textbook import TextbookNetwork

# The CPU kernels a demo run compiles when the cache is cold (REGISTRY names with signatures
# after a run; the optimizer's update kernel, made on first use, is left out, and its
# coefficient builder, one per optimizer, is added by ``demo_kernels``): one model's kernels
# run on one thread (fastdl.nn._kernel_threads), hence the serial variants; its products are
# fastdl's (kernels/dense.py) and its BatchNorm - ReLU - Dropout blocks fused
# (kernels/block.py; batch norm's own affine pass in eval mode). About COMPILE_SECONDS for all
# of them, on two processes (:func:`compile_layers` here, :func:`compile_loss_and_step` beside).
DEMO_KERNELS = tuple(f"{name}.serial" for name in (
    "batchnorm.affine_rows", "batchnorm.comoment_rows", "batchnorm.input_grad_rows",
    "block.affine_relu_dropout_rows", "block.relu_dropout_grad", "dense.products",
    "dense.transpose", "softmax.rows_kernel")) + (
    "optim.grad_nonfinite.serial", "pointers.address", "softmax.label_counts")
COMPILE_SECONDS = 4  # measured: the demo's compile ahead, AMD EPYC, 2 cores, 2026-12-05 (3.9 s)


def demo_kernels(optimizer):
    """DEMO_KERNELS and the coefficient builder of ``optimizer`` (a training.OPTIMIZERS name)."""
    return DEMO_KERNELS + (f"optim.coefficients.{optimizer}",)


def _tiny_batch(rows=8):
    """A mini-batch of the demo's types (float32 (rows, 64) pixels, int64 labels): what the
    compile workloads run on, so that they compile the signatures the run calls."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal((rows, 64)).astype(np.float32),
            rng.integers(0, 10, rows).astype(np.int64))


# The two workloads split the ~6 s of compiling: here the products kernel (~1.2 s, the slowest)
# and batch norm's, beside the fused block's and the transpose (which the network needs only
# after a product and batch norm's statistics: cached by then), the loss's and the optimizer's.
# Each workload calls its kernels directly first, then the network, which finds them cached.


def _products_and_norm():
    """Compile the products and transpose kernels and batch norm's (rows layout, training
    and eval)."""
    from fastdl import batch_norm_backward, batch_norm_forward
    from fastdl.kernels import dense

    X, _ = _tiny_batch()
    dense.matmul(X, X, np.empty((1, len(X), len(X)), np.float32))
    dense.transpose_serial(X[None], np.empty((1,) + X.T.shape, X.dtype))
    c = np.ones(X.shape[1], np.float32)
    y, cache = batch_norm_forward(X, c, c, c.copy(), c.copy())
    batch_norm_backward(y, cache)
    batch_norm_forward(X, c, c, c, c, training=False)


def _fused_block():
    """Compile the fused BatchNorm - ReLU - Dropout kernels."""
    from fastdl import dropout
    from fastdl.kernels import batchnorm, block

    X, _ = _tiny_batch()
    _, _, draw = dropout.mask_draw(X, 0.1, 0, False)
    coefficients = np.ones((1, X.shape[1]), np.float32)
    block.affine_relu_dropout(batchnorm.plan(1, *X.shape, 1), X[None], coefficients,
                              coefficients, coefficients, *draw, np.empty_like(X)[None])
    block.relu_dropout_grad(X, X, 1, draw.scales, np.empty_like(X))


def compile_layers(optimizer, state_dtype=None):
    """The products, transpose and batch norm kernels (training and eval mode),
    single-threaded as in training. Not a forward of the network: that would compile the fused
    block's kernels here too, which :func:`compile_loss_and_step` compiles beside."""
    with cpu_threads(1):
        _products_and_norm()


def compile_loss_and_step(optimizer, state_dtype=None):
    """The fused block's kernels, then the loss and one ``optimizer`` step (its state in
    ``state_dtype``) of the demo network on a tiny batch, single-threaded as in training."""
    model = training.build_network()
    X, y = _tiny_batch()
    with cpu_threads(1):
        _fused_block()
        loss_fn = nn.SoftmaxCrossEntropy()
        loss_fn.forward(np.zeros((len(y), 10), np.float32), y)
        loss_fn.backward()
        training.make_optimizer(optimizer, model, state_dtype=state_dtype).step(model.grads())


HUMAN_ERROR = 0.005  # a proxy for the Bayes error on these digits (people misread few)


def diagnosis(train_error, dev_error, human_error=HUMAN_ERROR, threshold=0.02):
    """The notes' bias / variance reading of train and dev error against human-level error:
    avoidable bias = train error - human error, variance = dev error - train error, each
    "high" above ``threshold``."""
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
    """Loss curves and the learning rate per epoch of a :class:`fastdl.training.History`, as
    a PNG at ``path``."""
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


def run(argv=None):
    parser = argparse.ArgumentParser(prog="fastdl demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--optimizer", default="adam", choices=sorted(training.OPTIMIZERS))
    parser.add_argument("--state-dtype", default=None, choices=["float32", "bfloat16", "int8"],
                        help="the optimizer's state: float32 (default), bfloat16, or 8-bit "
                        "blockwise codes (int8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patience", type=int, default=10, help="early stopping: epochs "
                        "without a better dev loss (default: 10)")
    parser.add_argument("--out", default="fastdl-demo",
                        help="folder for the PNG of the curves (default: fastdl-demo)")
    parser.add_argument("--compare", action="store_true",
                        help="also train the NumPy textbook version and compare")
    parser.add_argument("--no-progress", action="store_true", help="a line per epoch instead "
                        "of a progress bar")
    parser.add_argument("--data-parallel", action="store_true", help="train on the ranks of "
                        "mpiexec -n W (fastdl.distributed; the mpi extra)")
    parser.add_argument("--checkpoint", metavar="DIR", help="save the run every epoch to "
                        "DIR/checkpoint.npz, and continue from it when it is there")
    parser.add_argument("--timeout", type=float, default=120.0, help="data-parallel: end the "
                        "job when a rank makes no progress for this long (default: 120 s)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.patience < 1:
        parser.error("--epochs and --patience must be >= 1")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    comm = None
    if args.data_parallel:
        from .. import distributed

        comm = distributed.init()
        distributed.excepthook_aborts()  # a failing rank ends the job, naming itself
    root = comm is None or comm.rank == 0
    say = print if root else (lambda *a, **k: None)
    device = select_device(args.device, "fastdl demo", announce=root)
    if device is None:
        return 2
    if comm is not None:
        say(f"data-parallel: {comm.size} ranks ({comm.describe()}), the global batch of 64 "
            f"split between them", flush=True)
    finish_compile = lambda: None  # noqa: E731
    if device == "cpu" and root:  # started before loading the digits, which it overlaps
        finish_compile = compile_ahead(demo_kernels(args.optimizer), COMPILE_SECONDS,
                                       compile_layers, compile_loss_and_step, args.optimizer,
                                       args.state_dtype)
    splits = data.load_digits(args.seed)
    (X_train, y_train), (X_dev, y_dev), (X_test, y_test) = splits
    say(f"digits: {len(y_train)} train, {len(y_dev)} dev, {len(y_test)} test examples of 64 "
        f"pixels; network 64-{'-'.join(map(str, training.HIDDEN))}-10, {args.optimizer}"
        f"{'' if args.state_dtype is None else f' ({args.state_dtype} state)'}",
        flush=True)
    compile_seconds = finish_compile()
    if compile_seconds is not None:
        say(f"compiled in {compile_seconds:.1f} s", flush=True)
    if comm is not None:
        comm.barrier()  # the other ranks load what rank 0 compiled
    model = training.build_network(seed=args.seed, device=device,
                                   sync_batchnorm=comm is not None)
    checkpoint = None
    if args.checkpoint is not None:
        os.makedirs(args.checkpoint, exist_ok=True)
        checkpoint = os.path.join(args.checkpoint, "checkpoint.npz")
        if os.path.exists(checkpoint):
            say(f"continuing from {checkpoint}", flush=True)
    report, close = progress_bar(args.epochs, root and not args.no_progress)
    if not root:
        report = None
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        watchdog = None
        if comm is not None:
            from .. import distributed

            watchdog = stack.enter_context(distributed.Watchdog(args.timeout, "training"))
        history = training.train(model, splits, args.epochs, args.optimizer, seed=args.seed,
                                 patience=args.patience, progress=report, comm=comm,
                                 checkpoint=checkpoint, watchdog=watchdog,
                                 state_dtype=args.state_dtype)
    total = time.perf_counter() - start
    close()
    train_accuracy = training.accuracy(model, X_train, y_train)
    dev_accuracy = training.accuracy(model, X_dev, y_dev)
    say(f"train accuracy: {train_accuracy:.3f}  dev accuracy: {dev_accuracy:.3f}")
    say("diagnosis: " + diagnosis(1 - train_accuracy, 1 - dev_accuracy))
    seconds = history.epoch_seconds
    say(f"time: {total:.2f} s for {len(seconds)} epochs; first epoch {seconds[0]:.3f} s, "
        f"then {np.median(seconds[1:] or seconds) * 1e3:.1f} ms per epoch")
    if args.compare and root:
        compare(splits, args.epochs, args.seed, np.median(seconds[1:] or seconds))
    if root:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "curves.png")
        plot(history, path)
        say(f"curves: {path}")
    say(f"test accuracy: {training.accuracy(model, X_test, y_test):.3f}")
    return 0


def compare(splits, epochs, seed, fastdl_epoch):
    """Train the NumPy textbook version of the demo network (Adam, lr 2e-3 decaying as the
    demo's, L2 1e-4, the same mini-batches, no early stopping) and print its time per epoch
    against ``fastdl_epoch`` (seconds) and its accuracies."""
    (X_train, y_train), (X_dev, y_dev), (X_test, y_test) = splits
    lr0 = training.OPTIMIZERS["adam"][1]
    net = TextbookNetwork([64, *training.HIDDEN, 10], dropout=0.1, seed=seed, lr=lr0,
                          weight_decay=1e-4)
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        net.lr = lr0 / (1 + training.LR_DECAY_RATE * epoch)
        for X, y in data.minibatches(X_train, y_train, 64, seed=seed * 1000 + epoch):
            net.train_step(X, y)
        times.append(time.perf_counter() - start)
    print(f"numpy textbook: {np.median(times) * 1e3:.1f} ms per epoch "
          f"({np.median(times) / fastdl_epoch:.1f}x fastdl's time), dev accuracy "
          f"{net.accuracy(X_dev, y_dev):.3f}, test accuracy {net.accuracy(X_test, y_test):.3f}")
