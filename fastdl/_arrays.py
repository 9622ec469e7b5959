"""Checks of array arguments shared by the kernels' API: device, layout, outputs. Errors name
the argument, what was expected and what came; checks run before anything is modified."""

import math

import numpy as np

from . import _checks
from .device import location as device_of


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


def view_shape(shape, axis, population):
    """(K, outer, n, inner) of an array shape around ``axis`` (counted on the per-model shape,
    after the leading K axis of a population): the kernels' view of any rank and layout."""
    n_models = shape[0] if population else 1
    per_model = shape[1:] if population else shape
    return (n_models, math.prod(per_model[:axis]), per_model[axis],
            math.prod(per_model[axis + 1:]))


def check_out(out, name, like, device, like_name="x", forbid_overlap=None, reason=""):
    """Check an output array ``out`` (None passes): on ``device``, of ``like``'s shape and
    dtype, writable, C-contiguous and, if given, not sharing memory with ``forbid_overlap``
    (``reason`` says why)."""
    if out is None:
        return
    if device_of(out) != device:
        raise TypeError(f"{name} must live on {device} like {like_name}; got "
                        f"{_checks.describe(out)}")
    if device == "cpu" and not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array; got {_checks.describe(out)}")
    if out.dtype != like.dtype or tuple(out.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have shape {tuple(like.shape)} and dtype {like.dtype}; "
                         f"got {_checks.describe(out)}")
    if not c_contiguous(out) or (device == "cpu" and not out.flags.writeable):
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
