"""fastdl: fused, compiled training kernels for deep networks (Numba on the CPU, CUDA on GPUs).

Importing fastdl compiles nothing and does not import numba; kernels compile on first use and
are cached on disk.
"""

from . import data, gradcheck, nn, optim, schedules, training, tune
from .averages import ewa
from .batchnorm import BatchNormCache, batch_norm_backward, batch_norm_forward
from .device import (
    cpu_threads,
    cuda_available,
    get_device,
    set_device,
    to_device,
    to_host,
    use_device,
)
from .dropout import dropout_backward, dropout_forward
from .softmax import log_softmax, softmax, softmax_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "BatchNormCache",
    "batch_norm_backward",
    "batch_norm_forward",
    "cpu_threads",
    "cuda_available",
    "data",
    "dropout_backward",
    "dropout_forward",
    "ewa",
    "get_device",
    "gradcheck",
    "log_softmax",
    "nn",
    "optim",
    "schedules",
    "set_device",
    "softmax",
    "softmax_cross_entropy",
    "to_device",
    "to_host",
    "training",
    "tune",
    "use_device",
]
