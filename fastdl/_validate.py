"""fastdl's one validation layer: every public entry point checks its arguments here, before
anything is modified.

Errors follow SPEC.md: ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong
shape, length, value or range (an unknown option included); both name the argument, what was
expected and what came.
"""

import bisect
import math
import numbers
import operator

import numpy as np

from .device import get_device, is_device_array, location, require_cuda

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def describe(x):
    """A short description of a value for an error message."""
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


# -- scalars ------------------------------------------------------------------------------------

def is_real_scalar(x):
    return isinstance(x, numbers.Real) or (isinstance(x, np.ndarray) and x.ndim == 0
                                           and x.dtype.kind in "biuf")


def number(value, argument, check=None):
    """``value`` as a Python float: a real number (not a bool), or TypeError; ``check`` (a rule
    below) says which values are allowed, else ValueError."""
    if type(value) is not float:  # a Python float (the common case) needs no type test
        if isinstance(value, (bool, np.bool_)) or not is_real_scalar(value):
            raise TypeError(f"{argument} must be a real number; got {describe(value)}")
        value = float(value)
    if check is not None and not check(value):
        raise ValueError(f"{argument} must be {check.__doc__}; got {value!r}")
    return value


def real_value(value, argument):
    """A real number given as any scalar (Python, NumPy, a 0-d host or device array) as a
    Python float; TypeError for a string, bool, None or anything float() refuses."""
    if isinstance(value, (str, bytes, bool, np.bool_)) or value is None:
        raise TypeError(f"{argument} must be a real number; got {describe(value)}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{argument} must be a real number; got {describe(value)}") from None


def integer(value, argument, minimum=None):
    """``value`` as a Python int (not a bool), or TypeError; at least ``minimum``, or
    ValueError."""
    if type(value) is not int:  # a Python int (the common case) needs no type test
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{argument} must be an int; got {describe(value)}")
        value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}; got {value}")
    return value


def number_or_per_model(value, argument, check=None):
    """A real number (as a Python float, as :func:`number`) or a 1-D array / list of them, one
    per model (as float64 (K,)); ``check`` holds for every value, else ValueError."""
    if not isinstance(value, (np.ndarray, list, tuple)):
        return number(value, argument, check)
    values = np.asarray(value)
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        raise TypeError(f"{argument} must be a real number or a 1-D array of them (one per "
                        f"model); got {describe(value)}")
    values = values.astype(np.float64)
    if check is not None and not np.all(check(values)):
        raise ValueError(f"{argument} must be {check.__doc__}; got "
                         f"{float(values[~check(values)][0])!r}")
    return values


def seed(value, argument, n_models=None):
    """A seed: an int (returned as a Python int) or, for a population (``n_models`` not None),
    also ``n_models`` ints, one per model (returned as a list of Python ints)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if n_models is not None and not isinstance(value, (str, bytes)) and np.ndim(value) == 1:
        seeds = np.asarray(value)
        if len(seeds) == n_models and seeds.dtype.kind in "iu":
            return [int(s) for s in seeds]
        raise ValueError(f"{argument} must be an int or {n_models} ints (one per model); got "
                         f"{describe(value)}")
    raise TypeError(f"{argument} must be an int{' or one int per model' * (n_models is not None)}"
                    f"; got {describe(value)}")


def layer_device(value, argument="device"):
    """A layer's ``device=``: None (the selected device, :func:`fastdl.get_device`), "cpu" or
    "cuda"."""
    return get_device() if value is None else option(value, argument, ("cpu", "cuda"))


def flag(value, argument):
    """``value`` as a Python bool, or TypeError."""
    if type(value) is bool:  # the common case, first
        return value
    if not isinstance(value, np.bool_):
        raise TypeError(f"{argument} must be a bool; got {describe(value)}")
    return bool(value)


def option(value, argument, options):
    """``value``, one of ``options``, or ValueError naming them."""
    if not isinstance(value, type(options[0])) or value not in options:
        raise ValueError(f"{argument} must be one of {tuple(options)}; got {value!r}")
    return value


def shape(value, argument):
    """``value`` (an int or a sequence of ints >= 0) as a shape tuple."""
    if isinstance(value, (int, np.integer)):
        value = (value,)
    try:
        value = tuple(operator.index(n) for n in value)
    except TypeError:
        raise TypeError(f"{argument} must be a tuple of ints; got {value!r}") from None
    if any(n < 0 for n in value):
        raise ValueError(f"{argument} must not have negative sizes; got {value}")
    return value


def float_dtype(dtype, argument):
    """``dtype`` as a NumPy float32/float64 dtype, or a TypeError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{argument} must be float32 or float64; got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{argument} must be float32 or float64; got {dt}")
    return dt


