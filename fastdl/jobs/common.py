"""What the jobs share: the device a command runs on, a description of the machine, the
progress report of a training run, and compiling a run's kernels ahead of it."""

import multiprocessing
import os
import platform
import sys
import time

import numpy as np

from ..device import get_device, require_cuda, set_device


def torch_version():
    """PyTorch's version when it is installed (the ``compare`` extra: a baseline, never
    required), else None; read from its metadata, without importing it (1.2 s)."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def machine_description():
    """``"<CPU model>, <n> threads; Python <v>, numpy <v>, numba <v>[, torch <v>]"``."""
    import numba

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith(
                "model name"))
    except (OSError, StopIteration):
        pass
    versions = f"numpy {np.__version__}, numba {numba.__version__}"
    if torch_version() is not None:
        versions += f", torch {torch_version()}"
    return f"{cpu}, {numba.get_num_threads()} threads; Python {platform.python_version()}, " \
           f"{versions}"


def select_device(name, program, announce=True):
    """Select device ``name`` ("auto", "cpu", "cuda") for a command and say which it is (the
    command's first line: ``device: cpu (<machine>)``, when ``announce``); None, with the
    reason on stderr, when a GPU was asked for and none is usable."""
    set_device(name)
    device = get_device()
    if device == "cuda":
        try:
            require_cuda()
        except RuntimeError as error:
            print(f"{program}: {error}", file=sys.stderr)
            return None
    if announce:
        print(f"device: {device} ({machine_description()})", flush=True)
    return device


def progress_bar(epochs, enabled=True):
    """``(report, close)``: ``report(epoch, history)`` after each epoch of a training run
    (a tqdm bar showing the loss and dev accuracy; a line per epoch without tqdm or when not
    ``enabled``), ``close()`` at the end."""
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


def compile_notice(kernel_names, seconds):
    """Print "compiling fastdl's kernels for this machine, once: about <seconds> s" when the
    CPU kernels ``kernel_names`` (names in ``fastdl.kernels.config.REGISTRY``) are not cached
    on disk yet, so that a first run does not sit silent while numba compiles. Returns whether
    it printed (the kernels are not cached)."""
    from fastdl.kernels import (  # noqa: F401  (importing registers the kernels)
        batchnorm,
        block,
        config,
        dense,
        dropout,
        optim,
        pointers,
        softmax,
    )

    if config.cached_on_disk(kernel_names):
        return False
    print(f"compiling fastdl's kernels for this machine, once: about {seconds} s", flush=True)
    return True


def compile_ahead(kernel_names, seconds, here, beside, *args):
    """Compile a run's CPU kernels before it, on two processes, when they are not cached yet.

    numba compiles one kernel at a time in a process (a global lock), so a cold run leaves the
    second core idle for seconds. Here, when :func:`compile_notice` finds ``kernel_names``
    uncached, ``beside(*args)`` starts at once in a spawned process (spawned: no OpenMP pool
    is forked) and ``here(*args)`` runs in this one when the returned function is called; each
    runs a tiny workload that compiles its share of the kernels into numba's disk cache, where
    the run then finds them all. Start it early: the other process's start-up (importing
    numba) overlaps this one's work until then.

    Returns ``finish()``: runs ``here``, waits for the other process and returns the seconds
    since this call, or None when there was nothing to compile. ``here`` and ``beside`` are
    module-level functions (a spawned process imports them). On one CPU, or with no disk cache
    to share (``config.CACHE``), both run here. A failure in the other process costs only
    time: whatever it did not compile compiles on first use.
    """
    from fastdl.kernels import config

    start = time.perf_counter()
    if not compile_notice(kernel_names, seconds):
        return lambda: None
    helper = None
    if config.CACHE and len(os.sched_getaffinity(0)) > 1:
        helper = multiprocessing.get_context("spawn").Process(target=beside, args=args,
                                                              daemon=True)
        helper.start()

    def finish():
        here(*args)
        if helper is None:
            beside(*args)
        else:
            helper.join()
        return time.perf_counter() - start

    return finish
