"""The optimizers' ops (``fastdl._dispatch``'s pattern): where the params live decides how a
step runs. ``OptimCpu`` drives the ``kernels/optim.py`` kernels by address, ``OptimCuda``
launches ``kernels/optim_cuda.py``. Both work from the same chunk tables (rows laid out as
``kernels.optim.CHUNK``: ptr, model, row, lo, hi, state, flat) and offer the optimizer the same few
operations.
"""

import operator

import numpy as np

from . import _validate
from ._dispatch import CudaOps, HostOps
from .device import is_device_array


def segments(sizes, tensor_groups, n_models, state_offset=None):
    """One chunk-table row (tensor, model, row, lo, hi, state, flat) per tensor and model:
    model k of tensor j is elements [k*n, (k+1)*n) of it (n = size / K), at ``flat`` in all
    params laid end to end; its state sits at ``state_offset(j, k)`` (default: ``flat``)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rows = []
    for j, size in enumerate(sizes):
        per_model = int(size) // n_models
        for k in range(n_models):
            lo = k * per_model
            flat = int(offsets[j]) + lo
            state = flat if state_offset is None else state_offset(j, k)
            rows.append([j, k, tensor_groups[j] * n_models + k, lo, lo + per_model, state,
                         flat])
    return rows


def merged(rows, sizes):
    """The rows of tensors that lie back to back in one buffer, addressed from its start, with
    neighbours of the same coefficient row joined."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for j, k, row, lo, hi, _, _ in rows:
        start = int(offsets[j]) + lo
        if out and out[-1][2] == row and out[-1][4] == start:
            out[-1][4] = start + hi - lo
        else:
            out.append([0, k, row, start, start + hi - lo, start, start])
    return out


def split(rows, chunk):
    """Chunks of at most ``chunk`` elements, each starting a multiple of ``chunk`` past its
    row's start, as an int64 (n, 7) table."""
    table = []
    for ptr, model, row, lo, hi, state, flat in rows:
        for start in range(lo, hi, chunk):
            table.append((ptr, model, row, start, min(hi, start + chunk), state + start - lo,
                          flat + start - lo))
    return np.array(table, np.int64).reshape(-1, 7)


def by_model(table):
    """The chunk table's rows ordered by model (stable: each model's chunks keep their order).

    The CPU kernels' ``prange`` gives each thread a contiguous range of chunks: in tensor order
    a population's first tensors (its large weights, K chunks each) went to one thread and the
    small ones to the other (the population's Adam ran no faster on 2 threads than on 1); by
    model each range holds whole models, all of one size. Each model's chunks stay in tensor
    order, so its per-model sums (the gradient norm) add up as a lone model's."""
    return table[np.argsort(table[:, 1], kind="stable")]


def _consecutive(addresses, sizes, itemsize):
    return bool(np.all(addresses[1:] == addresses[:-1] + sizes[:-1] * itemsize))


