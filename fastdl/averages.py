"""Exponentially weighted averages (the idea behind Momentum, RMSprop, Adam and EMA weights)."""

import numpy as np

from . import _validate


def ewa(values, beta, bias_correction=True):
    """Running averages of a 1-D series: ``v_t = beta * v_{t-1} + (1 - beta) * theta_t``, v_0 = 0.

    With ``bias_correction`` each v_t is divided by ``1 - beta**t`` (t from 1), which removes
    the start-up bias towards 0. Returns a float64 array (float32 for float32 input) of the
    series' length.
    """
    series = np.asarray(values)
    if series.dtype.kind not in "iuf":
        raise TypeError(f"values must be real numbers; got dtype {series.dtype}")
    if series.ndim != 1:
        raise ValueError(f"values must be 1-D; got shape {series.shape}")
    beta = _validate.number(beta, "beta", _validate.unit_interval)
    dtype = series.dtype if series.dtype == np.float32 else np.float64
    out = np.empty(series.shape, dtype)
    v = 0.0
    for t, theta in enumerate(series.astype(np.float64), start=1):
        v = beta * v + (1 - beta) * theta
        out[t - 1] = v / (1 - beta ** t) if bias_correction else v
    return out
