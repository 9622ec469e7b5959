"""fastdl's fused optimizers as ``torch.optim.Optimizer`` subclasses.

``SGD / Momentum / RMSprop / Adam / AdamW(params, <keywords of fastdl.optim>)`` step every
parameter in one fused pass (SPEC.md's order of operations), reading ``p.grad`` and the
parameters in place: CPU tensors as NumPy views, by address, with no copy. They behave as
torch's optimizers of the same name:

- ``step(closure=None)`` returns the closure's loss; a param whose grad is None is left
  alone and its step count is not advanced; step counts are per parameter, as torch's.
- ``zero_grad``, ``add_param_group``, step pre/post hooks, ``param_groups[i]["lr"]`` (so every
  ``torch.optim.lr_scheduler``) and per-group options work as in torch.
- ``state`` and ``state_dict()`` have torch's layout and key names (``step``, ``exp_avg``,
  ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ``square_avg``, ``grad_avg``): a
  state dict loads into the ``torch.optim`` optimizer of the same algorithm and options, and
  back. ``Momentum`` (the notes' form) has no torch counterpart (state ``velocity``).
- fastdl's extras are keywords: ``grad_scale``, ``skip_nonfinite``, ``max_grad_norm``,
  ``ema_decay`` (``ema_params``: tensors shaped like the params); ``last_info`` is the last
  step's :class:`fastdl.optim.StepInfo`; ``state_dtype`` and ``min_8bit_size`` (below).
  torch's ``foreach`` and ``fused`` are accepted and ignored (fastdl is always fused);
  ``capturable=True`` or ``differentiable=True`` is a ValueError.

Speed: the step's plan (the addresses of params and grads and the chunk table) is cached and
rebuilt only when a grad tensor changes, so reading 200 ``.grad`` attributes costs little
beside the update. Parameters at different step counts (after steps where some grads were
None) are stepped as one fused pass per distinct count; ``max_grad_norm`` and
``skip_nonfinite`` then apply to each such set of parameters on its own.

Low-precision state (``state_dtype``, SPEC.md "Low-precision optimizer state"): the state
entries stay live views of the core's storage. ``"float32"`` / ``"float64"``: tensors of that
dtype under torch's names; ``"bfloat16"``: ``torch.bfloat16`` tensors (views of the stored
bits) under torch's names; ``"int8"``: bitsandbytes' names for a param of at least
``min_8bit_size`` elements, ``state1`` / ``state2`` (uint8 codes shaped like the param) and
``absmax1`` / ``absmax2`` (float32, one per block of 256), state 1 and 2 being the
optimizer's buffers in torch's order (Adam: ``exp_avg``, ``exp_avg_sq``; SGD:
``momentum_buffer``; Momentum: ``velocity``; RMSprop: ``square_avg``, ``momentum_buffer``),
and torch's names in float32 for the smaller params. :meth:`state_dict` holds copies of the
same entries (a resume is bit-identical) and its ``"fastdl"`` entry the options. Loading
converts as the core's stores do: float32 state (torch.optim's) is rounded to bfloat16 or
quantized to 8 bits; bfloat16 and 8-bit entries are decoded into a float optimizer, bfloat16
ones quantized into an 8-bit one. An 8-bit dict of another ``min_8bit_size`` or block layout
is a ValueError naming the entry. Such dicts load into fastdl.torch only (a bfloat16 one also
into torch.optim, which casts it).

CUDA tensors go through ``__cuda_array_interface__`` (untested here: no GPU).
"""

import math
import operator

import numpy as np
import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .. import _validate
from .. import optim as _core
from .._state import MIN_8BIT_SIZE
from ._tensors import check_float, tensor


def _flat(t, name):
    """A 1-D view over the memory of dense tensor ``t`` (contiguous or any permutation of a
    contiguous layout, such as channels-last): fastdl's updates are elementwise, so a param,
    its grad and its state only need one layout. Other layouts: ValueError."""
    t = t.detach()
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in order:
        if t.size(d) != 1 and t.stride(d) != expected:
            raise ValueError(f"{name} must be dense (contiguous, or a permuted contiguous "
                             f"layout such as channels-last); got shape {tuple(t.shape)} and "
                             f"strides {t.stride()}")
        expected *= t.size(d)
    return torch.as_strided(t, (t.numel(),), (1,), t.storage_offset())


