"""Inverted dropout for CUDA GPUs, beside ``kernels/dropout.py``.

The mask bit of element ``i`` is ``uniform_bits(i, key) >= threshold``: the generator of the
CPU kernels (``kernels/dropout.py``), compiled as a device function, so the mask of a seed is
the same on the GPU as on the CPU whatever the grid. Grid-stride over flat arrays: neighbour
threads take neighbour elements (coalesced); model k owns elements [k * n, (k + 1) * n).
"""

import numpy as np
from numba import types

from .cudalib import THREADS_PER_BLOCK, array, cuda, device_function, kernel, launch
from .dropout import uniform_bits

DTYPES = (np.float32, np.float64)
I64 = types.int64

_uniform_bits = device_function(uniform_bits)


@kernel([(array(d), array(np.int64), array(np.int64), I64, I64, I64, I64, array(np.int64),
          array(d), I64, array(d), array(np.bool_)) for d in DTYPES])
def dropout_forward_cuda(x, keys_low, keys_high, model_stride, offset, run, run_stride,
                         thresholds, scales, per_model, y, mask):
    """mask = bits of (k * model_stride + offset + (j // run) * run_stride + j % run, key k)
    >= thresholds[k] for element j of model k (as kernels/dropout.py); y = x * scales[k] where
    kept, x * 0 where dropped."""
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        k = i // per_model
        j = i % per_model
        index = k * model_stride + offset + (j // run) * run_stride + j % run
        keep = _uniform_bits(index, keys_low[k], keys_high[k]) >= thresholds[k]
        scale = scales[k]
        mask[i] = keep
        y[i] = x[i] * (scale if keep else scale - scale)


@kernel([(array(d), array(np.bool_), array(d), I64, array(d)) for d in DTYPES])
def dropout_backward_cuda(dy, mask, scales, per_model, dx):
    """dx = dy * mask * scales[k]."""
    for i in range(cuda.grid(1), dy.shape[0], cuda.gridsize(1)):
        scale = scales[i // per_model]
        dx[i] = dy[i] * (scale if mask[i] else scale - scale)


# -- launchers (device arrays, checked by fastdl.dropout) ---------------------------------------


def forward(x, keys_low, keys_high, model_stride, offset, run, run_stride, thresholds, scales,
            per_model, y, mask):
    """One launch over flat device arrays (``per_model`` elements a model; keys, thresholds
    and scales (K,) device arrays): :func:`dropout_forward_cuda`."""
    launch(dropout_forward_cuda, -(-x.shape[0] // THREADS_PER_BLOCK), x, keys_low, keys_high,
           model_stride, offset, run, run_stride, thresholds, scales, per_model, y, mask)


def backward(dy, mask, scales, per_model, dx):
    """One launch over flat device arrays: :func:`dropout_backward_cuda`."""
    launch(dropout_backward_cuda, -(-dy.shape[0] // THREADS_PER_BLOCK), dy, mask, scales,
           per_model, dx)