# -- populations --------------------------------------------------------------------------------

def population_flag(population):
    """A function's ``population=`` (True: a leading axis of K models), as a bool."""
    return population if type(population) is bool else flag(population, "population")


def model_count(population):
    """A layer's ``population=`` (None, or K models), as None or an int >= 1."""
    if population is None:
        return None
    return integer(population, "population", minimum=1)


def hyperparameter(value, argument, n_models, check, flag=False):
    """A hyperparameter as a float64 array of shape (n_models,).

    ``value`` is a real scalar, or (population runs, ``n_models`` not None) a length-K
    sequence. ``check`` (a rule below, on a Python float or an array) tells which values are
    allowed; a failure raises ValueError naming ``argument`` and ``check.__doc__`` (the allowed
    range).
    """
    if type(value) is float and not flag and (check is None or check(value)):
        return np.full(n_models or 1, value)  # the common case, checked cheaply (hot paths)
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


def population_of(value, argument, a, a_argument):
    """Whether a per-model ``value`` given without a population flag means one: a 1-D value
    holds one entry per model along ``a``'s leading axis (ValueError if that axis does not
    match). Functions whose other arguments carry no flag (``dropout_backward``) ask this."""
    if np.ndim(value) != 1:
        return False
    if len(a.shape) < 1 or a.shape[0] != len(value):
        raise ValueError(f"{argument} has {len(value)} values (a population) but {a_argument} "
                         f"has shape {tuple(a.shape)}: its leading axis must be the "
                         f"{len(value)} models")
    return True


def _or_k(n_models):
    return f" or a length-{n_models} array" if n_models else ""


# Rules for number() and hyperparameter(): a docstring saying the allowed range, and a test
# of a Python float or of an array (comparisons only: NaN fails every rule, and a scalar costs
# no NumPy call on the hot paths).

def nonnegative(x):
    """>= 0"""
    return x >= 0


def positive(x):
    """> 0 and finite"""
    return (x > 0) & (x < math.inf)


def unit_interval(x):
    """in [0, 1)"""
    return (x >= 0) & (x < 1)


def closed_unit_interval(x):
    """in [0, 1]"""
    return (x >= 0) & (x <= 1)


def finite(x):
    """finite"""
    return (x > -math.inf) & (x < math.inf)


def finite_nonnegative(x):
    """finite and >= 0"""
    return (x >= 0) & (x < math.inf)


# -- arrays -------------------------------------------------------------------------------------

def c_contiguous(a):
    """Whether a NumPy or GPU array is C-contiguous."""
    if isinstance(a, np.ndarray):
        return a.flags.c_contiguous
    if hasattr(a, "is_c_contiguous"):
        return a.is_c_contiguous()
    interface = a.__cuda_array_interface__
    strides = interface.get("strides")
    if strides is None:
        return True
    expected, step = [], np.dtype(interface["typestr"]).itemsize
    for n in reversed(interface["shape"]):
        expected.append(step)
        step *= n
    return all(s == e or n == 1 for s, e, n in zip(strides, reversed(expected),
                                                    interface["shape"]))


def same_device(a, argument, device, other):
    """TypeError unless ``a`` lives on ``device``, where ``other`` says what lives, with its
    verb ("x is", "logits are", "the forward input was")."""
    where = location(a)
    if where != device:
        raise TypeError(f"{argument} is on {where} but {other} on {device}: all arrays of a "
                        "call must live on one device")


