"""fastdl: fused, compiled training kernels for deep networks (Numba on the CPU, CUDA on GPUs).

Importing fastdl compiles nothing and does not import numba; kernels compile on first use and
are cached on disk.
"""

from . import nn, optim, schedules
from .averages import ewa
from .batchnorm import BatchNormCache, batch_norm_backward, batch_norm_forward
from .device import cuda_available, get_device, set_device, to_device, to_host, use_device

__version__ = "0.1.0"

__all__ = [
    "BatchNormCache",
    "batch_norm_backward",
    "batch_norm_forward",
    "cuda_available",
    "ewa",
    "get_device",
    "nn",
    "optim",
    "schedules",
    "set_device",
    "to_device",
    "to_host",
    "use_device",
]
