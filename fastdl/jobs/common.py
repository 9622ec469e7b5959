"""What the jobs share: the device a command runs on, a description of the machine, and the
progress report of a training run."""

import platform
import sys

import numpy as np

from ..device import get_device, require_cuda, set_device


def torch_available():
    """True when PyTorch is installed (the ``compare`` extra): a baseline, never required."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


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
    if torch_available():
        import torch

        versions += f", torch {torch.__version__}"
    return f"{cpu}, {numba.get_num_threads()} threads; Python {platform.python_version()}, " \
           f"{versions}"


def select_device(name, program):
    """Select device ``name`` ("auto", "cpu", "cuda") for a command and say which it is (the
    command's first line: ``device: cpu (<machine>)``); None, with the reason on stderr, when
    a GPU was asked for and none is usable."""
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
    on disk yet, so that a first run does not sit silent while numba compiles."""
    from fastdl.kernels import batchnorm, config, dropout, optim, pointers, softmax  # noqa: F401

    if not config.cached_on_disk(kernel_names):
        print(f"compiling fastdl's kernels for this machine, once: about {seconds} s",
              flush=True)
