"""Argument checks shared by the public API. Every error names the argument, what was expected
and what came; checks run before anything is modified."""

import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def describe(x):
    """A short description of a value for an error message."""
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def float_dtype(dtype, argument):
    """``dtype`` as a NumPy float32/float64 dtype, or a TypeError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{argument} must be float32 or float64; got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{argument} must be float32 or float64; got {dt}")
    return dt


def is_real_scalar(x):
    return isinstance(x, numbers.Real) or (isinstance(x, np.ndarray) and x.ndim == 0
                                           and x.dtype.kind in "biuf")


def hyperparameter(value, argument, n_models, check, flag=False):
    """A hyperparameter as a float64 array of shape (n_models,).

    ``value`` is a real scalar, or (population runs, ``n_models`` not None) a length-K
    sequence. ``check(array) -> bool array`` tells which values are allowed; a failure raises
    ValueError naming ``argument`` and ``check.__doc__`` (the allowed range).
    """
    if flag:
        if isinstance(value, (bool, np.bool_)):
            return np.full(n_models or 1, float(value))
        values = np.asarray(value)
        if values.dtype != np.bool_:
            raise TypeError(f"{argument} must be a bool{_or_k(n_models)}; got {describe(value)}")
    elif is_real_scalar(value) and not isinstance(value, (bool, np.bool_)):
        values = np.float64(value)
    else:
        if isinstance(value, (str, bytes, bool, np.bool_)) or value is None:
            raise TypeError(f"{argument} must be a real number{_or_k(n_models)}; "
                            f"got {describe(value)}")
        values = np.asarray(value)
        if values.dtype.kind not in "iuf":
            raise TypeError(f"{argument} must be a real number{_or_k(n_models)}; "
                            f"got {describe(value)}")
    if values.ndim == 1 and n_models is None:
        raise ValueError(f"{argument} has shape {values.shape}: a per-model (K,) "
                         f"hyperparameter needs population=True")
    if values.ndim > 1 or (values.ndim == 1 and values.shape[0] != n_models):
        raise ValueError(f"{argument} must be a scalar or have shape ({n_models},) (one value "
                         f"per model); got shape {values.shape}")
    values = np.broadcast_to(values.astype(np.float64), (n_models or 1,)).copy()
    if check is not None and not np.all(check(values)):
        bad = float(values[~check(values)][0])
        raise ValueError(f"{argument} must be {check.__doc__}; got {bad!r}")
    return values


def _or_k(n_models):
    return f" or a length-{n_models} array" if n_models else ""


def nonnegative(x):
    """>= 0"""
    return x >= 0


def positive(x):
    """> 0 and finite"""
    return (x > 0) & np.isfinite(x)


def unit_interval(x):
    """in [0, 1)"""
    return (x >= 0) & (x < 1)


def closed_unit_interval(x):
    """in [0, 1]"""
    return (x >= 0) & (x <= 1)


def finite(x):
    """finite"""
    return np.isfinite(x)
