"""Learning-rate decay: plain callables ``epoch -> lr`` (epochs counted from 0).

Use them between steps: ``opt.lr = schedule(epoch)``. For a population of K models the
numeric parameters (lr0, decay_rate, base, k, factor) may be length-K arrays: the schedule
then returns K learning rates, one per model.
"""

import bisect
import math
import numbers

import numpy as np

__all__ = ["exponential", "inverse_sqrt", "inverse_time", "piecewise", "staircase"]


def _number(value, argument, low=None, low_inclusive=True):
    if isinstance(value, (np.ndarray, list, tuple)):  # one value per model
        values = np.asarray(value, np.float64) if np.ndim(value) == 1 else None
        if values is None or values.dtype.kind != "f":
            raise TypeError(f"{argument} must be a real number or a 1-D array of them; got "
                            f"{value!r}")
        for v in values:
            _number(float(v), argument, low, low_inclusive)
        return values
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argument} must be a real number; got {type(value).__name__} "
                        f"{value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{argument} must be finite; got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"{argument} must be {bound} {low}; got {value!r}")
    return value


def _epoch(epoch):
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
        raise TypeError(f"epoch must be an int; got {type(epoch).__name__} {epoch!r}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0 (epochs count from 0); got {epoch}")
    return int(epoch)


def inverse_time(lr0, decay_rate):
    """``lr0 / (1 + decay_rate * epoch)``."""
    lr0 = _number(lr0, "lr0", 0)
    decay_rate = _number(decay_rate, "decay_rate", 0)

    def schedule(epoch):
        return lr0 / (1 + decay_rate * _epoch(epoch))

    return schedule


def exponential(lr0, base=0.95):
    """``lr0 * base ** epoch``."""
    lr0 = _number(lr0, "lr0", 0)
    base = _number(base, "base", 0)

    def schedule(epoch):
        return lr0 * base ** _epoch(epoch)

    return schedule


def inverse_sqrt(lr0, k=1.0):
    """``lr0 * k / sqrt(epoch + 1)``."""
    lr0 = _number(lr0, "lr0", 0)
    k = _number(k, "k", 0)

    def schedule(epoch):
        return lr0 * k / math.sqrt(_epoch(epoch) + 1)

    return schedule


def staircase(lr0, factor, step_size):
    """``lr0 * factor ** (epoch // step_size)``: a discrete step every ``step_size`` epochs."""
    lr0 = _number(lr0, "lr0", 0)
    factor = _number(factor, "factor", 0)
    if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral):
        raise TypeError(f"step_size must be an int; got {type(step_size).__name__}")
    if step_size < 1:
        raise ValueError(f"step_size must be >= 1; got {step_size}")

    def schedule(epoch):
        return lr0 * factor ** (_epoch(epoch) // step_size)

    return schedule


def piecewise(boundaries, values):
    """``values[i]`` for ``boundaries[i-1] <= epoch < boundaries[i]``.

    ``len(values) == len(boundaries) + 1``; boundaries strictly increasing.
    """
    boundaries = list(boundaries)
    values = list(values)
    for i, b in enumerate(boundaries):
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise TypeError(f"boundaries[{i}] must be an int epoch; got {type(b).__name__}")
    for i, v in enumerate(values):
        _number(v, f"values[{i}]", 0)
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"values must have len(boundaries) + 1 = {len(boundaries) + 1} "
                         f"entries; got {len(values)}")
    if any(b >= c for b, c in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must be strictly increasing; got {boundaries}")

    def schedule(epoch):
        return values[bisect.bisect_right(boundaries, _epoch(epoch))]

    return schedule