class _Optim:
    """What both devices share: the grads identity cache and the count check."""

    def __init__(self, params, tensor_groups, n_models, algorithm):
        self.params = params
        self.shapes = [tuple(p.shape) for p in params]
        self.sizes = np.array([int(np.prod(s)) for s in self.shapes], np.int64)
        self.total = int(self.sizes.sum())
        self.dtype = np.dtype(params[0].dtype)
        self.tensor_groups, self.n_models = tensor_groups, n_models
        self.rows = segments(self.sizes, tensor_groups, n_models)
        self.quantized = None  # per tensor, with 8-bit state: whether its state is 8-bit
        self.algorithm = algorithm
        self._seen = None
        self._plan = None
        self._subsets = {}  # present pattern -> its rows (and, per device, its tables)

    def prepare(self, grads):
        """Check ``grads`` and return the step's plan; cached on the grads' identity, since
        training loops usually pass the same buffers every step. A None grad leaves its param
        and state out of the step (PyTorch's rule for a param without a grad)."""
        if self._seen is not None and len(grads) == len(self._seen) and all(
                map(operator.is_, grads, self._seen)):
            for j, g in enumerate(grads):  # what can change in place
                if g is not None and (tuple(g.shape) != self.shapes[j] or g.dtype != self.dtype):
                    _validate.grad_error(j, g, self.params[j], self.device)
            return self._plan
        if len(grads) != len(self.shapes):
            raise ValueError(f"grads must hold one array per param ({len(self.shapes)}); got "
                             f"{len(grads)}")
        present = np.array([g is not None for g in grads], np.bool_)
        if not present.any():
            raise ValueError("grads holds no array (every entry is None): nothing to step")
        plan = self._plan_for(grads, None if present.all() else present)
        self._seen, self._plan = list(grads), plan
        return plan

    def use_8bit_state(self, store):
        """Lay the state out as ``store`` (``fastdl._state.Int8Store``) keeps it: the chunk
        tables address each model's state by its place in the codes or in the float32 array,
        chunks start at block boundaries, and no rows are merged (blocks restart at each
        tensor and model)."""
        self.quantized = store.quantized
        self.rows = segments(self.sizes, self.tensor_groups, self.n_models, store.state_offset)
        self._subsets = {}
        self._seen = self._plan = None
        self._build_plans()

    def _subset(self, present):
        """The chunk-table rows of the tensors marked in ``present`` (bool per tensor), cached
        per pattern: a table's identity keys the kernels chosen for it."""
        key = present.tobytes()
        rows = self._subsets.get(key)
        if rows is None:
            rows = self._subsets[key] = [r for r in self.rows if present[r[0]]]
        return key, rows

    def _set_param_ranges(self):
        """Remember the params' byte ranges, sorted, to refuse grads that alias them."""
        ends = self.param_addresses + self.sizes * self.dtype.itemsize
        self._param_ranges = _validate.sorted_ranges(self.param_addresses, ends)

    def _check_aliasing(self, addresses):
        _validate.grads_apart_from_params(addresses, addresses + self.sizes * self.dtype.itemsize,
                                          self._param_ranges)

    def views(self, flat):
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        return [flat[int(offsets[j]):int(offsets[j + 1])].reshape(s)
                for j, s in enumerate(self.shapes)]