def float_array(a, argument, population=False, ranks=(1, None), device=None, other="x is",
                needs=None, contiguous=True):
    """Check a float32/float64 input array (C-contiguous unless ``contiguous`` is False);
    returns its device.

    ``ranks``: the allowed (min, max) rank of the per-model array (max None: any), after a
    leading K axis when ``population``, and ``needs`` what the axes are for ("a class axis"),
    for the error; ``device``: where the call's other arrays live (``other``: which, with its
    verb, for the error).
    """
    if device is not None:
        same_device(a, argument, device, other)
    where = location(a)
    if where == "cuda":
        require_cuda()
    elif not isinstance(a, np.ndarray):
        raise TypeError(f"{argument} must be a NumPy or GPU array; got {describe(a)}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{argument} must have dtype float32 or float64; got {a.dtype}")
    rank = len(a.shape) - (1 if population else 0)
    low, high = ranks
    if rank < low or (high is not None and rank > high):
        what = "per-model rank" if population else "rank"
        expected = f"{low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{argument} must have {what} {expected}"
                         f"{f' ({needs})' if needs else ''}"
                         f"{' after the leading model axis' * population}; got shape "
                         f"{tuple(a.shape)}")
    if population and a.shape[0] == 0:
        raise ValueError(f"{argument} has 0 models along its leading axis (population=True "
                         f"needs K >= 1); got shape {tuple(a.shape)}")
    if contiguous and not c_contiguous(a):
        raise ValueError(f"{argument} must be C-contiguous (never copied); pass "
                         f"np.ascontiguousarray({argument}) (or its device equivalent)")
    return where


def layer_input(x, argument, rank, dtype, device, expected_shape=None, models=None):
    """An input of a layer whose parameters live on ``device`` with ``dtype``: of ``rank``
    (and ``expected_shape``, if given); with ``models`` (a population's K), of ``rank`` (the
    models' shared batch) or with a leading axis of K beyond it (one batch per model)."""
    if location(x) != device:
        raise TypeError(f"{argument} is on {location(x)} but the layer's parameters are on "
                        f"{device}: move it with fd.to_device / fd.to_host")
    if device == "cpu" and not isinstance(x, np.ndarray):
        raise TypeError(f"{argument} must be a NumPy array; got {describe(x)}")
    if x.dtype != dtype:
        raise TypeError(f"{argument} must have the layer's dtype {dtype}; got {x.dtype}")
    shape = tuple(x.shape)
    if models is not None and len(shape) != rank:
        if len(shape) != rank + 1 or shape[0] != models:
            raise ValueError(f"{argument} must be the models' shared batch (rank {rank}) or "
                             f"have shape ({models}{', .' * rank}) (one batch per model); got "
                             f"shape {shape}")
    elif len(shape) != rank:
        raise ValueError(f"{argument} must have rank {rank}; got shape {shape}")
    if expected_shape is not None and tuple(x.shape) != tuple(expected_shape):
        raise ValueError(f"{argument} must have shape {tuple(expected_shape)}; got "
                         f"{tuple(x.shape)}")


