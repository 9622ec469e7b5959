"""Learning-rate decay: plain callables ``epoch -> lr`` (epochs counted from 0).

Use them between steps: ``opt.lr = schedule(epoch)``. For a population of K models the
numeric parameters (lr0, decay_rate, base, k, factor) may be length-K arrays: the schedule
then returns K learning rates, one per model.
"""

import bisect
import math

from . import _validate

__all__ = ["exponential", "inverse_sqrt", "inverse_time", "piecewise", "staircase"]


# Every numeric parameter: a finite number >= 0, or a 1-D array of them (one per model).
_RULE = _validate.finite_nonnegative


def _epoch(epoch):  # epochs count from 0
    return _validate.integer(epoch, "epoch", minimum=0)


def inverse_time(lr0, decay_rate):
    """``lr0 / (1 + decay_rate * epoch)``."""
    lr0 = _validate.number_or_per_model(lr0, "lr0", _RULE)
    decay_rate = _validate.number_or_per_model(decay_rate, "decay_rate", _RULE)

    def schedule(epoch):
        return lr0 / (1 + decay_rate * _epoch(epoch))

    return schedule


def exponential(lr0, base=0.95):
    """``lr0 * base ** epoch``."""
    lr0 = _validate.number_or_per_model(lr0, "lr0", _RULE)
    base = _validate.number_or_per_model(base, "base", _RULE)

    def schedule(epoch):
        return lr0 * base ** _epoch(epoch)

    return schedule


def inverse_sqrt(lr0, k=1.0):
    """``lr0 * k / sqrt(epoch + 1)``."""
    lr0 = _validate.number_or_per_model(lr0, "lr0", _RULE)
    k = _validate.number_or_per_model(k, "k", _RULE)

    def schedule(epoch):
        return lr0 * k / math.sqrt(_epoch(epoch) + 1)

    return schedule


def staircase(lr0, factor, step_size):
    """``lr0 * factor ** (epoch // step_size)``: a discrete step every ``step_size`` epochs."""
    lr0 = _validate.number_or_per_model(lr0, "lr0", _RULE)
    factor = _validate.number_or_per_model(factor, "factor", _RULE)
    step_size = _validate.integer(step_size, "step_size", minimum=1)

    def schedule(epoch):
        return lr0 * factor ** (_epoch(epoch) // step_size)

    return schedule


def piecewise(boundaries, values):
    """``values[i]`` for ``boundaries[i-1] <= epoch < boundaries[i]``.

    ``len(values) == len(boundaries) + 1``; boundaries strictly increasing.
    """
    boundaries = [_validate.integer(b, f"boundaries[{i}] (an epoch)")
                  for i, b in enumerate(boundaries)]
    values = [_validate.number_or_per_model(v, f"values[{i}]", _RULE) for i, v in enumerate(values)]
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"values must have len(boundaries) + 1 = {len(boundaries) + 1} "
                         f"entries; got {len(values)}")
    if any(b >= c for b, c in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must be strictly increasing; got {boundaries}")

    def schedule(epoch):
        return values[bisect.bisect_right(boundaries, _epoch(epoch))]

    return schedule