def _as_array(t):
    if t.is_cuda:
        from numba import cuda

        return cuda.as_cuda_array(t)
    return t.numpy()


class _Optimizer(torch.optim.Optimizer):
    """The adapter shared by every optimizer: torch's param groups and state on the outside,
    a ``fastdl.optim`` optimizer (the core) over 1-D views of the params inside.

    Subclasses name the core class and pass every group key (the core's and torch's own) as
    ``defaults``."""

    _core_class = None  # the fastdl.optim class
    _counts_steps = True  # whether torch's state holds "step" (not SGD's)

    def __init__(self, params, defaults, grad_scale=None, skip_nonfinite=False,
                 max_grad_norm=None, ema_decay=None, state_dtype=None,
                 min_8bit_size=MIN_8BIT_SIZE):
        for key in ("capturable", "differentiable"):
            if defaults.get(key):
                raise ValueError(f"{key}=True is not supported by fastdl's fused step; use "
                                 "torch.optim for it")
        self._core = None
        self._saved = None
        self._params = []
        self._options = dict(grad_scale=grad_scale, skip_nonfinite=skip_nonfinite,
                             max_grad_norm=max_grad_norm, ema_decay=ema_decay,
                             state_dtype=state_dtype, min_8bit_size=min_8bit_size)
        self.last_info = None
        super().__init__(params, defaults)
        self._build()  # validates the hyperparameters now, as torch's constructors do

    # -- torch's interface -----------------------------------------------------------------

    def add_param_group(self, param_group):
        """torch's ``add_param_group``; the fused plan is rebuilt (state kept) at the next
        step."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        first = self._params[0] if self._params else group["params"][0]
        try:
            _check_torch_options(group, f"param_groups[{index}]")
            for j, p in enumerate(group["params"]):
                name = f"param_groups[{index}]['params'][{j}]"
                check_float(p, name)
                if p.dtype != first.dtype or p.device != first.device:
                    raise TypeError(f"{name} is {p.dtype} on {p.device} but the first param "
                                    f"is {first.dtype} on {first.device}: fastdl.torch "
                                    "steps params of one dtype on one device")
                _flat(p, name)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        if self._core is None:  # torch's constructor adding the first groups
            self._params = [p for g in self.param_groups for p in g["params"]]
            return
        saved, params = self._snapshot(), self._params
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._saved = saved
        try:
            self._build()
        except (TypeError, ValueError):  # the new group's options: as if never added
            self.param_groups.pop()
            self._params, self._saved = params, saved
            self._build()
            raise

    def step(self, closure=None):
        """One fused update of every param with a grad; returns ``closure()``'s loss (the
        closure runs first, with grad enabled), as torch's ``step``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        args = (self,) if closure is None else (self, closure)
        hooks = bool(_global_optimizer_pre_hooks or self._optimizer_step_pre_hooks
                     or self._optimizer_step_post_hooks or _global_optimizer_post_hooks)
        if hooks:
            for hook in (*_global_optimizer_pre_hooks.values(),
                         *self._optimizer_step_pre_hooks.values()):
                if hook(self, args, {}) is not None:
                    raise RuntimeError("fastdl.torch optimizers take no step pre-hook that "
                                       "replaces step's arguments")
        self._step()
        if hooks:
            for hook in (*self._optimizer_step_post_hooks.values(),
                         *_global_optimizer_post_hooks.values()):
                hook(self, args, {})
        return loss

    # torch.optim.Optimizer wraps a subclass's ``step`` in a profiler record and its hook loop
    # (~6 us a call); this ``step`` runs the hooks itself, and only when there are any.
    step.hooked = True

    # -- the step --------------------------------------------------------------------------

    def _build(self):
        """The core optimizer over 1-D views of the params (in torch's order), with the state
        of the previous core (before ``add_param_group``) carried over."""
        arrays = [_as_array(_flat(p, f"params[{j}]")) for j, p in enumerate(self._params)]
        groups, first = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({"params": arrays[first:first + n],
                           **{k: group[k] for k in self._core_class._defaults}})
            first += n
        core = self._core = self._core_class(groups, **self._options)
        n = len(self._params)
        self._offsets = np.concatenate([[0], np.cumsum([p.numel() for p in self._params])])
        self._grads = self._addresses = self._plan = self._exposed = None
        self._all_have_state = False
        self._counts = np.zeros(n, np.int64)
        self._uniform = True  # every param at the same step count
        self._has_state = np.zeros(n, np.bool_)
        # torch's "step" entries: 0-d views of one float32 tensor, refreshed by one copy
        self._step_values = np.zeros(n, np.float32)
        self._step_tensor = torch.from_numpy(self._step_values)
        if self._saved is not None:
            self._restore(self._saved)
            self._saved = None
        return core

    def _sync_groups(self, core):
        """Copy the group values torch's side may have changed (lr schedulers write
        ``param_groups[i]["lr"]``) into the core's groups; the core validates what changed."""
        for g, (group, core_group) in enumerate(zip(self.param_groups, core.param_groups)):
            for key in core_group:
                if key != "params" and group[key] is not core_group[key]:
                    core_group[key] = group[key]
            if group.get("capturable") or group.get("differentiable"):
                _check_torch_options(group, f"param_groups[{g}]")

    def _grads_plan(self, core):
        """(present, plan): which params have a grad this step (bool per param), and the
        core's plan over them (None when none has). Cached while the grad tensors and their
        addresses stay the same."""
        grads = [p.grad for p in self._params]
        if self._grads is not None and all(map(operator.is_, grads, self._grads)):
            if [0 if g is None else g.data_ptr() for g in grads] == self._addresses:
                return self._present, self._plan
        present = np.array([g is not None for g in grads], np.bool_)
        for j, (p, g) in enumerate(zip(self._params, grads)):
            if g is not None:
                _check_grad(j, p, g)
        addresses = [0 if g is None else g.data_ptr() for g in grads]
        if not present.any():
            plan = None
        elif self._params[0].is_cuda:  # the array path: the core plans from device arrays
            plan = [None if g is None else _as_array(_flat(g, f"params[{j}].grad"))
                    for j, g in enumerate(grads)]
        else:
            self._grad_addresses = np.array(addresses, np.int64)
            plan = core._ops.address_plan(self._grad_addresses,
                                          None if present.all() else present)
        self._grads, self._addresses, self._present, self._plan = grads, addresses, present, plan
        self._all_present = bool(present.all())
        return present, plan

    def _step(self):
        core = self._core
        self._sync_groups(core)
        present, plan = self._grads_plan(core)
        if plan is None:
            return
        counts = self._counts
        if self._uniform and self._all_present:  # the usual step: one fused pass
            core._steps[0] = counts[0]
            self.last_info = self._run(core, plan)
            counts[:] = core._steps[0]
        else:  # one pass per step count among the params with a grad
            before = counts.copy()
            for count in np.unique(before[present]):
                chosen = present & (before == count)
                if np.array_equal(chosen, present):
                    part = plan
                elif self._params[0].is_cuda:
                    part = [a if c else None for a, c in zip(plan, chosen)]
                else:
                    part = core._ops.address_plan(self._grad_addresses, chosen)
                core._steps[0] = count
                self.last_info = self._run(core, part)
                counts[chosen] = core._steps[0]
            self._uniform = bool(np.all(counts == counts[0]))
        self._step_values[:] = counts
        # the core makes new state arguments when its buffers may have changed
        if core._state_args is not self._exposed or not self._all_have_state:
            self._expose_state(core, present)

    def _run(self, core, plan):
        if self._params[0].is_cuda:
            return core.step(plan)
        return core._run(plan)

    # -- state in torch's layout -----------------------------------------------------------

    def _state_view(self, flat, j):
        """Param j's part of a core flat buffer as a tensor shaped (and strided) like it."""
        p = self._params[j]
        part = flat[int(self._offsets[j]):int(self._offsets[j + 1])]
        return torch.as_strided(tensor(part, p), p.shape, p.stride())

    def _shaped(self, a, j, dtype=None):
        """Array ``a`` (param j's elements in its memory order, and maybe padding after them)
        as a live tensor shaped and strided like param j; ``dtype`` reinterprets the bits
        (bfloat16 over uint16)."""
        p = self._params[j]
        t = tensor(a, p)
        if dtype is not None:
            t = t.view(dtype)
        return torch.as_strided(t, p.shape, p.stride())

    def _state_names(self, core):
        """The core buffers a torch optimizer of these options keeps (torch's names)."""
        return [n for n in core._needed_state() if n in core._state]

    @staticmethod
    def _8bit_names(core):
        """The buffers that may hold 8-bit state, in torch's order: bitsandbytes' state 1, 2
        (int8 rejects AMSGrad's maximum and centered RMSprop's mean)."""
        return [n for n in core._known_state() if n not in _NOT_8BIT]

    def _torch_state(self, core, names, rows):
        """{param position: {key: live tensor}} of buffers ``names`` for the params ``rows``:
        torch's names over float storage (bfloat16 as ``torch.bfloat16`` views of the stored
        bits), bitsandbytes' ``stateN`` / ``absmaxN`` for a param with 8-bit state."""
        store = core._store
        quantized = store.quantized  # None for float storage
        bits = torch.bfloat16 if store.name == "bfloat16" else None
        number = {n: i + 1 for i, n in enumerate(self._8bit_names(core))}
        parts = {name: store.parts(core._state[name]) for name in names}
        out = {}
        for j in rows:
            j = int(j)
            entry = out[j] = {}
            if quantized is not None and quantized[j]:
                n = self._params[j].numel()
                for name in names:
                    codes, absmax = parts[name][j]
                    entry[f"state{number[name]}"] = self._shaped(codes[:n], j)
                    entry[f"absmax{number[name]}"] = tensor(absmax, self._params[j])
            else:
                for name in names:
                    entry[name] = self._shaped(parts[name][j][0], j, bits)
        return out

    def _expose_state(self, core, present):
        """``self.state[p]``: live views of the core's buffers for the params stepped at least
        once (``present`` are those of this step)."""
        self._has_state |= present
        rows = np.flatnonzero(self._has_state)
        views = self._torch_state(core, self._state_names(core), rows)
        for j in rows:
            p = self._params[j]
            entry = self.state[p]
            entry.clear()
            if self._counts_steps:
                entry["step"] = self._step_tensor[j]
            entry.update(views[int(j)])
            if not entry:
                del self.state[p]  # torch's SGD at momentum 0 keeps nothing
        self._exposed = core._state_args
        self._all_have_state = bool(self._has_state.all())

    @property
    def ema_params(self):
        """The EMA weights (when ``ema_decay`` is set), tensors shaped like the params."""
        if self._options["ema_decay"] is None:
            return None
        core = self._core
        return [self._state_view(core._ema, j) for j in range(len(self._params))]

    def _snapshot(self):
        """What the core holds, as host copies per param (kept across a rebuild): the state
        as the core's store saves it (8-bit codes and absmax as they are)."""
        core = self._core
        return {"counts": self._counts.copy(), "has_state": self._has_state.copy(),
                "state": {name: core._store.saved(buf) for name, buf in core._state.items()},
                "ema": None if core._ema is None else
                [core._ops.host_copy(v) for v in core._ops.views(core._ema)]}

    def _restore(self, saved):
        core, n = self._core, len(saved["counts"])
        self._counts[:n] = saved["counts"]
        self._has_state[:n] = saved["has_state"]
        self._uniform = bool(np.all(self._counts == self._counts[0]))
        self._step_values[:] = self._counts
        fresh = None
        for name, arrays in saved["state"].items():
            if fresh is None:  # what a new param's state starts as
                fresh = core._store.saved(core._zero_state())
            arrays = list(arrays) + fresh[len(arrays):]
            arrays = core._store.checked(arrays, f"state[{name!r}]", core._shapes,
                                         core._signed[name])
            core._state[name] = core._zero_state()
            core._store.write(core._state[name], arrays)
        if saved["ema"] is not None and core._ema is not None:
            for view, a in zip(core._ops.views(core._ema), saved["ema"]):
                core._ops.write(view, a)
        self._expose_state(core, np.zeros(len(self._params), np.bool_))

    def state_dict(self):
        """torch's layout: ``{"state": {param index: {"step": tensor, <buffers>}},
        "param_groups": [{<options>, "params": [indices]}]}``, copies (not views) of the
        state (the stored bits: bfloat16 tensors, 8-bit ``stateN`` / ``absmaxN``); plus
        ``"fastdl"``: this optimizer's options (``state_dtype`` and ``min_8bit_size``
        included) and EMA weights, which torch's ``load_state_dict`` ignores."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = {}
        rows = np.flatnonzero(self._has_state)
        views = self._torch_state(self._core, self._state_names(self._core), rows)
        for j in rows:
            entry = {"step": torch.tensor(float(self._counts[j]))} if self._counts_steps else {}
            for key, value in views[int(j)].items():
                entry[key] = value.clone()
            if entry:
                state[int(j)] = entry
        groups, first = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(first, first + n))})
            first += n
        ema = self.ema_params
        result = {"state": state, "param_groups": groups,
                  "fastdl": {"options": dict(self._options),
                             "ema": None if ema is None else [e.clone() for e in ema]}}
        for hook in self._optimizer_state_dict_post_hooks.values():
            returned = hook(self, result)
            if returned is not None:
                result = returned
        return result

    def load_state_dict(self, state_dict):
        """Load :meth:`state_dict`'s output, or a ``torch.optim`` optimizer's of the same
        algorithm and options (its state is copied in; steps continue identically). The whole
        dict is checked first: a rejected load changes nothing. ValueError for a wrong layout,
        count, shape or value (8-bit state of another block layout or ``min_8bit_size``
        included); TypeError for a wrong type or dtype (state is never cast, except as the
        state dtypes convert: float32 into bfloat16 or 8-bit, bfloat16 into any, 8-bit into
        float). fastdl's options (``grad_scale``, ``state_dtype``, ...) stay this
        optimizer's."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            returned = hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        core = self._core
        groups, stepped, counts, ema, buffers = self._checked_state_dict(state_dict, core)
        # Nothing below raises: every value was validated above.
        for group, saved in zip(self.param_groups, groups):
            group.update(saved)
        self._sync_groups(core)
        core._refresh_hyper()
        for name, arrays in buffers.items():  # what the saved state lacks starts at zero
            if name not in core._state:
                core._state[name] = core._zero_state()
            core._store.write(core._state[name], arrays)
        if ema is not None and core._ema is not None:
            for j, value in enumerate(ema):
                self._state_view(core._ema, j).copy_(value)
        core._state_args = None
        self._counts[:] = counts
        self._uniform = bool(np.all(counts == counts[0]))
        self._step_values[:] = counts
        self._has_state[:] = False
        self._has_state[stepped] = True
        self.state.clear()
        self._expose_state(core, np.zeros(len(self._params), np.bool_))
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _checked_state_dict(self, d, core):
        """(group values, positions of the params with state, step counts, EMA tensors or
        None, {buffer: the core store's checked arrays, every param's}) of state dict ``d``,
        every value checked."""
        if not isinstance(d, dict):
            raise TypeError(f"state_dict must be a dict from state_dict(); got "
                            f"{type(d).__name__}")
        for key in ("state", "param_groups"):
            if key not in d:
                raise ValueError(f"state_dict has no {key!r} entry")
        saved_groups = _validate.saved_param_groups(d["param_groups"], len(self.param_groups))
        groups = []
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{g}]"
            if not isinstance(saved, dict) or "params" not in saved:
                raise ValueError(f"{where} must be a dict with a 'params' entry")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict param group {g} has {len(saved['params'])} "
                                 f"params; this optimizer's has {len(group['params'])}")
            values = {k: v for k, v in saved.items() if k != "params"}
            unknown = set(values) - set(group) - {"initial_lr"}  # lr schedulers add it
            if unknown:
                raise ValueError(f"{where} has option(s) {sorted(unknown)} that "
                                 f"{type(self).__name__} does not take")
            _check_torch_options(values, where)
            core._checked_row(g, {k: values.get(k, group[k])
                                  for k in self._core_class._defaults})
            groups.append(values)
        fastdl = d.get("fastdl") or {}
        if not isinstance(fastdl, dict):
            raise TypeError(f"state_dict['fastdl'] must be a dict; got {type(fastdl).__name__}")
        self._check_saved_layout(fastdl.get("options"), core)

        # saved param indices follow the saved groups' "params" lists, in order
        position = {i: j for j, i in enumerate(i for s in saved_groups for i in s["params"])}
        saved_state = d["state"]
        if not isinstance(saved_state, dict):
            raise TypeError("state_dict['state'] must be a dict {param index: state}; got "
                            f"{type(saved_state).__name__}")
        counts = np.zeros(len(self._params), np.int64)
        state = {}
        for index, entry in saved_state.items():
            if index not in position:
                raise ValueError(f"state_dict['state'] has an entry for param {index!r}, "
                                 "which no saved param group lists")
            j, where = position[index], f"state_dict['state'][{index!r}]"
            if not isinstance(entry, dict):
                raise TypeError(f"{where} must be a dict; got {type(entry).__name__}")
            step, state[j] = self._checked_entry(core, j, where, entry)
            if step is not None:
                counts[j] = step
            if not self._counts_steps and state[j]:
                counts[j] = 1  # torch's SGD keeps no count: a buffer means it has stepped
        ema = fastdl.get("ema")
        if ema is not None:
            if not isinstance(ema, (list, tuple)) or len(ema) != len(self._params):
                raise ValueError("state_dict['fastdl']['ema'] must hold one tensor per param")
            if self._options["ema_decay"] is None:
                raise ValueError("state_dict holds EMA weights but this optimizer has "
                                 "ema_decay=None")
            ema = [_checked_like(e, p, f"state_dict['fastdl']['ema'][{j}]")
                   for j, (e, p) in enumerate(zip(ema, self._params))]

        # Every buffer loaded or held, for every param, as the core's store writes it: the
        # saved entries converted to the state dtype, zero state for the params without one.
        buffers, fresh = {}, None
        names = list(core._state) + [n for e in state.values() for n in e
                                     if n not in core._state]
        for name in dict.fromkeys(names):
            if fresh is None:
                fresh = core._store.saved(core._zero_state())
            arrays = [state[j][name] if j in state and name in state[j] else fresh[j]
                      for j in range(len(self._params))]
            buffers[name] = core._store.checked(
                arrays, f"state_dict['state'][...][{name!r}] by param position", core._shapes,
                core._signed[name])
        return groups, list(state), counts, ema, buffers

    def _check_saved_layout(self, options, core):
        """An 8-bit state dict of fastdl.torch (its ``"fastdl"`` options) must have this
        optimizer's ``min_8bit_size``: another puts 8-bit codes on other params."""
        if not isinstance(options, dict) or core.state_dtype != "int8" \
                or options.get("state_dtype") != "int8":
            return
        saved, mine = options.get("min_8bit_size", MIN_8BIT_SIZE), core._store.min_8bit_size
        if isinstance(saved, bool) or not isinstance(saved, (int, np.integer)) or saved != mine:
            raise ValueError(f"state_dict['fastdl']['options']['min_8bit_size'] is {saved!r} "
                             f"but this optimizer's is {mine}: a state dict of another "
                             "min_8bit_size keeps 8-bit state for other params (construct the "
                             f"optimizer with min_8bit_size={saved!r} to load it)")

    def _checked_entry(self, core, j, where, entry):
        """(step count or None, {buffer: host array or {"codes", "absmax"}}) of param j's
        saved ``entry`` (``where`` names it): the arrays flat in the param's memory order, as
        the core's store takes them."""
        known, store, p = core._known_state(), core._store, self._params[j]
        number = {i + 1: n for i, n in enumerate(self._8bit_names(core))}
        eight = {f"{kind}{i}" for i in number for kind in ("state", "absmax")}
        step, out = None, {}
        for key, value in entry.items():
            if key == "step":
                step = _step_count(value, f"{where}['step']")
            elif key in known:
                if value is not None:  # torch's SGD may keep momentum_buffer=None
                    out[key] = self._checked_float(core, value, j, f"{where}[{key!r}]")
            elif key not in eight:
                extra = f" and 8-bit {sorted(eight)}" if eight else ""
                raise ValueError(f"{where} has unknown entry {key!r}; "
                                 f"{type(self).__name__} keeps {known}, 'step'{extra}")
        for i, name in number.items():
            codes, absmax = f"state{i}", f"absmax{i}"
            if codes not in entry and absmax not in entry:
                continue
            for key in (codes, absmax):
                if key not in entry:
                    other = absmax if key == codes else codes
                    raise ValueError(f"{where} has {other!r} but no {key!r}: 8-bit state is "
                                     "the pair of codes and absmax")
            if name in out:
                raise ValueError(f"{where} holds {name!r} twice: as {name!r} and as 8-bit "
                                 f"{codes!r}")
            if store.quantized is not None and not store.quantized[j]:
                raise ValueError(
                    f"{where}[{codes!r}] holds 8-bit codes, but this optimizer keeps float32 "
                    f"state for params of under min_8bit_size={store.min_8bit_size} elements "
                    f"(this one has {p.numel()}): a state dict of another min_8bit_size")
            out[name] = _checked_codes(entry[codes], entry[absmax], p, f"{where}[{codes!r}]",
                                       f"{where}[{absmax!r}]")
        return step, out

    def _checked_float(self, core, value, j, name):
        """A saved float state tensor of param j as a flat host array in its memory order;
        TypeError for a dtype the state dtype does not take."""
        p = self._params[j]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(value).__name__}")
        accepted = _accepted_dtypes(core)
        if value.dtype not in accepted:
            names = " or ".join(str(d).replace("torch.", "") for d in accepted)
            raise TypeError(f"{name} must be {names} (state_dtype={core.state_dtype!r} over "
                            f"{p.dtype} params); got {value.dtype} (no other dtype converts)")
        if value.shape != p.shape:
            raise ValueError(f"{name} must have shape {tuple(p.shape)}; got "
                             f"{tuple(value.shape)}")
        return _host_flat(value, p)

    def __repr__(self):
        return f"fastdl.torch.{super().__repr__()}"