def axis(value, rank, argument="axis"):
    """An axis of a rank-``rank`` array (negative counts from the end), as an int in
    [0, rank)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argument} must be an int; got {describe(value)}")
    if not -rank <= value < rank:
        raise ValueError(f"{argument} must be in [{-rank}, {rank}) for a rank-{rank} input; "
                         f"got {value}")
    return int(value) % rank


def axis_argument(value, argument, max_rank):
    """An axis given before the input's rank is known (a layer's constructor): an int (not a
    bool), TypeError, in [-max_rank, max_rank), ValueError; returned as given (resolved
    against the input's rank by :func:`axis` at forward)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argument} must be an int; got {describe(value)}")
    if not -max_rank <= value < max_rank:
        raise ValueError(f"{argument} must be in [{-max_rank}, {max_rank}) (inputs have rank "
                         f"<= {max_rank}); got {value}")
    return int(value)


def dtype_and_shape(a, argument, dtype, shape, dtype_note="", shape_note=""):
    """TypeError unless array ``a`` has ``dtype``, then ValueError unless it has ``shape``
    (the notes say more of each in the message)."""
    if a.dtype != dtype:
        raise TypeError(f"{argument} must have dtype {dtype}{dtype_note}; got {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{argument} must have shape {tuple(shape)}{shape_note}; got "
                         f"{tuple(a.shape)}")


def per_model_array(a, argument, shape, dtype, device, writable=False, other="x"):
    """A (C,) or (K, C) array of ``dtype`` on ``device`` (None passes)."""
    if a is None:
        return
    where = location(a)
    if where != device:
        raise TypeError(f"{argument} is {'a GPU array' if where == 'cuda' else 'on the host'} "
                        f"but {other} is on {device}: all arrays of a call must live on one "
                        "device")
    if where == "cpu" and not isinstance(a, np.ndarray):
        raise TypeError(f"{argument} must be a NumPy array of shape {shape}; got {describe(a)}")
    dtype_and_shape(a, argument, dtype, shape, f" like {other}", " (one value per channel"
                    f"{' and model' if len(shape) == 2 else ''})")
    if writable and not (c_contiguous(a) and (where == "cuda" or a.flags.writeable)):
        raise ValueError(f"{argument} is updated in place: it must be writable and "
                         "C-contiguous")


def class_target(target, logits, row_shape, device):
    """Cross-entropy's ``target`` for ``logits`` on ``device``: True for class indices (any
    integer dtype, shape ``row_shape``: logits' without the class axis), False for
    probabilities (logits' shape and dtype); C-contiguous."""
    same_device(target, "target", device, "logits are")
    if device == "cpu" and not isinstance(target, np.ndarray):
        raise TypeError(f"target must be a NumPy array of class indices or probabilities; "
                        f"got {describe(target)}")
    kind = np.dtype(target.dtype).kind
    if kind in "iu":
        if tuple(target.shape) != row_shape:
            raise ValueError(f"target of class indices must have shape {row_shape} (logits' "
                             f"shape without the class axis); got {tuple(target.shape)}")
    elif kind == "f":
        if target.dtype != logits.dtype:
            raise TypeError(f"target probabilities must have logits' dtype {logits.dtype}; "
                            f"got {target.dtype}")
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(f"target probabilities must have logits' shape "
                             f"{tuple(logits.shape)}; got {tuple(target.shape)}")
    else:
        raise TypeError(f"target must hold integer class indices or float probabilities; got "
                        f"dtype {target.dtype}")
    if not c_contiguous(target):
        raise ValueError("target must be C-contiguous (never copied)")
    return kind != "f"


def bool_mask(mask, argument, like, like_argument):
    """A mask read beside ``like`` (on its device, which the caller checked): an ``np.bool_``
    array of ``like``'s shape, C-contiguous."""
    if getattr(mask, "dtype", None) != np.bool_:  # a wrong type or dtype: TypeError
        raise TypeError(f"{argument} must be the forward's bool mask (dtype bool) of "
                        f"{like_argument}'s shape {tuple(like.shape)}; got {describe(mask)}")
    if tuple(mask.shape) != tuple(like.shape) or not c_contiguous(mask):
        raise ValueError(f"{argument} must be the forward's C-contiguous bool mask of "
                         f"{like_argument}'s shape {tuple(like.shape)}; got {describe(mask)}")


def examples(X, Y, axis):
    """The number of examples m of a data set: ``X`` a NumPy array with its examples along
    ``axis`` (0 or 1), ``Y`` None or a NumPy array with m along axis 0 when 1-D, else along
    ``axis``."""
    if not isinstance(X, np.ndarray):
        raise TypeError(f"X must be a NumPy array; got {describe(X)}")
    axis = integer(axis, "axis (the examples axis)")
    if axis not in (0, 1) or X.ndim < axis + 1:
        raise ValueError(f"axis (the examples axis) must be 0 or 1 and exist in X of shape "
                         f"{X.shape}; got {axis!r}")
    m = X.shape[axis]
    if Y is not None:
        if not isinstance(Y, np.ndarray):
            raise TypeError(f"Y must be a NumPy array or None; got {describe(Y)}")
        y_axis = 0 if Y.ndim == 1 else axis
        if Y.ndim <= y_axis or Y.shape[y_axis] != m:
            raise ValueError(f"Y must have X's {m} examples along axis {y_axis}; got shape "
                             f"{Y.shape}")
    return m


def check_out(out, name, like, device, like_name="x", forbid_overlap=None, reason="",
              dtype=None):
    """Check an output array ``out`` (None passes): on ``device``, of ``like``'s shape and
    dtype (or ``dtype``), writable, C-contiguous and, if given, not sharing memory with
    ``forbid_overlap`` (``reason`` says why)."""
    if out is None:
        return
    if location(out) != device:
        raise TypeError(f"{name} must live on {device} like {like_name}; got {describe(out)}")
    if device == "cpu" and not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array; got {describe(out)}")
    dtype = like.dtype if dtype is None else np.dtype(dtype)
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (and shape {tuple(like.shape)}); got "
                         f"{describe(out)}")
    if tuple(out.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)} and dtype {dtype}; "
                         f"got {describe(out)}")
    if device == "cpu" and not out.flags.writeable:
        raise ValueError(f"{name} is read-only: it is written in place, so it must be writable")
    if not c_contiguous(out):
        raise ValueError(f"{name} must be writable and C-contiguous")
    if forbid_overlap is not None and overlap(out, forbid_overlap, device):
        raise ValueError(f"{name} must not overlap {reason}")


