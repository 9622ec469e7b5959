"""Fused optimizers: SGD, Momentum, RMSprop, Adam and AdamW in one pass per step.

Every optimizer takes ``params`` (a list of float32/float64 arrays of one dtype, or PyTorch-style
parameter groups ``[{"params": [...], "lr": ..., ...}, ...]``) and, besides its own keywords,
``grad_scale=None, skip_nonfinite=False, max_grad_norm=None, ema_decay=None, population=False,
state_dtype=None, min_8bit_size=4096``.
``step(grads)`` applies, in PyTorch's order (SPEC.md):

1. ``g = g / grad_scale``;
2. if ``skip_nonfinite`` and any g is inf/NaN: nothing changes (``StepInfo.found_inf``);
3. if ``max_grad_norm``: ``g *= min(1, max_grad_norm / (norm + 1e-6))``, norm over all tensors;
4. ``maximize``: ``g = -g``;  5. weight decay (L2, or decoupled for AdamW);
6. the optimizer's update;  7. ``ema = d * ema + (1 - d) * p`` if ``ema_decay``.

Steps 2-3 read the gradients once (only when asked for); steps 1 and 3-7 are one fused pass.
The kernels live in ``fastdl.kernels.optim``; this module validates, keeps the state, and
dispatches.

Memory: no two params may share an element (ValueError at construction; views of one buffer
side by side, as ``flat_params`` makes, are fine), and no grad may share memory with a param
(ValueError at the step: the update writes params while it reads grads). Grads may share memory
with each other: they are only read. PyTorch checks neither; aliasing there is undefined.

State (``state_dtype``, SPEC.md "Low-precision optimizer state"): None keeps the moments in the
params' dtype; "float32" / "float64" in that dtype; "bfloat16" as the upper halves of float32
values (rounded to nearest even), "int8" as bitsandbytes' blockwise 8-bit codes (blocks of 256,
one float32 absmax each; tensors of under ``min_8bit_size`` elements per model keep float32).
The update math is the params' dtype (float32 for the two low-precision ones, which need
float32 params); with "int8" each block is decoded, updated and re-encoded in the one pass.

Population (``population=True``): every param has a leading axis of K models; any
hyperparameter may be a length-K array, and skipping and clipping are per model.

Example::

    params = fd.optim.flat_params([(784, 128), (128,)], np.float32)
    opt = fd.optim.Adam(params, lr=1e-3, max_grad_norm=1.0)
    info = opt.step(grads)          # StepInfo(found_inf=False, grad_norm=0.83)
"""

import math
from typing import NamedTuple

import numpy as np

from . import _dispatch, _state, _validate
from ._optim_ops import OptimCpu, OptimCuda
from .device import get_device, to_host

_OPS = {"cpu": OptimCpu, "cuda": OptimCuda}


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
    dtype = _validate.float_dtype(dtype, "dtype")
    shapes = [_validate.shape(s, f"shapes[{i}]") for i, s in enumerate(shapes)]
    sizes = [math.prod(s) for s in shapes]
    buffer = _dispatch.arrays(get_device()).zeros(sum(sizes), dtype)
    offsets = np.cumsum([0] + sizes)
    return [buffer[offsets[i]:offsets[i + 1]].reshape(s) for i, s in enumerate(shapes)]


# Allowed values of each hyperparameter: a check from _validate, or "flag" for booleans.
_RULES = {
    "lr": _validate.nonnegative,
    "weight_decay": _validate.nonnegative,
    "eps": _validate.nonnegative,
    "momentum": _validate.nonnegative,
    "dampening": _validate.finite,
    "beta": _validate.unit_interval,
    "alpha": _validate.unit_interval,
    "betas": _validate.unit_interval,
    "nesterov": "flag",
    "amsgrad": "flag",
    "centered": "flag",
    "maximize": "flag",
}