def _check_torch_options(group, where):
    for key in ("capturable", "differentiable"):
        if group.get(key):
            raise ValueError(f"{where}[{key!r}]=True is not supported by fastdl's fused "
                             "step; use torch.optim for it")


def _check_grad(j, p, g):
    name = f"params[{j}].grad"
    if g.layout != torch.strided:
        raise TypeError(f"{name} is a sparse tensor ({g.layout}): fastdl's fused step takes "
                        "dense grads (torch's SparseAdam takes sparse ones)")
    if g.dtype != p.dtype or g.device != p.device:
        raise TypeError(f"{name} must be {p.dtype} on {p.device} like params[{j}]; got "
                        f"{g.dtype} on {g.device}")
    if g.shape != p.shape:
        raise ValueError(f"{name} must have shape {tuple(p.shape)}; got {tuple(g.shape)}")
    if g.numel() > 1 and g.stride() != p.stride():
        raise ValueError(f"{name} has strides {g.stride()} but params[{j}] has {p.stride()}: "
                         "fastdl steps a param and its grad in one layout (torch's autograd "
                         "gives a grad its param's layout)")


def _checked_like(value, p, name):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(value).__name__}")
    if value.dtype != p.dtype:
        raise TypeError(f"{name} must be {p.dtype} like its param; got {value.dtype} (state "
                        "is never cast)")
    if value.shape != p.shape:
        raise ValueError(f"{name} must have shape {tuple(p.shape)}; got {tuple(value.shape)}")
    return value