def overlap(a, b, device):
    """Whether two arrays of one device share memory."""
    if device == "cpu":
        return np.may_share_memory(a, b)
    from fastdl.kernels.cudalib import address, as_cuda_array

    a, b = as_cuda_array(a), as_cuda_array(b)
    a0, b0 = address(a), address(b)
    return a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


def view_shape(shape, axis, population):
    """(K, outer, n, inner) of an array shape around ``axis`` (counted on the per-model shape,
    after the leading K axis of a population): the kernels' view of any rank and layout."""
    n_models = shape[0] if population else 1
    per_model = shape[1:] if population else shape
    return (n_models, math.prod(per_model[:axis]), per_model[axis],
            math.prod(per_model[axis + 1:]))


def features_like(X, mean, axis, argument="X"):
    """A split standardized with statistics ``mean`` (keepdims, of the fitted split): a NumPy
    array of real numbers (TypeError) with ``mean``'s rank and feature sizes on every axis but
    the examples ``axis`` (ValueError: never broadcast)."""
    if not isinstance(X, np.ndarray):
        raise TypeError(f"{argument} must be a NumPy array; got {describe(X)}")
    if X.dtype.kind not in "iuf":
        raise TypeError(f"{argument} must hold real numbers (integer or float dtype); got "
                        f"dtype {X.dtype}")
    features = tuple(n for i, n in enumerate(mean.shape) if i != axis)
    if X.ndim != mean.ndim or tuple(n for i, n in enumerate(X.shape) if i != axis) != features:
        raise ValueError(f"{argument} must have the fitted features {features} beside its "
                         f"examples axis {axis}; got shape {X.shape}")


