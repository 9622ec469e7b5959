"""Where an optimizer's arrays live decides how a step runs: the CPU backend drives the
``kernels/optim.py`` kernels by address, the CUDA backend launches ``kernels/optim_cuda.py``.
Both work from the same chunk tables (``kernels/optim.py``'s docstring) and offer the
optimizer the same few operations; validation of what they are given is theirs too, so that a
step checks everything before it changes anything.
"""

import operator

import numpy as np

from . import _checks
from .device import is_device_array


def segments(sizes, tensor_groups, n_models):
    """One row (tensor, model, row, lo, hi, state) per tensor and model: model k of tensor j is
    elements [k*n, (k+1)*n) of it (n = size / K), and its state sits at the tensor's offset."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rows = []
    for j, size in enumerate(sizes):
        per_model = int(size) // n_models
        for k in range(n_models):
            lo = k * per_model
            rows.append([j, k, tensor_groups[j] * n_models + k, lo, lo + per_model,
                         int(offsets[j]) + lo])
    return rows


def merged(rows, sizes):
    """The rows of tensors that lie back to back in one buffer, addressed from its start, with
    neighbours of the same coefficient row joined."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for j, k, row, lo, hi, _ in rows:
        start = int(offsets[j]) + lo
        if out and out[-1][2] == row and out[-1][4] == start:
            out[-1][4] = start + hi - lo
        else:
            out.append([0, k, row, start, start + hi - lo, start])
    return out


def split(rows, chunk):
    """Chunks of at most ``chunk`` elements, as an int64 (n, 6) table."""
    table = []
    for ptr, model, row, lo, hi, state in rows:
        for start in range(lo, hi, chunk):
            table.append((ptr, model, row, start, min(hi, start + chunk), state + start - lo))
    return np.array(table, np.int64).reshape(-1, 6)


def _consecutive(addresses, sizes, itemsize):
    return bool(np.all(addresses[1:] == addresses[:-1] + sizes[:-1] * itemsize))


def _grad_error(j, g, p, device):
    if device == "cpu" and is_device_array(g):
        raise TypeError(f"grads[{j}] is a GPU array but params[{j}] is a NumPy array: params "
                        "and grads must live on one device")
    if device == "cuda" and not is_device_array(g):
        raise TypeError(f"grads[{j}] is a {type(g).__name__} on the host but params[{j}] is "
                        "a GPU array: params and grads must live on one device")
    if device == "cpu" and not isinstance(g, np.ndarray):
        raise TypeError(f"grads[{j}] must be a NumPy array; got {_checks.describe(g)}")
    if g.dtype != p.dtype:
        raise TypeError(f"grads[{j}] must have dtype {p.dtype} like params[{j}]; got {g.dtype}")
    if tuple(g.shape) != tuple(p.shape):
        raise ValueError(f"grads[{j}] must have shape {tuple(p.shape)} like params[{j}]; got "
                         f"{tuple(g.shape)}")
    raise ValueError(f"grads[{j}] must be C-contiguous (read in place, never copied); "
                     "pass a contiguous copy")


class _Backend:
    """What both backends share: the grads identity cache and the count check."""

    def __init__(self, params, tensor_groups, n_models, kernel_name):
        self.params = params
        self.shapes = [tuple(p.shape) for p in params]
        self.sizes = np.array([int(np.prod(s)) for s in self.shapes], np.int64)
        self.total = int(self.sizes.sum())
        self.dtype = np.dtype(params[0].dtype)
        self.rows = segments(self.sizes, tensor_groups, n_models)
        self.kernel_name = kernel_name
        self._seen = None
        self._plan = None

    def prepare(self, grads):
        """Check ``grads`` and return the step's plan; cached on the grads' identity, since
        training loops usually pass the same buffers every step."""
        if self._seen is not None and len(grads) == len(self._seen) and all(
                map(operator.is_, grads, self._seen)):
            for j, g in enumerate(grads):  # what can change in place
                if tuple(g.shape) != self.shapes[j] or g.dtype != self.dtype:
                    _grad_error(j, g, self.params[j], self.device)
            return self._plan
        if len(grads) != len(self.shapes):
            raise ValueError(f"grads must hold one array per param ({len(self.shapes)}); got "
                             f"{len(grads)}")
        plan = self._plan_for(grads)
        self._seen, self._plan = list(grads), plan
        return plan

    def views(self, flat):
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        return [flat[int(offsets[j]):int(offsets[j + 1])].reshape(s)
                for j, s in enumerate(self.shapes)]


