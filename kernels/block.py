"""The fused batch norm - ReLU - dropout block on the CPU: ``fastdl.nn.Sequential`` runs each
``BatchNorm``, ``ReLU``, ``Dropout`` run of its layers through these two passes in training
(batch-first inputs (N, C), one model or a population), in place of the five elementwise passes
of the three layers (``fastdl._block`` says when).

Forward, after batch norm's statistics (``batchnorm.channel_moments``), one pass over the rows
layout (K, N, C) of ``kernels/batchnorm.py``::

    a = relu((z - mean) * scale + shift) * (dscale_k if keep else 0)

with batch norm's per-channel coefficients and dropout's keep bit of the element's index
(``dropout._keep_cpu``, the counter-based hash), each step the float operations of the layer's
own kernel in its order: the layers' bits. The mask is not stored.

Backward, one pass before batch norm's own backward, from the block's output ``a``::

    d = da * (dscale_k if a > 0 else 0)

which is dropout's backward then ReLU's: ``a > 0`` exactly where the element was kept and the
ReLU's input was positive (dscale_k >= 1), and elsewhere both give ``da * 0`` (0, or NaN for a
non-finite da). So neither the mask nor the ReLU's input is read again. (One difference: the
layers compute ``da * dscale`` before ReLU's factor 0, which overflows to NaN for |da| above
FLT_MAX / dscale; here such an element's gradient is 0, its true value.)
"""

from numba import prange

from . import config
from .config import cpu_kernel_pair
from .dropout import _chunk_end, _keep_cpu


def _affine_relu_dropout_rows(x, items, mean, scale, shift, keys_low, keys_high, model_stride,
                              offset, thresholds, dscales, y):
    """x, y: (K, N, C); items (n, 3) = (model, first row, end row), as batch norm's rows plan.
    Element (o, c) of model k has the dropout index k * model_stride + offset + o * C + c
    (``offset``: where the rows sit in a global batch, data-parallel training)."""
    n_channels = x.shape[2]
    for w in prange(items.shape[0]):
        k = items[w, 0]
        mu, s, t = mean[k], scale[k], shift[k]
        key_low, key_high, threshold, dscale = keys_low[k], keys_high[k], thresholds[k], dscales[k]
        zero = dscale - dscale
        for o in range(items[w, 1], items[w, 2]):
            xr, yr = x[k, o], y[k, o]
            first = k * model_stride + offset + o * n_channels
            for c in range(n_channels):
                v = (xr[c] - mu[c]) * s[c] + t[c]  # batch norm's affine
                r = v if (v >= zero or v != v) else zero  # np.maximum(v, 0): NaN propagates
                keep = _keep_cpu(first + c, key_low, key_high, threshold)
                yr[c] = r * (dscale if keep else zero)  # dropout's y = x * (scale or 0)


def _relu_dropout_grad(dy, y, dscales, chunk, dx):
    """dx = dy * (dscales[k] if y > 0 else 0), for (K, n) rows; ``y`` the forward's output."""
    n_models, n = dy.shape
    chunks_per_model = (n + chunk - 1) // chunk
    for item in prange(n_models * chunks_per_model):
        k, c = item // chunks_per_model, item % chunks_per_model
        dscale = dscales[k]
        zero = dscale - dscale
        lo, hi = c * chunk, _chunk_end(c, chunk, n)
        dys, ys, dxs = dy[k, lo:hi], y[k, lo:hi], dx[k, lo:hi]
        for j in range(hi - lo):
            dxs[j] = dys[j] * (dscale if ys[j] > zero else zero)


affine_relu_dropout_rows_serial, affine_relu_dropout_rows_parallel = cpu_kernel_pair(
    _affine_relu_dropout_rows)
relu_dropout_grad_serial, relu_dropout_grad_parallel = cpu_kernel_pair(_relu_dropout_grad)

CHUNK = 65_536  # elements per work item, as dropout's


def affine_relu_dropout(plan, x, mean, scale, shift, keys_low, keys_high, model_stride, offset,
                        run, run_stride, thresholds, dscales, y):
    """The forward pass over x and y viewed as ``plan.view_shape`` (K, N, C) (a rows plan of
    ``batchnorm.plan``); per-channel coefficients (K, C) and per-model dropout keys (int64),
    thresholds (int64) and scales (x's dtype), as ``fastdl.dropout`` makes them (a model's rows
    are one run: ``run`` and ``run_stride`` are not needed)."""
    kernel = affine_relu_dropout_rows_parallel if plan.parallel \
        else affine_relu_dropout_rows_serial
    kernel(x, plan.items, mean, scale, shift, keys_low, keys_high, model_stride, offset,
           thresholds, dscales, y)


def relu_dropout_grad(dy, y, n_models, dscales, dx):
    """The backward pass: dy, y, dx each viewed as (K, n) rows."""
    kernel = relu_dropout_grad_parallel if config.use_parallel(dy.size) \
        else relu_dropout_grad_serial
    kernel(dy.reshape(n_models, -1), y.reshape(n_models, -1), dscales, CHUNK,
           dx.reshape(n_models, -1))