class OptimCpu(_Optim, HostOps):
    """NumPy arrays: one compiled call per pass, however many arrays (addresses, not arrays,
    are passed: see kernels/pointers.py)."""

    def __init__(self, params, tensor_groups, n_models, algorithm):
        super().__init__(params, tensor_groups, n_models, algorithm)
        from fastdl.kernels import config, optim
        from fastdl.kernels.pointers import address

        self._kernels, self._address, self._config = optim, address, config
        self.parallel = self.total >= config.PARALLEL_MIN_SIZE  # when more threads than one
        self.param_addresses = np.array([p.__array_interface__["data"][0] for p in params],
                                        np.int64)
        self._set_param_ranges()
        self.placeholder = np.zeros(0, self.dtype)
        self._row_flags = None
        self._build_plans()

    def _build_plans(self):
        config = self._config
        chunk = min(config.MAX_CHUNK_SIZE,
                    max(config.MIN_CHUNK_SIZE, -(-self.total // (4 * config.threads()))))
        if self.quantized is not None:  # whole blocks (MIN_CHUNK_SIZE is a multiple)
            block = self._kernels.BLOCK
            chunk = -(-chunk // block) * block
        self.chunk = chunk
        self.separate_plan = by_model(split(self.rows, chunk))
        self._subset_tables = {}
        self.flat_plan = None
        if self.quantized is None and _consecutive(self.param_addresses, self.sizes,
                                                   self.dtype.itemsize):
            self.flat_plan = by_model(split(merged(self.rows, self.sizes), chunk))
        self._runs = {}  # (chunk table id, parallel) -> [(update kernel, its chunks, 8-bit)]

    def set_row_flags(self, row_flags, use_ema):
        """``row_flags`` (coefficient rows, flags) bool: which specialized update runs which
        chunks (kernels.optim.update_kernel); ``use_ema``: whether EMA weights are kept."""
        self._row_flags, self._use_ema = row_flags, use_ema
        self._runs = {}

    def _parallel_now(self):
        """Whether this step runs the parallel kernels: a large enough step and, now, more than
        one thread (beside BLAS, ``cpu_threads(1)``, the serial kernels do the same work, and a
        run that never needs the parallel ones never compiles them; a child forked after
        OpenMP ran gets the serial ones: kernels/config.py)."""
        return self.parallel and self._config.use_parallel(self.total)

    def _runs_for(self, table, parallel):
        """The (kernel, chunk table, 8-bit) triples of one step over ``table``: one per
        combination of flags among its rows (usually one for the whole table), and with 8-bit
        state one more per combination for the tensors that keep float32 state."""
        runs = self._runs.get((id(table), parallel))
        if runs is None:
            kernels = self._kernels
            chunk_flags = self._row_flags[table[:, kernels.CHUNK.row]]
            eight_bit = (np.zeros(len(table), bool) if self.quantized is None
                         else self.quantized[table[:, kernels.CHUNK.ptr]])
            runs = []
            for flags in kernels.flag_combinations(self.algorithm):
                for quantized in (False, True):
                    chosen = np.all(chunk_flags == np.array(flags, bool), axis=1) & (
                        eight_bit == quantized)
                    if chosen.any():
                        make = kernels.update_kernel_8bit if quantized else kernels.update_kernel
                        kernel = make(self.algorithm, flags, self._use_ema, parallel)
                        runs.append((kernel, table if chosen.all() else table[chosen],
                                     quantized))
            self._runs[id(table), parallel] = runs
        return runs

    def concatenate(self, arrays):
        return np.concatenate([a.reshape(-1) for a in arrays])

    def _plan_for(self, grads, present):
        addresses = np.zeros(len(grads), np.int64)  # 0 for a param left out
        for j, g in enumerate(grads):
            if g is None:
                continue
            if not (isinstance(g, np.ndarray) and g.dtype == self.dtype
                    and g.shape == self.shapes[j] and g.flags.c_contiguous):
                _validate.grad_error(j, g, self.params[j], "cpu")
            addresses[j] = self._address(g)
        return self.address_plan(addresses, present)

    def address_plan(self, addresses, present=None):
        """The plan of a step over grads given by address (int64, one per param, C-contiguous
        memory of the param's dtype and size, as the caller has checked): (param addresses,
        grad addresses, chunk table). ``present``: None for every param, or a bool per param
        (the others are left out of the step). Grads that alias a param are a ValueError."""
        self._check_aliasing(addresses)
        if present is not None:
            key, rows = self._subset(present)
            table = self._subset_tables.get(key)
            if table is None:
                table = self._subset_tables[key] = by_model(split(rows, self.chunk))
            return self.param_addresses, addresses, table
        if self.flat_plan is not None and _consecutive(addresses, self.sizes, self.dtype.itemsize):
            return self.param_addresses[:1], addresses[:1].copy(), self.flat_plan
        return self.param_addresses, addresses, self.separate_plan

    def grad_stats(self, plan, model, like, sumsq, nonfinite):
        # the norm only when some model clips (max_norm 0: none); skipping needs only the test
        norm = bool(np.any(model[:, self._kernels.MODEL.max_norm] > 0))
        self._kernels.grad_stats(plan[1], plan[2], model, like, self._parallel_now(), sumsq,
                                 nonfinite, norm)

    def update(self, plan, coef, active, state, ema):
        """One fused step; ``state``: the store's kernel arguments (a list of flat arrays, or
        with 8-bit state (float32 arrays, codes, absmax): fastdl/_state.py)."""
        parallel = self.parallel and self._config.use_parallel(self.total)  # _parallel_now()
        runs = self._runs.get((id(plan[2]), parallel)) or self._runs_for(plan[2], parallel)
        if len(runs) == 1 and self.quantized is None:  # the common case, without the loop's
            kernel, chunks, _ = runs[0]  # cost (a 1000-element step takes ~4 us in all)
            kernel(plan[0], plan[1], chunks, coef, active, ema, *state)
            return
        for kernel, chunks, quantized in runs:
            if self.quantized is None:
                kernel(plan[0], plan[1], chunks, coef, active, ema, *state)
            elif quantized:
                kernel(plan[0], plan[1], chunks, coef, active, ema, state[1], state[2])
            else:
                kernel(plan[0], plan[1], chunks, coef, active, ema, *state[0])


class OptimCuda(_Optim, CudaOps):
    """GPU arrays (numba device arrays, or any ``__cuda_array_interface__`` object, used
    without a copy). A step is one ``grad_stats`` launch (when asked for) and one update launch
    for params that lie back to back in one buffer (``flat_params``); separate arrays take
    ceil(n / MAX_TENSORS_PER_LAUNCH) launches of each, 32 arrays per launch."""

    def __init__(self, params, tensor_groups, n_models, algorithm):
        CudaOps.__init__(self)
        from fastdl.kernels import cudalib, optim_cuda

        self._lib, self._kernels = cudalib, optim_cuda
        params = [cudalib.as_cuda_array(p) for p in params]
        super().__init__(params, tensor_groups, n_models, algorithm)
        self._update = optim_cuda.UPDATES[algorithm]
        self._update_8bit = optim_cuda.UPDATES_8BIT[algorithm]
        self._state_8bit = optim_cuda.STATE_8BIT[algorithm]
        self.param_addresses = np.array([cudalib.address(p) for p in params], np.int64)
        self._set_param_ranges()
        self._flat_params = self._flat_views(params)
        self.placeholder = self._lib.cuda.device_array(0, self.dtype)
        self._coef = self._active = self._inv_scale = None
        self._build_plans()

    def _build_plans(self):
        """The launch plans of ``self.rows``: chunks of CHUNK_SIZE elements, with 8-bit state
        rounded up to whole blocks (kernels.quantize.BLOCK) and no flat plan (rows are not
        merged: blocks restart at each tensor and model)."""
        lib = self._lib
        chunk = lib.CHUNK_SIZE
        if self.quantized is not None:
            block = self._kernels.BLOCK
            chunk = -(-chunk // block) * block
        self.chunk = chunk
        self.flat_plan = None
        if self.quantized is None and _consecutive(self.param_addresses, self.sizes,
                                                   self.dtype.itemsize):
            self.flat_plan = self._launch_plan((lib.span(self.params[0], self.total),),
                                               split(merged(self.rows, self.sizes), chunk))
        self.batches = self._batches(self._flat_params, self.rows)
        self._subset_batches = {}
        self._codes_args = None  # (state arguments, their 8-bit ones), see update

    def _flat_views(self, arrays):
        return [a.reshape(a.size) if len(a.shape) != 1 else a for a in arrays]

    def _to_device(self, host):
        return self._lib.cuda.to_device(np.ascontiguousarray(host))

    def _batches(self, flat_params, rows):
        """One launch's worth of separate tensors per entry: (param tuple, chunk table on the
        device, the table's model column on the host, partial-sum and flag buffers of
        grad_stats, update runs, first tensor, tensor count), for the chunk-table ``rows``
        (tensors without rows get no launch). Tuples are padded to MAX_TENSORS_PER_LAUNCH so
        that one compiled kernel serves every launch; the padding is never indexed."""
        per_launch = self._lib.MAX_TENSORS_PER_LAUNCH
        batches = []
        for first in range(0, len(flat_params), per_launch):
            count = min(per_launch, len(flat_params) - first)
            mine = [[r[0] - first] + r[1:] for r in rows if first <= r[0] < first + count]
            if not mine:
                continue
            tensors = tuple(flat_params[first:first + count])
            tensors += (tensors[0],) * (per_launch - count)
            batches.append(self._launch_plan(tensors, split(mine, self.chunk), first)
                           + (first, count))
        return batches

    def _launch_plan(self, tensors, table, first=0):
        """(tensors, device chunk table, its model column, grad_stats buffers, update runs):
        the runs are (update kernel, 8-bit, device chunk table) triples, one for the whole
        table, or with 8-bit state one for the chunks of 8-bit tensors and one for the others
        (``first``: the tensor of the table's ptr 0)."""
        cuda = self._lib.cuda
        device_table = self._to_device(table)
        if self.quantized is None:
            runs = [(self._update, False, device_table)]
        else:
            eight_bit = self.quantized[table[:, self._kernels.CHUNK.ptr] + first]
            runs = [(kernel, quantized, self._to_device(table[eight_bit == quantized]))
                    for kernel, quantized in ((self._update, False), (self._update_8bit, True))
                    if np.any(eight_bit == quantized)]
        return (tensors, device_table, table[:, 1].copy(),
                cuda.device_array(table.shape[0], self.dtype),
                cuda.device_array(table.shape[0], np.int32), runs)

    def set_row_flags(self, row_flags, use_ema):
        """The GPU kernels read the flag columns of the coefficient rows as they run."""

    def zeros(self, shape, dtype):
        """Zeroed on the device by a fill kernel: no host-to-device copy of zeros (float
        state, bfloat16 bits as uint16, 8-bit codes as uint8)."""
        buffer = self._lib.cuda.device_array(shape, dtype)
        if buffer.size:
            self._lib.launch(self._kernels.fill_cuda,
                             -(-buffer.size // self._lib.THREADS_PER_BLOCK),
                             buffer.reshape(buffer.size), self._to_device(np.zeros(1, dtype)))
        return buffer

    def concatenate(self, arrays):
        out = self._lib.cuda.device_array(self.total, self.dtype)
        for view, a in zip(self.views(out), arrays):
            view.copy_to_device(a)
        return out

    def _plan_for(self, grads, present):
        converted = []
        for j, g in enumerate(grads):
            if g is None:  # left out of the step: its tuple slot is never indexed
                converted.append(self._flat_params[j])
                continue
            if not is_device_array(g):
                _validate.grad_error(j, g, self.params[j], "cuda")
            g = self._lib.as_cuda_array(g)
            if (g.dtype != self.dtype or tuple(g.shape) != self.shapes[j]
                    or not g.is_c_contiguous()):
                _validate.grad_error(j, g, self.params[j], "cuda")
            converted.append(g)
        addresses = np.array([self._lib.address(g) if present is None or present[j] else 0
                              for j, g in enumerate(converted)], np.int64)
        self._check_aliasing(addresses)
        batches = self.batches
        if present is not None:
            key, rows = self._subset(present)
            batches = self._subset_batches.get(key)
            if batches is None:
                batches = self._subset_batches[key] = self._batches(self._flat_params, rows)
        elif self.flat_plan is not None and _consecutive(addresses, self.sizes,
                                                         self.dtype.itemsize):
            return [((self._lib.span(converted[0], self.total),),) + self.flat_plan]
        flat_grads = self._flat_views(converted)
        plan = []
        for tensors, table, models, partial, flags, runs, first, count in batches:
            grads_tuple = tuple(flat_grads[first:first + count])
            grads_tuple += (grads_tuple[0],) * (len(tensors) - count)
            plan.append((grads_tuple, tensors, table, models, partial, flags, runs))
        return plan

    def grad_stats(self, plan, model, like, sumsq, nonfinite):
        """One launch per entry of the plan; the per-chunk partials are added up per model on
        the host in float64, in a fixed order (the result never depends on scheduling)."""
        from fastdl.kernels.optim import MODEL

        inv_scale = model[:, MODEL.inv_scale].astype(self.dtype)
        if self._inv_scale is None:
            self._inv_scale = self._to_device(inv_scale)
        else:
            self._inv_scale.copy_to_device(inv_scale)
        sumsq[:] = 0.0
        nonfinite[:] = False
        for grads, _, table, models, partial, flags, _ in plan:
            self._lib.launch(self._kernels.grad_stats_cuda, table.shape[0], grads, table,
                             self._inv_scale, partial, flags)
            sumsq += np.bincount(models, partial.copy_to_host().astype(np.float64),
                                 minlength=sumsq.shape[0])
            nonfinite |= np.bincount(models, flags.copy_to_host(),
                                     minlength=sumsq.shape[0]) > 0

    def update(self, plan, coef, active, state, ema):
        """One launch per run of each plan entry; ``state``: the store's kernel arguments (a
        list of flat arrays, or with 8-bit state (float32 arrays, codes, absmax):
        fastdl/_state.py). The 8-bit updates take the codes and absmax of the buffers they
        update only (``optim_cuda.STATE_8BIT``), the float updates the float32 arrays."""
        if self._coef is None:
            self._coef, self._active = self._to_device(coef), self._to_device(active)
        else:
            self._coef.copy_to_device(coef)
            self._active.copy_to_device(active)
        if self.quantized is None:
            for grads, params, *_, runs in plan:
                for kernel, _, table in runs:
                    self._lib.launch(kernel, table.shape[0], params, grads, table, self._coef,
                                     self._active, *state, ema)
            return
        if self._codes_args is None or self._codes_args[0] is not state:
            codes, absmax = state[1], state[2]
            self._codes_args = (state, (tuple(codes[k] for k in self._state_8bit),
                                        tuple(absmax[k] for k in self._state_8bit)))
        for grads, params, *_, runs in plan:
            for kernel, quantized, table in runs:
                arguments = self._codes_args[1] if quantized else state[0]
                self._lib.launch(kernel, table.shape[0], params, grads, table, self._coef,
                                 self._active, *arguments, ema)