def fraction_or_count(value, argument, n):
    """``value`` as a count in [1, n]: a fraction in (0, 1] (of n, rounded up) or an int in
    [1, n]; TypeError for any other type."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        if not 1 <= value <= n:
            raise ValueError(f"{argument} (a count) must be in [1, {n}] (the number of "
                             f"results); got {value}")
        return int(value)
    fraction = number(value, f"{argument} (a fraction, or an int count)")
    if not 0 < fraction <= 1:
        raise ValueError(f"{argument} (a fraction) must be in (0, 1]; got {fraction!r}")
    return max(1, math.ceil(fraction * n))


# -- optimizers ---------------------------------------------------------------------------------

def param_groups(params, defaults, optimizer):
    """An optimizer's ``params`` (a list of arrays, or PyTorch-style parameter groups) as a list
    of groups ``{"params": [...], **defaults, **the group's own options}``; unknown options
    are a ValueError naming what ``optimizer`` takes."""
    if isinstance(params, np.ndarray) or is_device_array(params):
        raise TypeError("params must be a list of arrays or of parameter groups (dicts); "
                        f"got a single {describe(params)}")
    if isinstance(params, dict):
        params = [params]
    try:
        params = list(params)
    except TypeError:
        raise TypeError("params must be a list of arrays or of parameter groups; got "
                        f"{describe(params)}") from None
    if not params:
        raise ValueError("params is empty: the optimizer needs at least one array")
    if not isinstance(params[0], dict):
        params = [{"params": params}]
    groups = []
    for i, group in enumerate(params):
        if not isinstance(group, dict):
            raise TypeError(f"params[{i}] must be a parameter group (dict) like params[0]; "
                            f"got {describe(group)}")
        unknown = set(group) - set(defaults) - {"params"}
        if unknown:
            raise ValueError(f"param_groups[{i}] has unknown option(s) {sorted(unknown)}; "
                             f"{optimizer} takes {sorted(defaults)}")
        if "params" not in group:
            raise ValueError(f"param_groups[{i}] has no 'params'")
        arrays = group["params"]
        arrays = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
        if not arrays:
            raise ValueError(f"param_groups[{i}]['params'] is empty")
        groups.append({"params": arrays, **defaults,
                       **{k: v for k, v in group.items() if k != "params"}})
    return groups


def optimizer_params(params, population):
    """Check an optimizer's params (float arrays of one dtype on one device, C-contiguous,
    writable, each once, with a leading K axis for a population); returns their device."""
    first = params[0]
    device = location(first)
    if device == "cuda":
        require_cuda()
    seen = set()
    for j, p in enumerate(params):
        on_gpu = is_device_array(p)
        if on_gpu != (device == "cuda"):
            where = "a GPU array" if on_gpu else f"a {type(p).__name__} on the host"
            raise TypeError(f"params[{j}] is {where} but params[0] is on {device}: all "
                            "params must live on one device")
        if not on_gpu and not isinstance(p, np.ndarray):
            raise TypeError(f"params[{j}] must be a NumPy array or a GPU array; got "
                            f"{describe(p)}")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"params[{j}] must have dtype float32 or float64; got {p.dtype}")
        if p.dtype != first.dtype:
            raise TypeError(f"params[{j}] has dtype {p.dtype} but params[0] has "
                            f"{first.dtype}: all params must share one dtype")
        if not c_contiguous(p):
            raise ValueError(f"params[{j}] must be C-contiguous (updated in place, never "
                             "copied); allocate it with np.ascontiguousarray or flat_params")
        if not on_gpu and not p.flags.writeable:
            raise ValueError(f"params[{j}] is read-only; the optimizer updates it in place")
        if id(p) in seen:
            raise ValueError(f"params[{j}] appears more than once in params")
        seen.add(id(p))
        shape, first_shape = tuple(p.shape), tuple(first.shape)
        if population and (not shape or not first_shape or shape[0] != first_shape[0]):
            raise ValueError(f"with population=True every param has a leading axis of K "
                             f"models; params[{j}] has shape {shape}, params[0] "
                             f"{first_shape}")
    params_apart(params, device)
    return device


def byte_ranges(arrays, device):
    """(start, end) int64 (n,) each: the address range of each C-contiguous array of
    ``device`` (host addresses, or device addresses for GPU arrays)."""
    if device == "cpu":
        starts = [a.__array_interface__["data"][0] for a in arrays]
    else:
        from fastdl.kernels.cudalib import address, as_cuda_array

        starts = [address(as_cuda_array(a)) for a in arrays]
    starts = np.array(starts, np.int64)
    return starts, starts + np.array([a.size * a.dtype.itemsize for a in arrays], np.int64)


def params_apart(params, device):
    """ValueError unless no two params share memory (two views of one buffer that overlap
    would be updated twice per step). Views of one buffer side by side (flat_params) pass.
    O(n log n): sorted by start address, each range must begin at or after the end of the
    ranges before it; empty arrays hold no memory and are left out."""
    starts, ends = byte_ranges(params, device)
    order = np.argsort(starts, kind="stable")
    order = order[ends[order] > starts[order]]
    if len(order) < 2:
        return
    reach = np.maximum.accumulate(ends[order])  # the furthest end of the ranges so far
    clash = np.flatnonzero(starts[order[1:]] < reach[:-1])
    if clash.size:
        j = int(order[clash[0] + 1])
        i = int(order[np.flatnonzero(ends[order[:clash[0] + 1]] > starts[j])[0]])
        i, j = min(i, j), max(i, j)
        raise ValueError(f"params[{j}] overlaps params[{i}] in memory (views of one buffer "
                         "that share elements would be updated twice per step); pass each "
                         "element once")


def grads_apart_from_params(grad_starts, grad_ends, param_ranges):
    """ValueError if a grad shares memory with a param: the update writes p before it is
    done reading the grads (and the non-finite check reads them all first). Grads may share
    memory with each other (they are only read). ``param_ranges``: :func:`sorted_ranges` of
    the params (disjoint, see :func:`params_apart`).

    Each grad [a, b) is checked against the last param starting before b (the params are
    sorted and disjoint): O(n log n). A few grads are checked in plain Python (a NumPy call
    costs more than the whole test)."""
    starts, ends, indices, few = param_ranges
    if few is not None and len(grad_starts) <= _FEW:
        for j, (a, b) in enumerate(zip(grad_starts.tolist(), grad_ends.tolist())):
            k = bisect.bisect_left(few[0], b) - 1
            if b > a and k >= 0 and few[1][k] > a:
                _grad_alias_error(j, int(indices[k]))
        return
    if not len(starts):
        return
    k = np.searchsorted(starts, grad_ends, side="left") - 1  # the last param starting before
    hit = (k >= 0) & (grad_ends > grad_starts)
    hit &= ends[np.maximum(k, 0)] > grad_starts
    if hit.any():
        j = int(np.flatnonzero(hit)[0])
        _grad_alias_error(j, int(indices[k[j]]))


_FEW = 8


def _grad_alias_error(j, i):
    raise ValueError(f"grads[{j}] shares memory with params[{i}]: a gradient must not alias a "
                     "parameter (the step writes the params while it reads the grads); pass a "
                     "separate gradient buffer")


def sorted_ranges(starts, ends):
    """(starts, ends, param indices, Python lists of starts and ends or None) of the params'
    byte ranges sorted by start, for :func:`grads_apart_from_params`."""
    order = np.argsort(starts, kind="stable")
    order = order[ends[order] > starts[order]]  # empty params hold no memory
    starts, ends = starts[order], ends[order]
    few = (starts.tolist(), ends.tolist()) if len(starts) <= _FEW else None
    return starts, ends, order, few


def entries(d, argument, required):
    """Check that the dict ``d`` has exactly the keys ``required`` (a saved state's layout):
    TypeError for a non-dict, ValueError naming a missing or an unknown key."""
    if not isinstance(d, dict):
        raise TypeError(f"{argument} must be a dict; got {describe(d)}")
    for key in required:
        if key not in d:
            raise ValueError(f"{argument} has no {key!r} entry")
    unknown = [k for k in d if k not in required]
    if unknown:
        raise ValueError(f"{argument} has unknown entr{'ies' if len(unknown) > 1 else 'y'} "
                         f"{unknown}; expected {list(required)}")


def step_counts(value, argument, shape):
    """Saved step counts as int64 of ``shape``: an integer array, or a float one holding
    whole numbers (torch saves its steps as floats); counts are >= 0."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
        raise TypeError(f"{argument} must be an int64 array of shape {shape}; got "
                        f"{describe(value)}")
    if value.shape != shape:
        raise ValueError(f"{argument} must have shape {shape}; got {value.shape}")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value) & (value == np.round(value))):
        raise ValueError(f"{argument} must hold whole numbers; got {value}")
    if np.any(value < 0):
        raise ValueError(f"{argument} must be >= 0; got {value}")
    return value.astype(np.int64)