class _Optimizer:
    """The machinery shared by every optimizer; subclasses name their hyperparameters and
    kernels (``_algorithm``: the entry of ``kernels.optim.ALGORITHMS``)."""

    _defaults = {}  # group keys and their defaults, in the order of the hyperparameter table
    _algorithm = ""

    def __init__(self, params, defaults, *, grad_scale=None, skip_nonfinite=False,
                 max_grad_norm=None, ema_decay=None, population=False, state_dtype=None,
                 min_8bit_size=_state.MIN_8BIT_SIZE):
        population = _validate.population_flag(population)
        groups = _validate.param_groups(params, defaults, type(self).__name__)
        flat = [p for group in groups for p in group["params"]]
        self.device = _validate.optimizer_params(flat, population)
        self.state_dtype = _state.state_dtype_name(state_dtype, flat[0].dtype)
        min_8bit_size = _validate.integer(min_8bit_size, "min_8bit_size", minimum=1)
        self.population = population
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

        self._kernels, self._coefficients = kernels, kernels.coefficients
        self._layout = kernels.ALGORITHMS[self._algorithm]
        self._kind = self._layout.kind
        tensor_groups = [g for g, indices in enumerate(self._group_indices) for _ in indices]
        self._ops = _dispatch.select(_OPS, self.device, flat, tensor_groups, self.n_models,
                                     self._algorithm)
        self._params = self._ops.params  # numba views of __cuda_array_interface__ objects
        self._shapes, self._sizes = self._ops.shapes, self._ops.sizes
        self._store = _state.make_store(self.state_dtype, self._ops, self.n_models, population,
                                        min_8bit_size)
        if self.state_dtype == "int8":
            self._ops.use_8bit_state(self._store)
        # 8-bit codes on the signed dynamic map, Adam's exp_avg_sq on the unsigned one
        self._signed = {name: name != "exp_avg_sq" for name, _ in self._layout.state}

        # Per-model options (kernels.optim.MODEL), step counts, step results, coefficients.
        self._model = np.zeros((self.n_models, len(kernels.MODEL)))
        self._steps = np.zeros(self.n_models, np.int64)
        self._active = np.ones(self.n_models, np.bool_)
        self._sumsq = np.zeros(self.n_models)
        self._nonfinite = np.zeros(self.n_models, np.bool_)
        self._coef = np.zeros((len(groups) * self.n_models, len(self._layout.coef)), self.dtype)
        self._state = {}
        self._state_args = None  # the update kernel's state arguments, once allocated
        self.grad_scale = grad_scale
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self._set_ema_decay(ema_decay)

        # Hyperparameters as float64 (groups, K, columns of kernels.optim's *_HYPER table):
        # refreshed from param_groups each step, re-validating only what changed (group values
        # are user-settable, as in torch).
        self._hyper = np.zeros((len(groups), self.n_models, len(self._layout.hyper)))
        self._seen = [dict() for _ in groups]
        self._refresh_hyper()

    # -- construction ----------------------------------------------------------------------

    # -- hyperparameters ---------------------------------------------------------------------

    def _refresh_hyper(self):
        """Copy changed group hyperparameters into the float64 table, validating them.

        Returns True when something changed (the state buffers needed may have too); the
        flag columns of the coefficient rows are rewritten then. A value is recorded as seen
        (and skipped by the identity test next time) only once every group passed all its
        checks, so a rejected value is checked again on every step and a rejected step
        changes nothing. Arrays are always re-read: they can change in place.
        """
        pending = None
        for g, (group, seen) in enumerate(zip(self.param_groups, self._seen)):
            changed = None
            for key in self._defaults:
                try:
                    value = group[key]
                except KeyError:
                    raise ValueError(f"param_groups[{g}] lost its {key!r} entry") from None
                if value is not seen.get(key, _MISSING) or isinstance(value, np.ndarray):
                    if changed is None:
                        changed = {}
                    changed[key] = value
            if changed is not None:
                if pending is None:
                    pending = []
                pending.append((g, self._checked_row(g, changed), changed))
        if pending is None:
            return False
        for g, row, changed in pending:  # every group passed: commit
            self._hyper[g] = row
            self._seen[g].update(changed)
        self._set_row_flags()
        return True

    def _checked_row(self, g, values):
        """Group ``g``'s (K, columns) hyperparameter row with ``values`` ({key: value})
        validated and written in, and the group's cross-checks passed; the table itself is
        not touched."""
        row = self._hyper[g].copy()
        for key, value in values.items():
            self._set_hyper(row, g, key, value)
        self._check_group(g, row)
        return row

    def _set_row_flags(self):
        """Write the flag columns of the coefficient rows (which state each row touches) and
        tell the ops, whose CPU update is specialized on them."""
        flags = self._row_flags()
        row_flags = np.zeros((self._coef.shape[0], len(self._layout.flags)), bool)
        for i, name in enumerate(self._layout.flags):
            row_flags[:, i] = flags[name].reshape(-1)  # (groups, K) -> coefficient rows
            self._coef[:, getattr(self._layout.coef, name)] = row_flags[:, i]
        self._ops.set_row_flags(row_flags, self._ema is not None)

    def _row_flags(self):
        """{flag: (groups, K) bool} for each of the algorithm's flags (none by default)."""
        return {}

    def _hyper_values(self, key):
        """The (groups, K) float64 values of hyperparameter column ``key``."""
        return self._hyper[:, :, getattr(self._layout.hyper, key)]

    def _set_hyper(self, row, g, key, value):
        """Validate group ``g``'s ``key`` = ``value`` into ``row`` ((K, columns) float64)."""
        column = self._column(key)
        name = f"param_groups[{g}]['{key}']" if len(self.param_groups) > 1 else key
        rule = _RULES[key]
        if key == "betas":
            if not isinstance(value, (tuple, list)):
                raise TypeError(f"{name} must be a pair (beta1, beta2); got "
                                f"{_validate.describe(value)}")
            if len(value) != 2:
                raise ValueError(f"{name} must be a pair (beta1, beta2); got {len(value)} "
                                 f"values {value!r}")
            columns = [_validate.hyperparameter(b, f"{name}[{i}]", self._k, rule)
                       for i, b in enumerate(value)]
            row[:, column] = columns[0]
            row[:, column + 1] = columns[1]
        elif rule == "flag":
            row[:, column] = _validate.hyperparameter(value, name, self._k, None, flag=True)
        else:
            row[:, column] = _validate.hyperparameter(value, name, self._k, rule)

    def _column(self, key):
        return getattr(self._layout.hyper, "beta1" if key == "betas" else key)

    def _check_group(self, g, row):
        """Cross-checks between group ``g``'s hyperparameters ``row`` ((K, columns), SGD:
        nesterov); ValueError."""

    @property
    def lr(self):
        """The learning rate of the first group; setting it sets every group's."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value):
        values = _validate.hyperparameter(value, "lr", self._k, _RULES["lr"])
        self._hyper[:, :, self._column("lr")] = values
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
        scale = self._per_model_option(value, "grad_scale", 1.0)
        self._model[:, self._kernels.MODEL.inv_scale] = 1.0 / scale
        self._grad_scale = value

    def _per_model_option(self, value, name, default):
        """A positive optimizer-wide option as (K,) float64 (``default`` for None)."""
        if value is None:
            return np.full(self.n_models, default)
        return _validate.hyperparameter(value, name, self._k, _validate.positive)

    @property
    def max_grad_norm(self):
        """Global-norm clipping threshold (None: no clipping)."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value):
        # 0 in the model table means no clipping
        self._model[:, self._kernels.MODEL.max_norm] = self._per_model_option(
            value, "max_grad_norm", 0.0)
        self._max_grad_norm = value

    @property
    def skip_nonfinite(self):
        """Skip the step (per model) when a gradient is inf/NaN."""
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value):
        self._skip_nonfinite = _validate.flag(value, "skip_nonfinite")
        self._model[:, self._kernels.MODEL.skip] = float(self._skip_nonfinite)

    @property
    def ema_decay(self):
        """Decay of the EMA weights (set at construction; None: no EMA)."""
        return self._ema_decay

    def _set_ema_decay(self, value):
        if value is None:
            self._ema = None
            self.ema_params = None
        else:
            decay = _validate.hyperparameter(value, "ema_decay", self._k,
                                             _validate.closed_unit_interval)
            self._model[:, self._kernels.MODEL.ema_decay] = decay
            self._ema = self._ops.concatenate(self._params)
            self.ema_params = self._ops.views(self._ema)
        self._ema_argument = self._ops.placeholder if self._ema is None else self._ema
        self._ema_decay = value

    # -- state -----------------------------------------------------------------------------

    def _state_buffers(self):
        """The flat state arrays in the update kernel's order, allocating missing ones as
        zeros (a placeholder stands for one no row needs)."""
        for name in self._needed_state():
            if name not in self._state:
                self._state[name] = self._zero_state()
        return self._store.kernel_arguments(
            [self._state.get(name, self._ops.placeholder) for name in self._known_state()])

    def _zero_state(self):
        return self._store.zeros()

    def _known_state(self):
        """Names of every state buffer, in the update kernel's argument order (torch's names)."""
        return [name for name, _ in self._layout.state]

    def _needed_state(self):
        """Names of the state buffers the current hyperparameters need: those every row needs,
        and those of a flag some row has."""
        flags = self._row_flags()
        return [name for name, flag in self._layout.state
                if flag is None or np.any(flags[flag])]

    def state_dict(self):
        """Host copies of the state, step counts, hyperparameters and options."""
        return {
            "optimizer": type(self).__name__,
            "step": self._steps.copy(),
            "state": {name: self._store.saved(buf) for name, buf in self._state.items()},
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
        return [self._ops.host_copy(v) for v in self._ops.views(flat)]

    def load_state_dict(self, state_dict):
        """Restore :meth:`state_dict`'s output (host arrays) so that training continues
        bit-identically. The whole dict is checked before anything is changed: a rejected
        load leaves hyperparameters, options, state buffers and step counts as they were."""
        plan = self._checked_state_dict(state_dict)
        hyper, groups, options, steps, tensors = plan
        # Nothing below raises: every value was validated above.
        self._hyper[:] = hyper
        for group, seen, saved in zip(self.param_groups, self._seen, groups):
            group.update(saved)
            seen.clear()
            seen.update(saved)
        self._set_row_flags()
        self.grad_scale = options["grad_scale"]
        self.max_grad_norm = options["max_grad_norm"]
        self.skip_nonfinite = options["skip_nonfinite"]
        if self._ema is not None and options["ema_decay"] is not None:
            self._model[:, self._kernels.MODEL.ema_decay] = options["ema_decay_values"]
            self._ema_decay = options["ema_decay"]
        self._steps[:] = steps
        self._state_args = None
        for name, arrays in tensors.items():
            if name == "ema":
                for view, a in zip(self._ops.views(self._ema), arrays):
                    self._ops.write(view, a if isinstance(a, np.ndarray) else to_host(a))
                continue
            target = self._state.get(name)
            if target is None:
                target = self._state[name] = self._zero_state()
            self._store.write(target, arrays)
        for name in list(self._state):
            if name not in tensors:
                self._state[name] = self._zero_state()

    _STATE_KEYS = ("optimizer", "step", "state", "ema", "param_groups", "options")
    _OPTION_KEYS = ("grad_scale", "max_grad_norm", "skip_nonfinite", "ema_decay")

    def _checked_state_dict(self, d):
        """Validate a state dict as a whole; returns (hyperparameter table, group values,
        options, step counts, {buffer: arrays}) ready to apply. ValueError for a missing or
        unknown entry, a wrong count, shape or value; TypeError for a wrong type or dtype."""
        name = type(self).__name__
        if not isinstance(d, dict):
            raise TypeError(f"state_dict must be a dict from {name}.state_dict(); got "
                            f"{_validate.describe(d)}")
        if "optimizer" in d and d["optimizer"] != name:
            raise ValueError(f"state_dict['optimizer'] must be {name!r} (a state dict of "
                             f"{name}.state_dict()); got one from {d['optimizer']!r}")
        _validate.entries(d, "state_dict", self._STATE_KEYS)
        steps = _validate.step_counts(d["step"], "state_dict['step']", self._steps.shape)

        saved_groups = _validate.saved_param_groups(d["param_groups"], len(self.param_groups))
        hyper, groups = self._hyper.copy(), []
        for g, (saved, indices) in enumerate(zip(saved_groups, self._group_indices)):
            argument = f"state_dict['param_groups'][{g}]"
            _validate.entries(saved, argument, ("params", *self._defaults))
            if not isinstance(saved["params"], (list, tuple)):
                raise TypeError(f"{argument}['params'] must be a list of param indices; got "
                                f"{_validate.describe(saved['params'])}")
            if len(saved["params"]) != len(indices):
                raise ValueError(f"state_dict param group {g} has {len(saved['params'])} "
                                 f"params; this optimizer's has {len(indices)}")
            values = {k: _copy(saved[k]) for k in self._defaults}
            hyper[g] = self._checked_row(g, values)
            groups.append(values)

        options = d["options"]
        _validate.entries(options, "state_dict['options']", self._OPTION_KEYS)
        options = dict(options)
        self._per_model_option(options["grad_scale"], "state_dict['options']['grad_scale']",
                               1.0)
        self._per_model_option(options["max_grad_norm"],
                               "state_dict['options']['max_grad_norm']", 0.0)
        _validate.flag(options["skip_nonfinite"], "state_dict['options']['skip_nonfinite']")
        if options["ema_decay"] is not None:
            options["ema_decay_values"] = _validate.hyperparameter(
                options["ema_decay"], "state_dict['options']['ema_decay']", self._k,
                _validate.closed_unit_interval)
        if (d["ema"] is None) != (options["ema_decay"] is None):
            raise ValueError("state_dict['ema'] and state_dict['options']['ema_decay'] must "
                             "both be set or both be None")
        if d["ema"] is not None and self._ema is None:
            raise ValueError("state_dict holds EMA weights but this optimizer has "
                             "ema_decay=None")

        state = d["state"]
        if not isinstance(state, dict):
            raise TypeError(f"state_dict['state'] must be a dict of buffers; got "
                            f"{_validate.describe(state)}")
        tensors = {}
        for buffer, arrays in state.items():
            if buffer not in self._known_state():
                raise ValueError(f"state_dict['state'] has unknown buffer {buffer!r}; "
                                 f"{name} keeps {self._known_state()}")
            tensors[buffer] = self._store.checked(arrays, f"state_dict['state'][{buffer!r}]",
                                                  self._shapes, self._signed[buffer])
        if d["ema"] is not None:
            _validate.state_arrays(d["ema"], "state_dict['ema']", self._shapes, self.dtype)
            tensors["ema"] = d["ema"]
        return hyper, groups, options, steps, tensors

    # -- the step --------------------------------------------------------------------------

    def step(self, grads):
        """Apply one update with ``grads`` (one array per param, in param order; None for a
        param to leave alone this step, its state included, as PyTorch does for a param
        without a grad; the step count is the optimizer's and still advances).

        Returns :class:`StepInfo`. Invalid grads (a grad sharing memory with a param
        included) or hyperparameters raise before anything changes, on every step until fixed.
        """
        if isinstance(grads, np.ndarray):
            raise TypeError("grads must be a list of arrays, one per param; got a single "
                            f"{_validate.describe(grads)}")
        return self._run(self._ops.prepare(list(grads)))

    def _run(self, plan):
        """The step over ``plan`` (from the ops' ``prepare``, or ``address_plan`` on the CPU,
        which fastdl.torch uses): steps 1-7 of the module docstring."""
        ops = self._ops
        if self._refresh_hyper() or self._state_args is None:
            self._state_args = self._state_buffers()
        if self._skip_nonfinite or self._max_grad_norm is not None:
            ops.grad_stats(plan, self._model, self._coef, self._sumsq, self._nonfinite)
        self._coefficients(self._kind, self._hyper, self._model, self._sumsq, self._nonfinite,
                           self._steps, self._active, self._coef)
        ops.update(plan, self._coef, self._active, self._state_args, self._ema_argument)
        return self._step_info()

    def _step_info(self):
        found = self._nonfinite if self._skip_nonfinite else None
        norm = np.sqrt(self._sumsq) if self._max_grad_norm is not None else None
        if self.population:
            found = found.copy() if found is not None else np.zeros(self.n_models, np.bool_)
            return StepInfo(found, norm)
        return StepInfo(bool(found[0]) if found is not None else False,
                        float(norm[0]) if norm is not None else None)

    # -- one model of a population -----------------------------------------------------------

    def reset_model(self, k):
        """Model ``k`` (0 without a population) starts again, as a new optimizer would: its
        state (moments, buffers) zero, step count 0, EMA weights a copy of its parameters as
        they are now (reset those first). The other models are untouched; model k's
        hyperparameters are the param groups' values (set ``param_groups[g][key][k]``)."""
        k = self._model_index(k, "k")
        for buffer in self._state.values():
            for parts in self._store.parts(buffer):
                for part in parts:
                    row = self._model_rows(part)[k]
                    self._ops.write(row, np.zeros(tuple(row.shape), row.dtype))
        if self._ema is not None:
            for view, param in zip(self._ops.views(self._ema), self._params):
                self._ops.write(self._model_rows(view)[k], self._model_rows(param)[k])
        self._steps[k], self._sumsq[k], self._nonfinite[k], self._active[k] = 0, 0.0, False, True

    def copy_model(self, src, dst):
        """Model ``dst`` becomes a copy of model ``src``: state, step count, EMA weights and
        the per-model hyperparameters of every param group (a (K,) value gets element ``src``
        at ``dst``, in a copy: the caller's array is left alone), so that ``dst`` steps as
        ``src`` would."""
        src, dst = self._model_index(src, "src"), self._model_index(dst, "dst")
        parts = [part for buffer in self._state.values()
                 for tensor in self._store.parts(buffer) for part in tensor]
        parts += [] if self._ema is None else self._ops.views(self._ema)
        for part in parts:
            rows = self._model_rows(part)
            self._ops.write(rows[dst], rows[src])
        self._steps[dst] = self._steps[src]
        for group in self.param_groups:
            for key in self._defaults:
                value = group[key]
                group[key] = (tuple(_copied_model(v, src, dst) for v in value)
                              if key == "betas" else _copied_model(value, src, dst))

    def _model_index(self, k, argument):
        k = _validate.integer(k, argument, minimum=0)
        if k >= self.n_models:
            raise ValueError(f"{argument} must be a model index in [0, {self.n_models}); got "
                             f"{k}")
        return k

    def _model_rows(self, a):
        """``a`` (a param or state view) as per-model rows: itself for a population."""
        return a if self.population else a[None]

    @property
    def step_count(self):
        """Steps taken (per model for a population; skipped steps do not count)."""
        return self._steps.copy() if self.population else int(self._steps[0])

    def __repr__(self):
        hyper = ", ".join(f"{k}={self.param_groups[0][k]!r}" for k in self._defaults)
        return (f"{type(self).__name__}({len(self._params)} params, {self.dtype}, {hyper}, "
                f"groups={len(self.param_groups)}, models={self.n_models})")


_MISSING = object()


def _copied_model(value, src, dst):
    """A group value with model ``src``'s entry copied to ``dst``: a copy of a (K,) value;
    scalars are every model's already."""
    if np.ndim(value) == 1:
        value = np.array(value, copy=True)
        value[dst] = value[src]
    return value


def _copy(value):
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return value


def _no_8bit(optimizer, g, flag, option):
    """ValueError when 8-bit state meets an ``option`` that bitsandbytes has no 8-bit form of
    (AMSGrad's running maximum, centered RMSprop's mean)."""
    if optimizer.state_dtype == "int8" and np.any(flag != 0):
        raise ValueError(f"param_groups[{g}]: {option}=True is not available with "
                         f"state_dtype='int8' (bitsandbytes' 8-bit optimizers have no "
                         f"{option}); use state_dtype='bfloat16' or 'float32'")


class SGD(_Optimizer):
    """PyTorch's SGD. With momentum, ``b = g`` on the first step, then
    ``b = momentum*b + (1-dampening)*g``; ``p -= lr * (g + momentum*b if nesterov else b)``.

    Parameters: ``lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
    maximize=False`` (per group; scalars or length-K arrays for a population). State:
    ``momentum_buffer`` (only when momentum > 0 somewhere).
    """

    _defaults = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                 "nesterov": False, "maximize": False}
    _algorithm = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize), **options)

    def _check_group(self, g, row):
        H = self._layout.hyper
        momentum, dampening = row[:, H.momentum], row[:, H.dampening]
        bad = (row[:, H.nesterov] != 0) & ((momentum <= 0) | (dampening != 0))
        if np.any(bad):
            raise ValueError(f"param_groups[{g}]: nesterov=True needs momentum > 0 and "
                             f"dampening = 0; got momentum={momentum[bad][0]}, "
                             f"dampening={dampening[bad][0]}")

    def _row_flags(self):
        return {"use_buf": self._hyper_values("momentum") != 0}