class CpuBackend(_Backend):
    """NumPy arrays: one compiled call per pass, however many arrays (addresses, not arrays,
    are passed: see kernels/pointers.py)."""

    device = "cpu"

    def __init__(self, params, tensor_groups, n_models, kernel_name):
        super().__init__(params, tensor_groups, n_models, kernel_name)
        from fastdl.kernels import config, optim
        from fastdl.kernels.pointers import address

        self._kernels, self._address = optim, address
        self.parallel = self.total >= config.PARALLEL_MIN_SIZE
        serial, parallel = getattr(optim, kernel_name + "_update")
        self._update = parallel if self.parallel else serial
        chunk = min(config.MAX_CHUNK_SIZE,
                    max(config.MIN_CHUNK_SIZE, -(-self.total // (4 * config.threads()))))
        self.separate = split(self.rows, chunk)
        self.param_addresses = np.array([p.__array_interface__["data"][0] for p in params],
                                        np.int64)
        self.flat = None
        if _consecutive(self.param_addresses, self.sizes, self.dtype.itemsize):
            self.flat = split(merged(self.rows, self.sizes), chunk)
        self.placeholder = np.zeros(0, self.dtype)

    def zeros(self, n):
        """A zeroed buffer, written now: not ``np.zeros``, whose calloc hands out lazily mapped
        small pages that fault on the first step and, with transparent huge pages in "madvise"
        mode, stay small (TLB misses made fused Adam on 1e7 elements ~25 % slower). NumPy's
        own allocator asks for huge pages."""
        buffer = np.empty(n, self.dtype)
        buffer.fill(0)
        return buffer

    def concatenate(self, arrays):
        return np.concatenate([a.reshape(-1) for a in arrays])

    def _plan_for(self, grads):
        addresses = np.empty(len(grads), np.int64)
        for j, g in enumerate(grads):
            if not (isinstance(g, np.ndarray) and g.dtype == self.dtype
                    and g.shape == self.shapes[j] and g.flags.c_contiguous):
                _grad_error(j, g, self.params[j], "cpu")
            addresses[j] = self._address(g)
        if self.flat is not None and _consecutive(addresses, self.sizes, self.dtype.itemsize):
            return self.param_addresses[:1], addresses[:1].copy(), self.flat
        return self.param_addresses, addresses, self.separate

    def grad_stats(self, plan, model, like, sumsq, nonfinite):
        self._kernels.grad_stats(plan[1], plan[2], model, like, self.parallel, sumsq,
                                 nonfinite)

    def update(self, plan, coef, active, state, ema):
        self._update(plan[0], plan[1], plan[2], coef, active, *state, ema)

    def to_host(self, view):
        return view.copy()

    def write(self, view, values):
        view[...] = values


class CudaBackend(_Backend):
    """GPU arrays (numba device arrays, or any ``__cuda_array_interface__`` object, used
    without a copy). A step is one ``grad_stats`` launch (when asked for) and one update launch
    for params that lie back to back in one buffer (``flat_params``); separate arrays take
    ceil(n / MAX_TENSORS_PER_LAUNCH) launches of each, 32 arrays per launch."""

    device = "cuda"

    def __init__(self, params, tensor_groups, n_models, kernel_name):
        from fastdl.kernels import cudalib, optim_cuda

        self._lib, self._kernels = cudalib, optim_cuda
        params = [cudalib.as_cuda_array(p) for p in params]
        super().__init__(params, tensor_groups, n_models, kernel_name)
        self._update = optim_cuda.UPDATES[kernel_name]
        self.param_addresses = np.array([cudalib.address(p) for p in params], np.int64)
        flat_params = self._flat_views(params)
        self.flat = None
        if _consecutive(self.param_addresses, self.sizes, self.dtype.itemsize):
            self.flat = self._launch_plan((cudalib.span(params[0], self.total),),
                                          split(merged(self.rows, self.sizes),
                                                cudalib.CHUNK_SIZE))
        self.batches = self._batches(flat_params)
        self.placeholder = self._lib.cuda.device_array(0, self.dtype)
        self._coef = self._active = self._inv_scale = None

    def _flat_views(self, arrays):
        return [a.reshape(a.size) if len(a.shape) != 1 else a for a in arrays]

    def _to_device(self, host):
        return self._lib.cuda.to_device(np.ascontiguousarray(host))

    def _batches(self, flat_params):
        """One launch's worth of separate tensors per entry: (param tuple, chunk table on the
        device, the table's model column on the host, first tensor, tensor count, partial-sum
        and flag buffers of grad_stats). Tuples are padded to MAX_TENSORS_PER_LAUNCH so that one
        compiled kernel serves every launch; the padding is never indexed."""
        per_launch = self._lib.MAX_TENSORS_PER_LAUNCH
        batches = []
        for first in range(0, len(flat_params), per_launch):
            count = min(per_launch, len(flat_params) - first)
            rows = [[r[0] - first] + r[1:] for r in self.rows if first <= r[0] < first + count]
            tensors = tuple(flat_params[first:first + count])
            tensors += (tensors[0],) * (per_launch - count)
            batches.append(self._launch_plan(tensors, split(rows, self._lib.CHUNK_SIZE))
                           + (first, count))
        return batches

    def _launch_plan(self, tensors, table):
        cuda = self._lib.cuda
        return (tensors, self._to_device(table), table[:, 1].copy(),
                cuda.device_array(table.shape[0], self.dtype),
                cuda.device_array(table.shape[0], np.int32))

    def zeros(self, n):
        buffer = self._lib.cuda.device_array(n, self.dtype)
        self._lib.launch(self._kernels.fill_cuda, -(-n // self._lib.THREADS_PER_BLOCK), buffer,
                         self._to_device(np.zeros(1, self.dtype)))
        return buffer

    def concatenate(self, arrays):
        out = self._lib.cuda.device_array(self.total, self.dtype)
        for view, a in zip(self.views(out), arrays):
            view.copy_to_device(a)
        return out

    def _plan_for(self, grads):
        converted = []
        for j, g in enumerate(grads):
            if not is_device_array(g):
                _grad_error(j, g, self.params[j], "cuda")
            g = self._lib.as_cuda_array(g)
            if (g.dtype != self.dtype or tuple(g.shape) != self.shapes[j]
                    or not g.is_c_contiguous()):
                _grad_error(j, g, self.params[j], "cuda")
            converted.append(g)
        addresses = np.array([self._lib.address(g) for g in converted], np.int64)
        if self.flat is not None and _consecutive(addresses, self.sizes, self.dtype.itemsize):
            return [((self._lib.span(converted[0], self.total),),) + self.flat]
        flat_grads = self._flat_views(converted)
        plan = []
        for tensors, table, models, partial, flags, first, count in self.batches:
            grads_tuple = tuple(flat_grads[first:first + count])
            grads_tuple += (grads_tuple[0],) * (len(tensors) - count)
            plan.append((grads_tuple, tensors, table, models, partial, flags))
        return plan

    def grad_stats(self, plan, model, like, sumsq, nonfinite):
        """One launch per entry of the plan; the per-chunk partials are added up per model on
        the host in float64, in a fixed order (the result never depends on scheduling)."""
        from fastdl.kernels.optim import INV_SCALE

        inv_scale = model[:, INV_SCALE].astype(self.dtype)
        if self._inv_scale is None:
            self._inv_scale = self._to_device(inv_scale)
        else:
            self._inv_scale.copy_to_device(inv_scale)
        sumsq[:] = 0.0
        nonfinite[:] = False
        for grads, _, table, models, partial, flags in plan:
            self._lib.launch(self._kernels.grad_stats_cuda, table.shape[0], grads, table,
                             self._inv_scale, partial, flags)
            sumsq += np.bincount(models, partial.copy_to_host().astype(np.float64),
                                 minlength=sumsq.shape[0])
            nonfinite |= np.bincount(models, flags.copy_to_host(),
                                     minlength=sumsq.shape[0]) > 0

    def update(self, plan, coef, active, state, ema):
        if self._coef is None:
            self._coef, self._active = self._to_device(coef), self._to_device(active)
        else:
            self._coef.copy_to_device(coef)
            self._active.copy_to_device(active)
        for grads, params, table, *_ in plan:
            self._lib.launch(self._update, table.shape[0], params, grads, table, self._coef,
                             self._active, *state, ema)

    def to_host(self, view):
        return view.copy_to_host()

    def write(self, view, values):
        view.copy_to_device(np.ascontiguousarray(values))