def state_arrays(arrays, argument, shapes, dtype):
    """A saved state buffer: a list of arrays (host or device), one per param, of the
    params' ``shapes`` and ``dtype``; TypeError for a wrong type or dtype, ValueError for a
    wrong count or shape."""
    if not isinstance(arrays, (list, tuple)):
        raise TypeError(f"{argument} must be a list of arrays, one per param; got "
                        f"{describe(arrays)}")
    if len(arrays) != len(shapes):
        raise ValueError(f"{argument} has {len(arrays)} arrays; expected {len(shapes)}")
    for j, (a, shape) in enumerate(zip(arrays, shapes)):
        if not (isinstance(a, np.ndarray) or is_device_array(a)):
            raise TypeError(f"{argument}[{j}] must be an array; got {describe(a)}")
        dtype_and_shape(a, f"{argument}[{j}]", dtype, shape)


def grad_error(j, g, p, device):
    """Raise the error that says why ``g`` cannot be the gradient of ``p`` (params[j])."""
    if device == "cpu" and is_device_array(g):
        raise TypeError(f"grads[{j}] is a GPU array but params[{j}] is a NumPy array: params "
                        "and grads must live on one device")
    if device == "cuda" and not is_device_array(g):
        raise TypeError(f"grads[{j}] is a {type(g).__name__} on the host but params[{j}] is "
                        "a GPU array: params and grads must live on one device")
    if device == "cpu" and not isinstance(g, np.ndarray):
        raise TypeError(f"grads[{j}] must be a NumPy array; got {describe(g)}")
    if g.dtype != p.dtype:
        raise TypeError(f"grads[{j}] must have dtype {p.dtype} like params[{j}]; got {g.dtype}")
    if tuple(g.shape) != tuple(p.shape):
        raise ValueError(f"grads[{j}] must have shape {tuple(p.shape)} like params[{j}]; got "
                         f"{tuple(g.shape)}")
    raise ValueError(f"grads[{j}] must be C-contiguous (read in place, never copied); "
                     "pass a contiguous copy")


