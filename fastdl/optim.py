"""Fused optimizers: SGD, Momentum, RMSprop, Adam and AdamW in one pass per step.

Every optimizer takes ``params`` (a list of float32/float64 arrays of one dtype, or PyTorch-style
parameter groups ``[{"params": [...], "lr": ..., ...}, ...]``) and, besides its own keywords,
``grad_scale=None, skip_nonfinite=False, max_grad_norm=None, ema_decay=None, population=False``.
``step(grads)`` applies, in PyTorch's order (SPEC.md):

1. ``g = g / grad_scale``;
2. if ``skip_nonfinite`` and any g is inf/NaN: nothing changes (``StepInfo.found_inf``);
3. if ``max_grad_norm``: ``g *= min(1, max_grad_norm / (norm + 1e-6))``, norm over all tensors;
4. ``maximize``: ``g = -g``;  5. weight decay (L2, or decoupled for AdamW);
6. the optimizer's update;  7. ``ema = d * ema + (1 - d) * p`` if ``ema_decay``.

Steps 2-3 read the gradients once (only when asked for); steps 1 and 3-7 are one fused pass.
The kernels live in ``fastdl.kernels.optim``; this module validates, keeps the state, and
dispatches.

Population (``population=True``): every param has a leading axis of K models; any
hyperparameter may be a length-K array, and skipping and clipping are per model.

Example::

    params = fd.optim.flat_params([(784, 128), (128,)], np.float32)
    opt = fd.optim.Adam(params, lr=1e-3, max_grad_norm=1.0)
    info = opt.step(grads)          # StepInfo(found_inf=False, grad_norm=0.83)
"""

import math
import operator
from typing import NamedTuple

import numpy as np

from . import _checks
from ._arrays import c_contiguous
from ._backends import CpuBackend, CudaBackend
from .device import get_device, is_device_array, require_cuda, to_host


class StepInfo(NamedTuple):
    """What a step found: ``found_inf`` (bool; (K,) bool array for a population) and
    ``grad_norm`` (the global norm before clipping when ``max_grad_norm`` is set, else None)."""

    found_inf: object
    grad_norm: object


def flat_params(shapes, dtype=np.float32):
    """Zero-filled arrays of the given shapes, all views of one contiguous buffer.

    An optimizer over such params updates them with one kernel launch per step. The buffer is
    allocated on the selected device (:func:`fastdl.get_device`).
    """
    dtype = _checks.float_dtype(dtype, "dtype")
    shapes = [_shape(s, f"shapes[{i}]") for i, s in enumerate(shapes)]
    sizes = [math.prod(s) for s in shapes]
    if get_device() == "cuda":
        cuda = require_cuda()
        buffer = cuda.to_device(np.zeros(sum(sizes), dtype))
    else:
        buffer = np.empty(sum(sizes), dtype)
        buffer.fill(0)  # written now: no lazily mapped small pages (see _backends.CpuBackend.zeros)
    offsets = np.cumsum([0] + sizes)
    return [buffer[offsets[i]:offsets[i + 1]].reshape(s) for i, s in enumerate(shapes)]


def _shape(shape, argument):
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        shape = tuple(operator.index(n) for n in shape)
    except TypeError:
        raise TypeError(f"{argument} must be a tuple of ints; got {shape!r}") from None
    if any(n < 0 for n in shape):
        raise ValueError(f"{argument} must not have negative sizes; got {shape}")
    return shape


# Allowed values of each hyperparameter: a check from _checks, or "flag" for booleans.
_RULES = {
    "lr": _checks.nonnegative,
    "weight_decay": _checks.nonnegative,
    "eps": _checks.nonnegative,
    "momentum": _checks.nonnegative,
    "dampening": _checks.finite,
    "beta": _checks.unit_interval,
    "alpha": _checks.unit_interval,
    "betas": _checks.unit_interval,
    "nesterov": "flag",
    "amsgrad": "flag",
    "centered": "flag",
    "maximize": "flag",
}


