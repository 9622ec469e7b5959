"""Gradient checking, as the notes teach it: two-sided numerical gradients and the relative
difference ``||analytic - numeric|| / (||analytic|| + ||numeric||)``: about 1e-7 is right,
1e-5 worth a look, 1e-3 or more a bug. Run it in float64, with dropout off (or its mask held
fixed), on the CPU.

    diffs = fd.gradcheck.check_layer(fd.nn.Linear(5, 3, dtype=np.float64), x)
    assert max(diffs.values()) < 1e-7
"""

import numpy as np

from . import _validate
from .device import to_host
from .nn import Layer


def numerical_gradient(f, x, eps=1e-6):
    """d f() / d x by central differences ``(f(x + eps) - f(x - eps)) / (2 eps)``, one element
    at a time; ``x`` (a NumPy array) is perturbed in place and restored."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array; got {_validate.describe(x)}")
    eps = _validate.number(eps, "eps", _validate.positive)
    grad = np.empty(x.shape, np.float64)
    flat, out = x.reshape(-1), grad.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous (it is perturbed in place)")
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        plus = float(f())
        flat[i] = keep - eps
        minus = float(f())
        flat[i] = keep
        out[i] = (plus - minus) / (2 * eps)
    return grad


def relative_difference(analytic, numeric):
    """``||analytic - numeric|| / (||analytic|| + ||numeric||)`` (0 when both are 0)."""
    analytic = np.asarray(to_host(analytic), np.float64)
    numeric = np.asarray(numeric, np.float64)
    if analytic.shape != numeric.shape:  # never broadcast one against the other
        raise ValueError(f"analytic and numeric must have one shape; got {analytic.shape} and "
                         f"{numeric.shape}")
    scale = np.linalg.norm(analytic) + np.linalg.norm(numeric)
    return 0.0 if scale == 0 else float(np.linalg.norm(analytic - numeric) / scale)


def check_layer(layer, x, target=None, loss=None, eps=1e-6, seed=0):
    """Relative differences between ``layer``'s backward and numerical gradients, for the
    input (key "x") and each of ``layer.params()`` (keys "params[i]").

    Without ``loss`` the scalar checked is ``sum(layer.forward(x) * r)`` for a fixed random
    ``r``, or, for a loss layer given a ``target``, ``layer.forward(x, target)``. With a loss
    layer ``loss`` (and ``target``), a network is checked end to end:
    ``loss.forward(layer.forward(x), target)``.
    """
    for name, value in [("layer", layer), ("loss", loss)]:
        if not isinstance(value, Layer) and not (name == "loss" and value is None):
            raise TypeError(f"{name} must be a fastdl.nn layer; got {_validate.describe(value)}")
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array; got {_validate.describe(x)}")
    eps = _validate.number(eps, "eps", _validate.positive)  # checked before the layer runs
    x = np.array(x, order="C")  # a copy, perturbed in place
    is_loss = target is not None and loss is None

    def scalar():
        if is_loss:
            return float(np.sum(layer.forward(x, target)))
        y = layer.forward(x)
        if loss is not None:
            return float(np.sum(loss.forward(y, target)))
        return float(np.sum(y * r))

    if is_loss:
        r = None
        layer.forward(x, target)
        dx = layer.backward()
    else:
        y = layer.forward(x)
        r = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
        if loss is not None:
            loss.forward(y, target)
            dx = layer.backward(loss.backward())
        else:
            dx = layer.backward(r)
    analytic = [np.array(to_host(dx))] + [np.array(to_host(g)) for g in layer.grads()]
    wrt = [x] + list(layer.params())
    names = ["x"] + [f"params[{i}]" for i in range(len(wrt) - 1)]
    return {name: relative_difference(a, numerical_gradient(scalar, p, eps))
            for name, a, p in zip(names, analytic, wrt)}