def class_weight(weight, logits, n_classes, n_models, device, out):
    """Cross-entropy's ``weight=`` for ``logits`` (checked before) on ``device``: an array of
    logits' dtype there, C-contiguous, of shape (C,) or, for a population of ``n_models``
    (None: no population), also (K, C) (per model); not overlapping ``out``, which the gradient
    pass writes while it reads the weights. Any values, as torch (negative, zero, non-finite)."""
    same_device(weight, "weight", device, "logits are")
    shapes = [(n_classes,)] + ([] if n_models is None else [(n_models, n_classes)])
    expected = " or ".join(map(str, shapes)) + (" (one weight per class)" if n_models is None
                                                else " (one weight per class, shared or per model)")
    if device == "cpu" and not isinstance(weight, np.ndarray):
        raise TypeError(f"weight must be a NumPy array of shape {expected}; got "
                        f"{describe(weight)}")
    if weight.dtype != logits.dtype:
        raise TypeError(f"weight must have logits' dtype {logits.dtype}; got {weight.dtype}")
    if tuple(weight.shape) not in shapes:
        raise ValueError(f"weight must have shape {expected}; got {tuple(weight.shape)}")
    if not c_contiguous(weight):
        raise ValueError("weight must be C-contiguous (never copied)")
    if out is not None and overlap(out, weight, device):
        raise ValueError("out must not overlap weight (the gradient pass reads it)")


def saved_param_groups(groups, n_groups):
    """A state dict's ``param_groups``: a list of ``n_groups`` entries (TypeError for another
    type, ValueError for another count)."""
    if not isinstance(groups, (list, tuple)):
        raise TypeError(f"state_dict['param_groups'] must be a list of dicts; got "
                        f"{describe(groups)}")
    if len(groups) != n_groups:
        raise ValueError(f"state_dict has {len(groups)} parameter groups; this optimizer has "
                         f"{n_groups}")
    return groups