_NOT_8BIT = ("max_exp_avg_sq", "grad_avg")  # state that int8 rejects (amsgrad, centered)


def _accepted_dtypes(core):
    """The torch dtypes a saved float state tensor may have, as the core's stores take them:
    the storage's, and bfloat16 everywhere (exact in float32); bfloat16 storage also takes
    float32 (rounded), int8 takes float32 (quantized for its 8-bit params)."""
    name = core._store.name
    if name == "int8":
        return (torch.float32, torch.bfloat16)
    if name == "bfloat16":
        return (torch.bfloat16, torch.float32)
    return (getattr(torch, name), torch.bfloat16)


def _host_flat(value, p):
    """``value`` (shaped like param ``p``) as a 1-D host NumPy copy in ``p``'s memory order
    (bfloat16 as its uint16 bits)."""
    t = torch.empty_strided(tuple(p.shape), p.stride(), dtype=value.dtype)
    t.copy_(value.detach())
    flat = _flat(t, "state")
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.uint16)
    return flat.numpy()


def _checked_codes(codes, absmax, p, codes_name, absmax_name):
    """A saved 8-bit pair of param ``p`` as the core's ``{"codes", "absmax"}`` host arrays."""
    from fastdl.kernels.quantize import BLOCK

    for name, a, dtype in ((codes_name, codes, torch.uint8), (absmax_name, absmax,
                                                              torch.float32)):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(a).__name__}")
        if a.dtype != dtype:
            raise TypeError(f"{name} must be {str(dtype).replace('torch.', '')}; got "
                            f"{a.dtype}")
    if codes.shape != p.shape:
        raise ValueError(f"{codes_name} must have the param's shape {tuple(p.shape)}; got "
                         f"{tuple(codes.shape)}")
    blocks = -(-p.numel() // BLOCK)
    if tuple(absmax.shape) != (blocks,):
        raise ValueError(f"{absmax_name} must have shape ({blocks},) (one absmax per block of "
                         f"{BLOCK} values of the param's {p.numel()}); got "
                         f"{tuple(absmax.shape)}: a state dict of another block layout")
    return {"codes": _host_flat(codes, p),
            "absmax": absmax.detach().cpu().numpy().copy()}


def _step_count(value, name):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be one number; got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    if value < 0 or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{name} must be a whole number >= 0; got {value}")
    return int(value)


class SGD(_Optimizer):
    """torch.optim.SGD on fastdl's fused step (state ``momentum_buffer`` when momentum > 0)."""

    _core_class = _core.SGD
    _counts_steps = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize, foreach=foreach,
                                      differentiable=differentiable, fused=fused), **options)