class _Optimizer:
    """The machinery shared by every optimizer; subclasses name their hyperparameters, state
    and kernels."""

    _defaults = {}  # group keys and their defaults, in the kernel's column order
    _kernel_name = ""  # kernels.optim.<name>_coefficients / <name>_update

    def __init__(self, params, defaults, *, grad_scale=None, skip_nonfinite=False,
                 max_grad_norm=None, ema_decay=None, population=False):
        if not isinstance(population, (bool, np.bool_)):
            raise TypeError(f"population must be a bool; got {_checks.describe(population)}")
        groups = self._parse_groups(params, defaults)
        flat = [p for group in groups for p in group["params"]]
        self._check_params(flat, bool(population))
        self.population = bool(population)
        self.n_models = int(flat[0].shape[0]) if population else 1
        self._k = self.n_models if population else None  # K for hyperparameter checks
        self.dtype = np.dtype(flat[0].dtype)
        self.param_groups = groups
        self._group_indices = []
        for group in groups:
            first = sum(len(g) for g in self._group_indices)
            self._group_indices.append(list(range(first, first + len(group["params"]))))

        # Hyperparameters as float64 (groups, K, columns): refreshed from param_groups each
        # step, re-validating only what changed (group values are user-settable, as in torch).
        from fastdl.kernels import optim as kernels  # compiles nothing yet

        self._kernels = kernels
        n_columns = sum(2 if key == "betas" else 1 for key in self._defaults)
        self._hyper = np.zeros((len(groups), self.n_models, n_columns))
        self._seen = [dict() for _ in groups]
        self._refresh_hyper()

        tensor_groups = [g for g, indices in enumerate(self._group_indices) for _ in indices]
        backend = CudaBackend if self.device == "cuda" else CpuBackend
        self._backend = backend(flat, tensor_groups, self.n_models, self._kernel_name)
        self._params = self._backend.params  # numba views of __cuda_array_interface__ objects
        self._shapes, self._sizes = self._backend.shapes, self._backend.sizes

        # Per-model options (kernels.optim's model table), step counts, step results.
        self._model = np.zeros((self.n_models, kernels.MODEL_COLUMNS))
        self._steps = np.zeros(self.n_models, np.int64)
        self._active = np.ones(self.n_models, np.bool_)
        self._sumsq = np.zeros(self.n_models)
        self._nonfinite = np.zeros(self.n_models, np.bool_)
        n_coef = getattr(kernels, self._kernel_name.upper() + "_COLUMNS")
        self._coef = np.zeros((len(groups) * self.n_models, n_coef), self.dtype)
        self._coefficients = getattr(kernels, self._kernel_name + "_coefficients")
        self._state = {}
        self._state_args = None  # the update kernel's state arguments, once allocated
        self.grad_scale = grad_scale
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self._set_ema_decay(ema_decay)

    # -- construction ----------------------------------------------------------------------

    def _parse_groups(self, params, defaults):
        if isinstance(params, np.ndarray) or is_device_array(params):
            raise TypeError("params must be a list of arrays or of parameter groups (dicts); "
                            f"got a single {_checks.describe(params)}")
        if isinstance(params, dict):
            params = [params]
        try:
            params = list(params)
        except TypeError:
            raise TypeError("params must be a list of arrays or of parameter groups; got "
                            f"{_checks.describe(params)}") from None
        if not params:
            raise ValueError("params is empty: the optimizer needs at least one array")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        groups = []
        for i, group in enumerate(params):
            if not isinstance(group, dict):
                raise TypeError(f"params[{i}] must be a parameter group (dict) like params[0]; "
                                f"got {_checks.describe(group)}")
            unknown = set(group) - set(defaults) - {"params"}
            if unknown:
                raise ValueError(f"param_groups[{i}] has unknown option(s) {sorted(unknown)}; "
                                 f"{type(self).__name__} takes {sorted(defaults)}")
            if "params" not in group:
                raise ValueError(f"param_groups[{i}] has no 'params'")
            arrays = group["params"]
            arrays = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
            if not arrays:
                raise ValueError(f"param_groups[{i}]['params'] is empty")
            groups.append({"params": arrays, **defaults,
                           **{k: v for k, v in group.items() if k != "params"}})
        return groups

    def _check_params(self, params, population):
        """Check the params; sets ``self.device`` from where they live."""
        first = params[0]
        self.device = "cuda" if is_device_array(first) else "cpu"
        if self.device == "cuda":
            require_cuda()
        seen = set()
        for j, p in enumerate(params):
            on_gpu = is_device_array(p)
            if on_gpu != (self.device == "cuda"):
                where = "a GPU array" if on_gpu else f"a {type(p).__name__} on the host"
                raise TypeError(f"params[{j}] is {where} but params[0] is on {self.device}: all "
                                "params must live on one device")
            if not on_gpu and not isinstance(p, np.ndarray):
                raise TypeError(f"params[{j}] must be a NumPy array or a GPU array; got "
                                f"{_checks.describe(p)}")
            if p.dtype not in _checks.FLOAT_DTYPES:
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

    # -- hyperparameters ---------------------------------------------------------------------

    def _refresh_hyper(self):
        """Copy changed group hyperparameters into the float64 table, validating them.

        Returns True when something changed (the state buffers needed may have too).
        """
        any_changed = False
        for g, (group, seen) in enumerate(zip(self.param_groups, self._seen)):
            changed = False
            for key in self._defaults:
                try:
                    value = group[key]
                except KeyError:
                    raise ValueError(f"param_groups[{g}] lost its {key!r} entry") from None
                if value is not seen.get(key, _MISSING) or isinstance(value, np.ndarray):
                    self._set_hyper(g, key, value)
                    seen[key] = value
                    changed = True
            if changed:
                self._check_group(g)
                any_changed = True
        return any_changed

    def _set_hyper(self, g, key, value):
        column = self._column(key)
        name = f"param_groups[{g}]['{key}']" if len(self.param_groups) > 1 else key
        rule = _RULES[key]
        if key == "betas":
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"{name} must be a pair (beta1, beta2); got {value!r}")
            columns = [_checks.hyperparameter(b, f"{name}[{i}]", self._k, rule)
                       for i, b in enumerate(value)]
            self._hyper[g, :, column] = columns[0]
            self._hyper[g, :, column + 1] = columns[1]
        elif rule == "flag":
            self._hyper[g, :, column] = _checks.hyperparameter(value, name, self._k, None,
                                                               flag=True)
        else:
            self._hyper[g, :, column] = _checks.hyperparameter(value, name, self._k, rule)

    def _column(self, key):
        column = 0
        for k in self._defaults:
            if k == key:
                return column
            column += 2 if k == "betas" else 1
        raise KeyError(key)

    def _check_group(self, g):
        """Cross-checks between one group's hyperparameters (SGD: nesterov)."""

    @property
    def lr(self):
        """The learning rate of the first group; setting it sets every group's."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value):
        for g in range(len(self.param_groups)):
            self._set_hyper(g, "lr", value)
        for group, seen in zip(self.param_groups, self._seen):
            group["lr"] = value
            seen["lr"] = value

    # -- optimizer-wide options ------------------------------------------------------------

    @property
    def grad_scale(self):
        """Gradients are divided by this (a loss scale) first; None means 1."""
        return self._grad_scale

    @grad_scale.setter
    def grad_scale(self, value):
        scale = (np.ones(self.n_models) if value is None else
                 _checks.hyperparameter(value, "grad_scale", self._k, _checks.positive))
        self._model[:, self._kernels.INV_SCALE] = 1.0 / scale
        self._grad_scale = value

    @property
    def max_grad_norm(self):
        """Global-norm clipping threshold (None: no clipping)."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value):
        norm = (np.zeros(self.n_models) if value is None else
                _checks.hyperparameter(value, "max_grad_norm", self._k, _checks.positive))
        self._model[:, self._kernels.MAX_NORM] = norm
        self._max_grad_norm = value

    @property
    def skip_nonfinite(self):
        """Skip the step (per model) when a gradient is inf/NaN."""
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"skip_nonfinite must be a bool; got {_checks.describe(value)}")
        self._model[:, self._kernels.SKIP] = float(value)
        self._skip_nonfinite = bool(value)

    @property
    def ema_decay(self):
        """Decay of the EMA weights (set at construction; None: no EMA)."""
        return self._ema_decay

    def _set_ema_decay(self, value):
        if value is None:
            self._ema = None
            self.ema_params = None
        else:
            decay = _checks.hyperparameter(value, "ema_decay", self._k,
                                           _checks.closed_unit_interval)
            self._model[:, self._kernels.EMA_DECAY] = decay
            self._ema = self._backend.concatenate(self._params)
            self.ema_params = self._backend.views(self._ema)
        self._ema_decay = value

    # -- state -----------------------------------------------------------------------------

    def _state_buffers(self, names):
        """The flat state arrays in ``names`` order, allocating missing ones as zeros."""
        for name in self._needed_state():
            if name not in self._state:
                self._state[name] = self._backend.zeros(self._backend.total)
        return [self._state.get(name, self._backend.placeholder) for name in names]

    def _needed_state(self):
        """Names of the state buffers the current hyperparameters need."""
        return self._known_state()

    def state_dict(self):
        """Host copies of the state, step counts, hyperparameters and options."""
        return {
            "optimizer": type(self).__name__,
            "step": self._steps.copy(),
            "state": {name: self._host_copies(buf) for name, buf in self._state.items()},
            "ema": None if self._ema is None else self._host_copies(self._ema),
            "param_groups": [{"params": list(indices),
                              **{k: _copy(group[k]) for k in self._defaults}}
                             for group, indices in zip(self.param_groups,
                                                       self._group_indices)],
            "options": {"grad_scale": _copy(self.grad_scale),
                        "max_grad_norm": _copy(self.max_grad_norm),
                        "skip_nonfinite": self.skip_nonfinite,
                        "ema_decay": _copy(self.ema_decay)},
        }

    def _host_copies(self, flat):
        return [self._backend.to_host(v) for v in self._backend.views(flat)]

    def load_state_dict(self, state_dict):
        """Restore :meth:`state_dict`'s output (host arrays) so that training continues
        bit-identically. Everything is checked before anything is changed."""
        d = state_dict
        if not isinstance(d, dict) or d.get("optimizer") != type(self).__name__:
            got = d.get("optimizer") if isinstance(d, dict) else _checks.describe(d)
            raise ValueError(f"state_dict must come from {type(self).__name__}.state_dict(); "
                             f"got one from {got!r}")
        steps = np.asarray(d["step"])
        if steps.shape != self._steps.shape:
            raise ValueError(f"state_dict['step'] must have shape {self._steps.shape}; got "
                             f"{steps.shape}")
        if len(d["param_groups"]) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(d['param_groups'])} parameter groups; this "
                             f"optimizer has {len(self.param_groups)}")
        for g, (saved, group) in enumerate(zip(d["param_groups"], self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict param group {g} has {len(saved['params'])} "
                                 f"params; this optimizer's has {len(group['params'])}")
        tensors = dict(d["state"])
        if d.get("ema") is not None:
            if self._ema is None:
                raise ValueError("state_dict holds EMA weights but this optimizer has "
                                 "ema_decay=None")
            tensors["ema"] = d["ema"]
        for name, arrays in tensors.items():
            if name != "ema" and name not in self._known_state():
                raise ValueError(f"state_dict['state'] has unknown buffer {name!r}")
            if len(arrays) != len(self._shapes):
                raise ValueError(f"state_dict['state'][{name!r}] has {len(arrays)} arrays; "
                                 f"expected {len(self._shapes)}")
            for j, (a, shape) in enumerate(zip(arrays, self._shapes)):
                a = np.asarray(a) if not is_device_array(a) else a
                if tuple(a.shape) != shape or a.dtype != self.dtype:
                    raise ValueError(f"state_dict['state'][{name!r}][{j}] must have shape "
                                     f"{shape} and dtype {self.dtype}; got "
                                     f"{_checks.describe(a)}")
        # Validate the hyperparameters on a copy of the groups before touching anything.
        saved_groups = [{k: _copy(saved[k]) for k in self._defaults}
                        for saved in d["param_groups"]]
        backup = (self._hyper.copy(), [dict(s) for s in self._seen],
                  [{k: group[k] for k in self._defaults} for group in self.param_groups])
        try:
            for group, saved in zip(self.param_groups, saved_groups):
                group.update(saved)
            self._refresh_hyper()
        except (TypeError, ValueError):
            self._hyper, self._seen = backup[0], backup[1]
            for group, old in zip(self.param_groups, backup[2]):
                group.update(old)
            raise
        options = d.get("options", {})
        self.grad_scale = options.get("grad_scale")
        self.max_grad_norm = options.get("max_grad_norm")
        self.skip_nonfinite = options.get("skip_nonfinite", False)
        if self._ema is not None and options.get("ema_decay") is not None:
            self._model[:, self._kernels.EMA_DECAY] = options["ema_decay"]
            self._ema_decay = options["ema_decay"]
        self._steps[:] = steps
        self._state_args = None
        for name, arrays in tensors.items():
            if name == "ema":
                target = self._ema
            else:
                target = self._state.get(name)
                if target is None:
                    target = self._state[name] = self._backend.zeros(self._backend.total)
            for view, a in zip(self._backend.views(target), arrays):
                self._backend.write(view, a if isinstance(a, np.ndarray) else to_host(a))
        for name in list(self._state):
            if name not in tensors:
                self._state[name] = self._backend.zeros(self._backend.total)

    def _known_state(self):
        """Names of every state buffer, in the update kernel's argument order (torch's names)."""
        raise NotImplementedError

    # -- the step --------------------------------------------------------------------------

    def step(self, grads):
        """Apply one update with ``grads`` (one array per param, in param order).

        Returns :class:`StepInfo`. Invalid grads or hyperparameters raise before anything
        changes.
        """
        if isinstance(grads, np.ndarray):
            raise TypeError("grads must be a list of arrays, one per param; got a single "
                            f"{_checks.describe(grads)}")
        backend = self._backend
        plan = backend.prepare(list(grads))
        if self._refresh_hyper() or self._state_args is None:
            self._state_args = self._state_buffers(self._known_state())
        if self._skip_nonfinite or self._max_grad_norm is not None:
            backend.grad_stats(plan, self._model, self._coef, self._sumsq, self._nonfinite)
        self._run_coefficients()
        backend.update(plan, self._coef, self._active, self._state_args,
                       backend.placeholder if self._ema is None else self._ema)
        return self._step_info()

    def _run_coefficients(self):
        self._coefficients(self._hyper, self._model, self._sumsq, self._nonfinite, self._steps,
                           self._active, self._coef)

    def _step_info(self):
        found = self._nonfinite if self._skip_nonfinite else None
        norm = np.sqrt(self._sumsq) if self._max_grad_norm is not None else None
        if self.population:
            found = found.copy() if found is not None else np.zeros(self.n_models, np.bool_)
            return StepInfo(found, norm)
        return StepInfo(bool(found[0]) if found is not None else False,
                        float(norm[0]) if norm is not None else None)

    @property
    def step_count(self):
        """Steps taken (per model for a population; skipped steps do not count)."""
        return self._steps.copy() if self.population else int(self._steps[0])

    def __repr__(self):
        hyper = ", ".join(f"{k}={self.param_groups[0][k]!r}" for k in self._defaults)
        return (f"{type(self).__name__}({len(self._params)} params, {self.dtype}, {hyper}, "
                f"groups={len(self.param_groups)}, models={self.n_models})")


_MISSING = object()


def _copy(value):
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return value


def _split(segments, chunk):
    rows = []
    for ptr, model, row, lo, hi, state in segments:
        for start in range(lo, hi, chunk):
            stop = min(hi, start + chunk)
            rows.append((ptr, model, row, start, stop, state + start - lo))
    return np.array(rows, np.int64).reshape(-1, 6)


class SGD(_Optimizer):
    """PyTorch's SGD. With momentum, ``b = g`` on the first step, then
    ``b = momentum*b + (1-dampening)*g``; ``p -= lr * (g + momentum*b if nesterov else b)``.

    Parameters: ``lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
    maximize=False`` (per group; scalars or length-K arrays for a population). State:
    ``momentum_buffer`` (only when momentum > 0 somewhere).
    """

    _defaults = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                 "nesterov": False, "maximize": False}
    _kernel_name = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize), **options)

    def _check_group(self, g):
        lr, momentum, dampening, wd, nesterov, maximize = self._hyper[g].T
        bad = (nesterov != 0) & ((momentum <= 0) | (dampening != 0))
        if np.any(bad):
            raise ValueError(f"param_groups[{g}]: nesterov=True needs momentum > 0 and "
                             f"dampening = 0; got momentum={momentum[bad][0]}, "
                             f"dampening={dampening[bad][0]}")

    def _known_state(self):
        return ("momentum_buffer",)

    def _needed_state(self):
        return ("momentum_buffer",) if np.any(self._hyper[:, :, 1] != 0) else ()


