"""Fused runs of layers for :class:`fastdl.nn.Sequential`: each ``BatchNorm`` - ``ReLU`` -
``Dropout`` run of its layers (the demo network's block after a Linear) trains as one unit.

In training, on the CPU, with the channels on the last axis of a per-model input (batch-first
(N, C), one model or a population), the unit's forward is batch norm's statistics and one
pass ``a = dropout(relu(batch norm(z)))``, and its backward one pass ``d = da * (scale if a > 0
else 0)`` (dropout's and ReLU's backward) before batch norm's backward: two passes over the
activations instead of the five elementwise passes of the three layers (and three fewer
layer calls), with the layers' results bit for bit (kernels/block.py says why). Elsewhere (eval
mode, the GPU, other layouts) the unit runs its three layers, as Sequential would.

The layers keep their state as after their own calls: batch norm its cache and running
statistics, dropout its call count (the next call's masks); dropout's mask and ReLU's input
are not kept, so those two layers' own ``backward`` after a fused forward is an error
("needs a forward first"), never a wrong gradient.
"""

import numpy as np

from . import _validate
from .batchnorm import _forward
from .dropout import mask_draw


def units(layers, pattern):
    """``layers`` with each run of the classes ``pattern`` (fastdl.nn's BatchNorm, ReLU,
    Dropout, which nn passes: this module does not import nn) replaced by one
    :class:`NormReluDropout`."""
    out, i = [], 0
    while i < len(layers):
        run = layers[i:i + 3]
        if len(run) == 3 and tuple(type(layer) for layer in run) == tuple(pattern):
            out.append(NormReluDropout(*run))
            i += 3
        else:
            out.append(layers[i])
            i += 1
    return out


class NormReluDropout:
    """One BatchNorm - ReLU - Dropout run of a Sequential (see the module docstring):
    ``forward(x)`` and ``backward(dout)`` as the three layers' in turn."""

    def __init__(self, norm, relu, dropout):
        self.layers = (norm, relu, dropout)
        self._fused = False
        self._y = self._scales = None

    def _fusable(self, x, rows):
        norm, _, dropout = self.layers
        if not (norm.training and dropout.training and isinstance(x, np.ndarray)
                and x.dtype in (np.float32, np.float64)
                and norm.population == dropout.population):
            return False
        per_model_rank = x.ndim - (norm.population is not None)
        # the rows layout, and in data-parallel training its examples along the first axis
        return (per_model_rank >= 2 and norm.channel_axis % per_model_rank == per_model_rank - 1
                and (rows is None or rows[2:] in ((), (0,))))

    def forward(self, x, rows=None):
        self._fused = self._fusable(x, rows)
        norm, relu, dropout = self.layers
        if not self._fused:
            return dropout.forward(relu.forward(norm.forward(x)), rows)
        population = norm.population is not None
        _, _, draw = mask_draw(x, dropout.p, dropout._next_seed(), population, rows)
        y, norm._cache = _forward(
            x, norm.gamma, norm.beta, norm.running_mean, norm.running_var, True, norm.momentum,
            norm.eps, norm.channel_axis, population, dropout._out_like("y", x),
            relu_dropout=draw, comm=norm._comm())
        dropout.calls += 1
        dropout._mask = relu._saved = None  # not kept: see the module docstring
        self._y, self._scales = y, draw.scales
        return y

    def backward(self, dout):
        if not self._fused:
            for layer in reversed(self.layers):
                dout = layer.backward(dout)
            return dout
        from fastdl.kernels import block

        norm, _, dropout = self.layers
        y = self._y
        _validate.layer_input(dout, "dout", y.ndim, y.dtype, "cpu", expected_shape=y.shape)
        _validate.float_array(dout, "dout", ranks=(0, None))  # C-contiguous, as dropout's
        d = dropout._out_like("dx", dout)
        block.relu_dropout_grad(dout, y, len(self._scales), self._scales, d)
        return norm.backward(d)

    def __repr__(self):
        return f"NormReluDropout{self.layers}"