class Momentum(_Optimizer):
    """The course notes' Momentum (no torch counterpart): ``V = beta*V + (1-beta)*g``,
    ``p -= lr*V``; state ``velocity`` and ``step``."""

    _core_class = _core.Momentum

    def __init__(self, params, lr=0.01, beta=0.9, weight_decay=0, *, maximize=False,
                 **options):
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay,
                                      maximize=maximize), **options)


class RMSprop(_Optimizer):
    """torch.optim.RMSprop on fastdl's fused step (state ``square_avg``, ``momentum_buffer``
    when momentum > 0, ``grad_avg`` when centered)."""

    _core_class = _core.RMSprop

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps,
                                      centered=centered, weight_decay=weight_decay,
                                      capturable=capturable, foreach=foreach,
                                      maximize=maximize, differentiable=differentiable),
                         **options)


class Adam(_Optimizer):
    """torch.optim.Adam on fastdl's fused step (state ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` with amsgrad). ``decoupled_weight_decay=True`` (chosen at
    construction, for every group) is AdamW."""

    _core_class = _core.Adam

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False, **options):
        if decoupled_weight_decay:
            self._core_class = _core.AdamW
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                                      capturable=capturable, differentiable=differentiable,
                                      fused=fused,
                                      decoupled_weight_decay=bool(decoupled_weight_decay)),
                         **options)


class AdamW(Adam):
    """torch.optim.AdamW on fastdl's fused step: Adam with ``p *= 1 - lr*weight_decay``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, **options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, **options)