class Momentum(_Optimizer):
    """The course notes' Momentum (not PyTorch's SGD momentum): ``V = beta*V + (1-beta)*g``,
    ``p -= lr*V``, V starting at 0.

    Parameters: ``lr=0.01, beta=0.9, weight_decay=0, maximize=False``. State: ``velocity``.
    """

    _defaults = {"lr": 0.01, "beta": 0.9, "weight_decay": 0.0, "maximize": False}
    _kernel_name = "momentum"

    def __init__(self, params, lr=0.01, beta=0.9, weight_decay=0.0, maximize=False,
                 **options):
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay,
                                      maximize=maximize), **options)

    def _known_state(self):
        return ("velocity",)


class RMSprop(_Optimizer):
    """PyTorch's RMSprop: ``S = alpha*S + (1-alpha)*g*g``, ``p -= lr * g / (sqrt(S) + eps)``;
    ``centered`` subtracts the squared running mean of g under the root, ``momentum`` > 0 keeps
    ``b = momentum*b + g / (sqrt(S) + eps)`` and steps ``p -= lr*b``.

    Parameters: ``lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
    maximize=False``. State: ``square_avg``, ``grad_avg`` (centered), ``momentum_buffer``.
    """

    _defaults = {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                 "centered": False, "maximize": False}
    _kernel_name = "rmsprop"

    def __init__(self, params, lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, maximize=False, **options):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered,
                                      maximize=maximize), **options)

    def _known_state(self):
        return ("square_avg", "grad_avg", "momentum_buffer")

    def _needed_state(self):
        names = ["square_avg"]
        if np.any(self._hyper[:, :, 5] != 0):
            names.append("grad_avg")
        if np.any(self._hyper[:, :, 4] != 0):
            names.append("momentum_buffer")
        return names


class Adam(_Optimizer):
    """Adam (PyTorch's, identical to the notes'):

        m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g*g
        p -= (lr / (1 - b1**t)) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

    ``amsgrad`` replaces v in the denominator by its running maximum. ``weight_decay`` is L2
    (added to g). Parameters: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
    amsgrad=False, maximize=False``. State: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``.
    """

    _defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                 "amsgrad": False, "maximize": False}
    _kernel_name = "adam"
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize), **options)

    def _run_coefficients(self):
        self._coefficients(self._hyper, self._model, self._sumsq, self._nonfinite, self._steps,
                           self._active, self._coef, self._decoupled)

    def _known_state(self):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _needed_state(self):
        names = ["exp_avg", "exp_avg_sq"]
        if np.any(self._hyper[:, :, 5] != 0):
            names.append("max_exp_avg_sq")
        return names


class AdamW(Adam):
    """Adam with decoupled weight decay: ``p *= 1 - lr*weight_decay`` before the Adam update.

    Same parameters as :class:`Adam`, with ``weight_decay=0.01``.
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 amsgrad=False, maximize=False, **options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, **options)