class Momentum(_Optimizer):
    """The course notes' Momentum (not PyTorch's SGD momentum): ``V = beta*V + (1-beta)*g``,
    ``p -= lr*V``, V starting at 0.

    Parameters: ``lr=0.01, beta=0.9, weight_decay=0, maximize=False``. State: ``velocity``.
    """

    _defaults = {"lr": 0.01, "beta": 0.9, "weight_decay": 0.0, "maximize": False}
    _algorithm = "momentum"

    def __init__(self, params, lr=0.01, beta=0.9, weight_decay=0.0, maximize=False,
                 **options):
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay,
                                      maximize=maximize), **options)


class RMSprop(_Optimizer):
    """PyTorch's RMSprop: ``S = alpha*S + (1-alpha)*g*g``, ``p -= lr * g / (sqrt(S) + eps)``;
    ``centered`` subtracts the squared running mean of g under the root, ``momentum`` > 0 keeps
    ``b = momentum*b + g / (sqrt(S) + eps)`` and steps ``p -= lr*b``.

    Parameters: ``lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
    maximize=False``. State: ``square_avg``, ``grad_avg`` (centered), ``momentum_buffer``.
    """

    _defaults = {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                 "centered": False, "maximize": False}
    _algorithm = "rmsprop"

    def __init__(self, params, lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, maximize=False, **options):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered,
                                      maximize=maximize), **options)

    def _check_group(self, g, row):
        _no_8bit(self, g, row[:, self._layout.hyper.centered], "centered")

    def _row_flags(self):
        return {"centered": self._hyper_values("centered") != 0,
                "use_buf": self._hyper_values("momentum") > 0}


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
    _algorithm = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize), **options)

    def _check_group(self, g, row):
        _no_8bit(self, g, row[:, self._layout.hyper.amsgrad], "amsgrad")

    def _row_flags(self):
        return {"amsgrad": self._hyper_values("amsgrad") != 0}


class AdamW(Adam):
    """Adam with decoupled weight decay: ``p *= 1 - lr*weight_decay`` before the Adam update.

    Same parameters as :class:`Adam`, with ``weight_decay=0.01``.
    """

    _algorithm = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 amsgrad=False, maximize=False, **options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, **options)

