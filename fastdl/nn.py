"""Layers for the training toolkit: PyTorch's habits without autograd.

Every layer has ``train()`` / ``eval()``, ``forward(x)``, ``backward(dout)`` (returning the
gradient for the input and storing those of its parameters), ``params()`` and ``grads()``
(lists of arrays in the same order, ready for ``fastdl.optim``). Output buffers are reused from
call to call when shapes repeat (a fresh 32 MB array costs page faults), so keep a copy of an
output you need past the next call.
"""

import contextlib
import math

import numpy as np

from . import _block, _dense, _dispatch, _validate
from .batchnorm import batch_norm_backward, batch_norm_forward
from .device import is_device_array, location, threads_beside_blas, to_host
from .dropout import dropout_backward, dropout_forward
from .softmax import REDUCTIONS, softmax_cross_entropy


class Layer:
    """The layer protocol: ``train()`` / ``eval()`` switch ``training`` (and return the layer),
    ``forward(x)``, ``backward(dout)`` (the gradient for the input; those of the parameters
    are written into ``grads()``), and ``params()`` / ``grads()``: the arrays named by
    ``param_names`` / ``grad_names``, in that order (none by default).

    A container (:class:`Sequential`) may rebind those attributes to views of its own flat
    buffers; layers only ever write their gradients in place.
    """

    training = True
    param_names = ()
    grad_names = ()
    decay_names = ()  # the params that L2 / weight decay applies to (weights, not biases)

    def train(self):
        self.training = True
        return self

    def eval(self):
        self.training = False
        return self

    def params(self):
        return [getattr(self, name) for name in self.param_names]

    def grads(self):
        return [getattr(self, name) for name in self.grad_names]

    def _out(self, name, shape, dtype, like):
        """A reused output buffer of ``shape`` on ``like``'s device: fresh arrays cost page
        faults, so a layer writes into the same buffer while shapes repeat."""
        buffers = self.__dict__.setdefault("_buffers", {})
        buffer = buffers.get(name)
        if (buffer is None or tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype
                or is_device_array(buffer) != is_device_array(like)):
            buffer = buffers[name] = _dispatch.arrays(location(like)).empty(tuple(shape), dtype)
        return buffer

    def reset_model(self, k, seed=None):
        """Reinitialize model ``k`` (0 for a lone layer) as a new layer built with its seed (or
        with ``seed``, which becomes its seed): parameters, statistics, random streams. The
        other models are untouched. Nothing to do for a layer without state (which, built
        without a population, is shared by any number of models)."""
        self._stateless_index(k)

    def copy_model(self, src, dst):
        """Make model ``dst`` a copy of model ``src``: parameters, statistics, random streams
        and per-model hyperparameters, so that it continues as ``src`` would. Nothing to do
        for a layer without state."""
        return self._stateless_index(src), self._stateless_index(dst)

    # What state_dict holds besides the params (each layer names its own).
    buffer_names = ()

    def state_dict(self):
        """Host copies of the layer's parameters and buffers (name -> array), plus what else
        decides its next results (a dropout stream's seeds and call counts)."""
        return {name: to_host(getattr(self, name)).copy()
                for name in self.param_names + self.buffer_names}

    def load_state_dict(self, state):
        """Write :meth:`state_dict`'s arrays back into the layer's own (in place: views of a
        container's flat buffer stay views). Everything is checked before anything is
        written: ValueError / TypeError for a missing entry or a wrong shape or dtype."""
        names = self.param_names + self.buffer_names
        _validate.entries(state, "state", names)
        for name in names:
            _saved_array(state[name], f"state[{name!r}]", getattr(self, name).dtype,
                         tuple(getattr(self, name).shape))
        arrays = _dispatch.arrays(location(getattr(self, names[0]))) if names else None
        for name in names:
            arrays.write(getattr(self, name), state[name])

    def _stateless_index(self, k):
        population = getattr(self, "population", None)
        if population is None:
            return _validate.integer(k, "k", minimum=0)
        return _model_index(k, population)

    def _out_like(self, name, a, dtype=None):
        """:meth:`_out` for an output shaped like the input ``a`` (of ``a``'s dtype, or
        ``dtype``); None when ``a`` is no array, so the function's own checks reject it."""
        if not (hasattr(a, "shape") and hasattr(a, "dtype")):
            return None
        return self._out(name, a.shape, a.dtype if dtype is None else dtype, a)


def spawn_seed(seed, index):
    """Seed ``index`` of the family spawned from ``seed`` (NumPy's ``SeedSequence(seed)
    .spawn``), a 31-bit int: the seed of model k of a population layer seeded ``seed``, and of
    the layer at position i of a network seeded ``seed``. Neighbouring seeds spawn unrelated
    families, so layers built with seeds 0 and 1 share no model's seed (``seed + k`` did)."""
    entropy = np.random.SeedSequence(seed, spawn_key=(index,))
    return int(entropy.generate_state(1, np.uint32)[0] >> 1)


def _model_seeds(seed, population):
    """One seed per model: ``seed`` itself without a population; with one, a sequence of K
    seeds as given, or K seeds spawned from ``seed`` (:func:`spawn_seed`; model k then equals a
    lone layer of seed ``spawn_seed(seed, k)``)."""
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    seed = _validate.seed(seed, "seed", population)
    if population is not None and isinstance(seed, int):
        return [spawn_seed(seed, k) for k in range(population)]
    return seed


def _saved_array(a, argument, dtype, shape):
    """A saved state's array: a NumPy array of ``dtype`` and ``shape``."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{argument} must be a NumPy array; got {_validate.describe(a)}")
    _validate.dtype_and_shape(a, argument, np.dtype(dtype), shape)


def _model_index(k, population):
    """A model index of a layer of ``population`` (None: a lone layer, index 0 only)."""
    n_models = 1 if population is None else population
    k = _validate.integer(k, "k", minimum=0)
    if k >= n_models:
        raise ValueError(f"k must be a model index in [0, {n_models}); got {k}")
    return k


def _rows(a, population):
    """The per-model rows of ``a``: ``a`` itself as one row for a lone layer."""
    return a if population is not None else a[None]


class Linear(Layer):
    """A fully connected layer, W of shape (n_out, n_in) as in the notes and PyTorch::

        feature_axis=-1 (batch-first, x (N, n_in)):        y = x @ W.T + b
        feature_axis=0  (the notes' A (n_in, m), Z (n_out, m)):  Z = W @ A + b

    ``init``: "he" draws W from N(0, 2 / n_in) (for ReLU), "xavier" from N(0, 1 / n_in) (for
    tanh), as the notes; b starts at 0. ``bias=False`` drops b (a following BatchNorm's beta
    takes its place, as the notes say). ``seed`` seeds the initialization; ``device`` defaults
    to the selected one. Backward: dW = dy.T @ x, db = sum(dy), dx = dy @ W (transposed for the
    notes' layout); matrix products run on BLAS (CPU) or cuBLAS / fastdl's kernel (GPU).

    ``population=K``: K models, W (K, n_out, n_in) and b (K, n_out), each product one batched
    call. The input is (K, N, n_in) (or (K, n_in, m)), or the models' shared batch (N, n_in)
    (or (n_in, m)); the output has the leading K axis. Model k is initialized from seed k of
    ``seed`` (K ints, or K seeds spawned from one: :func:`spawn_seed`), as a lone
    ``Linear(..., seed=...)`` of that seed would be. ``reset_model(k, seed=None)`` draws model
    k's W again (b = 0); ``copy_model(src, dst)`` copies W, b and the seed.
    """

    decay_names = ("W",)

    def __init__(self, n_in, n_out, bias=True, init="he", feature_axis=-1, dtype=np.float32,
                 seed=None, device=None, population=None):
        self.n_in = _validate.integer(n_in, "n_in", minimum=1)
        self.n_out = _validate.integer(n_out, "n_out", minimum=1)
        self.init = _validate.option(init, "init", ("he", "xavier"))
        bias = _validate.flag(bias, "bias")
        # -1: batch-first (1 taken as its synonym); 0: the notes' (features, examples)
        feature_axis = _validate.option(feature_axis, "feature_axis", (-1, 0, 1))
        self.feature_axis = -1 if feature_axis == 1 else feature_axis
        self.dtype = _validate.float_dtype(dtype, "dtype")
        self.device = _validate.layer_device(device)
        self.population = population = _validate.model_count(population)
        self._ops = _dense.ops(self.device)
        arrays = _dispatch.arrays(self.device)
        seeds = _model_seeds(seed, population)
        self.seeds = [seeds] if population is None else list(seeds)  # one per model
        draw = [self._initial_weights(s) for s in self.seeds]
        weights = draw[0] if population is None else np.stack(draw)
        lead = () if population is None else (population,)
        self.W = arrays.copy_of(weights, self.dtype)
        self.dW = arrays.zeros(lead + (self.n_out, self.n_in), self.dtype)
        self.param_names, self.grad_names = ("W",), ("dW",)
        if bias:
            self.b = arrays.zeros(lead + (self.n_out,), self.dtype)
            self.db = arrays.zeros(lead + (self.n_out,), self.dtype)
            self.param_names, self.grad_names = ("W", "b"), ("dW", "db")
        self._x = None

    def _initial_weights(self, seed):
        """W of one model drawn from ``seed`` (float64, (n_out, n_in))."""
        scale = math.sqrt((2.0 if self.init == "he" else 1.0) / self.n_in)
        return np.random.default_rng(seed).standard_normal((self.n_out, self.n_in)) * scale

    def reset_model(self, k, seed=None):
        """Model ``k``'s W drawn again from its seed (or from ``seed``, now its seed), b = 0."""
        k = _model_index(k, self.population)
        seed = self.seeds[k] if seed is None else _validate.seed(seed, "seed")
        arrays = _dispatch.arrays(self.device)
        arrays.write(_rows(self.W, self.population)[k],
                     self._initial_weights(seed).astype(self.dtype))
        if "b" in self.param_names:
            arrays.write(_rows(self.b, self.population)[k], np.zeros(self.n_out, self.dtype))
        self.seeds[k] = seed

    def copy_model(self, src, dst):
        """Model ``dst``'s W, b and seed become model ``src``'s."""
        src, dst = _model_index(src, self.population), _model_index(dst, self.population)
        arrays = _dispatch.arrays(self.device)
        for name in self.param_names:
            rows = _rows(getattr(self, name), self.population)
            arrays.write(rows[dst], rows[src])
        self.seeds[dst] = self.seeds[src]

    def _out_shape(self, x):
        shape = tuple(x.shape)
        examples = shape[-1] if self.feature_axis == 0 else shape[-2]
        per_model = (self.n_out, examples) if self.feature_axis == 0 else (examples, self.n_out)
        return per_model if self.population is None else (self.population,) + per_model

    def forward(self, x):
        _validate.layer_input(x, "x", 2, self.dtype, self.device, models=self.population)
        shape = tuple(x.shape)  # a tuple: the simulator's shapes take no negative index
        if shape[self.feature_axis] != self.n_in:
            axis = self.feature_axis if len(shape) == 2 or self.feature_axis == -1 else 1
            raise ValueError(f"x must have {self.n_in} features along axis {axis}; got shape "
                             f"{shape}")
        y = self._out("y", self._out_shape(x), self.dtype, x)
        if self.feature_axis == 0:
            self._ops.matmul(self.W, x, y)
        else:
            self._ops.matmul(x, self.W, y, transpose_b=True)
        if "b" in self.param_names:
            self._ops.add_bias(y, self.b, self.feature_axis)
        self._x = x
        return y

    def backward(self, dout, input_grad=True):
        """Write dW (and db); return the input's gradient (per model for a population, also
        for a shared batch), or None with ``input_grad=False`` (a network's first layer: the
        data needs no gradient, and its product is skipped)."""
        if self._x is None:
            raise ValueError("backward needs a forward first")
        input_grad = _validate.flag(input_grad, "input_grad")
        x = self._x
        expected = self._out_shape(x)
        _validate.layer_input(dout, "dout", len(expected), self.dtype, self.device,
                              expected_shape=expected)
        if self.feature_axis == 0:
            self._ops.matmul(dout, x, self.dW, transpose_b=True)
        else:
            self._ops.matmul(dout, x, self.dW, transpose_a=True)
        if "b" in self.param_names:
            self._ops.bias_grad(dout, self.feature_axis, self.db)
        if not input_grad:
            return None
        lead = () if self.population is None else (self.population,)
        dx = self._out("dx", lead + tuple(x.shape)[-2:], self.dtype, x)
        if self.feature_axis == 0:
            self._ops.matmul(self.W, dout, dx, transpose_a=True)
        else:
            self._ops.matmul(dout, self.W, dx)
        return dx

    def __repr__(self):
        population = "" if self.population is None else f", population={self.population}"
        return (f"Linear({self.n_in}, {self.n_out}, bias={'b' in self.param_names}, "
                f"init={self.init!r}, feature_axis={self.feature_axis}{population})")


class _Activation(Layer):
    kind = None

    def __init__(self, population=None):
        # elementwise: a population's leading K axis needs nothing; taken for a uniform API
        self.population = _validate.model_count(population)

    def forward(self, x):
        # elementwise: any rank and, on the host, any layout
        self._ops = _dense.ops(_validate.float_array(x, "x", ranks=(0, None), contiguous=False))
        y = self._out("y", x.shape, x.dtype, x)
        self._ops.activation(self.kind, x, y)
        self._saved = x if self.kind == "relu" else y
        return y

    def backward(self, dout):
        saved = self.__dict__.get("_saved")
        if saved is None:
            raise ValueError("backward needs a forward first")
        _validate.layer_input(dout, "dout", len(saved.shape), saved.dtype, self._ops.device,
                              expected_shape=saved.shape)
        dx = self._out("dx", saved.shape, saved.dtype, saved)
        return self._ops.activation_backward(self.kind, dout, saved, dx)

    def __repr__(self):
        return f"{type(self).__name__}()"


class ReLU(_Activation):
    """y = max(x, 0); dx = dout * (x > 0)."""

    kind = "relu"


class Tanh(_Activation):
    """y = tanh(x); dx = dout * (1 - y**2)."""

    kind = "tanh"


class BatchNorm(Layer):
    """Batch normalization over ``num_features`` channels at ``channel_axis`` (SPEC.md): 1 for
    batch-first (N, C) / (N, C, H, W), 0 for the notes' (features, examples), -1 for
    channels-last.

    ``gamma`` (ones) and ``beta`` (zeros) are learned; running statistics (mean 0, variance 1)
    are tracked in training and used in ``eval()`` mode. ``population=K`` keeps K models'
    parameters and statistics, shape (K, num_features), for inputs with a leading K axis;
    ``momentum`` may then hold one value per model. ``reset_model(k)`` puts model k back to
    gamma 1, beta 0 and the initial statistics; ``copy_model(src, dst)`` copies them (and the
    momentum).
    ``storage`` / ``grad_storage``: two arrays each (gamma, beta) on the layer's device to hold
    the parameters and their gradients, e.g. views of a container's flat buffer; they are
    filled here. ``sync=True``: synchronized batch norm in data-parallel training, the
    training statistics those of the global batch over the ranks of ``comm`` (default:
    ``fastdl.distributed``'s, once initialized; alone, the plain batch norm).
    ``device`` defaults to the selected one.
    """

    param_names = ("gamma", "beta")
    grad_names = ("dgamma", "dbeta")
    buffer_names = ("running_mean", "running_var")

    def __init__(self, num_features, momentum=0.1, eps=1e-5, channel_axis=1, dtype=np.float32,
                 population=None, storage=None, grad_storage=None, device=None, sync=False,
                 comm=None):
        num_features = _validate.integer(num_features, "num_features", minimum=1)
        self.sync = _validate.flag(sync, "sync")
        self.comm = comm  # None: fastdl.distributed's, when sync
        self.dtype = _validate.float_dtype(dtype, "dtype")
        self.population = population = _validate.model_count(population)
        self.device = _validate.layer_device(device)
        momenta = _validate.hyperparameter(momentum, "momentum", population,
                                           _validate.closed_unit_interval)
        self.momentum = float(momenta[0]) if np.ndim(momentum) == 0 else momenta
        self.eps = _validate.number(eps, "eps", _validate.positive)
        # an int in [-5, 5) (inputs have rank <= 5); checked against the input's rank in forward
        self.channel_axis = _validate.axis_argument(channel_axis, "channel_axis", 5)
        shape = (num_features,) if population is None else (population, num_features)
        storage = self._checked(storage, shape, "storage")  # both checked before either
        grad_storage = self._checked(grad_storage, shape, "grad_storage")  # is written
        self.gamma, self.beta = self._filled(storage, shape, (1.0, 0.0))
        self.dgamma, self.dbeta = self._filled(grad_storage, shape, (0.0, 0.0))
        arrays = _dispatch.arrays(self.device)
        self.running_mean = arrays.zeros(shape, self.dtype)
        self.running_var = arrays.full(shape, 1, self.dtype)
        self._cache = None

    def _checked(self, given, shape, name):
        """``given`` (None, or two arrays for (gamma, beta) or their gradients) as a list,
        checked: writable (C,) or (K, C) arrays of the layer's dtype on its device."""
        if given is None:
            return None
        if not isinstance(given, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of two arrays (gamma, beta); got "
                            f"{_validate.describe(given)}")
        if len(given) != 2:
            raise ValueError(f"{name} must hold two arrays (gamma, beta); got {len(given)}")
        for i, a in enumerate(given):
            _validate.per_model_array(a, f"{name}[{i}]", shape, self.dtype, self.device,
                                      writable=True, other="the layer")
        return list(given)

    def _filled(self, given, shape, values):
        """(gamma, beta) or their gradients: ``given`` (checked) arrays, or new ones, filled
        with ``values``."""
        arrays = _dispatch.arrays(self.device)
        if given is None:
            return [arrays.full(shape, v, self.dtype) for v in values]
        for a, v in zip(given, values):
            arrays.write(a, np.full(shape, v, self.dtype))
        return given

    def reset_model(self, k, seed=None):
        """Model ``k``: gamma 1, beta 0, running mean 0 and variance 1 (``seed`` is taken for
        a uniform API: nothing here is random)."""
        k = _model_index(k, self.population)
        arrays, channels = _dispatch.arrays(self.device), self.gamma.shape[-1]
        for name, value in [("gamma", 1), ("beta", 0), ("running_mean", 0), ("running_var", 1)]:
            arrays.write(_rows(getattr(self, name), self.population)[k],
                         np.full(channels, value, self.dtype))

    def copy_model(self, src, dst):
        """Model ``dst``'s gamma, beta, running statistics and momentum become ``src``'s."""
        src, dst = _model_index(src, self.population), _model_index(dst, self.population)
        arrays = _dispatch.arrays(self.device)
        for name in ("gamma", "beta", "running_mean", "running_var"):
            rows = _rows(getattr(self, name), self.population)
            arrays.write(rows[dst], rows[src])
        if np.ndim(self.momentum) == 1:
            self.momentum = self.momentum.copy()  # may be the caller's array
            self.momentum[dst] = self.momentum[src]

    def forward(self, x):
        """Normalize ``x`` (batch statistics in training, running ones in eval mode)."""
        y, self._cache = batch_norm_forward(
            x, self.gamma, self.beta, self.running_mean, self.running_var,
            training=self.training, momentum=self.momentum, eps=self.eps,
            channel_axis=self.channel_axis, population=self.population is not None,
            out=self._out_like("y", x), comm=self._comm() if self.training else None)
        return y

    def _comm(self):
        if not self.sync:
            return None
        if self.comm is not None:
            return self.comm
        from . import distributed

        return distributed.communicator() if distributed.world_size() > 1 else None

    def backward(self, dout):
        """Write dgamma and dbeta; return the gradient for the input."""
        if self._cache is None:
            raise ValueError("backward needs a forward first")
        dx, dgamma, dbeta = batch_norm_backward(dout, self._cache,
                                                out=self._out_like("dx", dout))
        arrays = _dispatch.arrays(self.device)
        arrays.write(self.dgamma, dgamma)
        arrays.write(self.dbeta, dbeta)
        return dx

    def __repr__(self):
        return (f"BatchNorm({self.gamma.shape[-1]}, channel_axis={self.channel_axis}, "
                f"momentum={self.momentum!r}, eps={self.eps}, training={self.training})")


class Dropout(Layer):
    """Inverted dropout (SPEC.md): in training each element is dropped with probability ``p``
    and the rest scaled by 1 / (1 - p); in ``eval()`` mode the layer is the identity.

    Every training forward draws a new mask from (``seed``, call number), so a run is
    reproducible from its seed, on the CPU and the GPU alike. ``population=K``: inputs have a
    leading axis of K models, ``p`` may hold one rate per model, and model k draws from seed k
    of ``seed`` (K ints, or K seeds spawned from one: :func:`spawn_seed`) and counts its own
    calls: the masks of a lone ``Dropout(p, seed=...)`` of that seed. ``reset_model(k,
    seed=None)`` restarts model k's stream (its call count, and its seed when given);
    ``copy_model(src, dst)`` copies the seed, call count and rate, so that ``dst`` draws the
    masks ``src`` will.
    """

    def __init__(self, p=0.5, seed=None, population=None):
        population = _validate.model_count(population)
        rates = _validate.hyperparameter(p, "p", population, _validate.closed_unit_interval)
        self.p = float(rates[0]) if population is None else rates  # (K,): one rate per model
        self.seed = _model_seeds(seed, population)
        self.population = population
        # masks drawn so far: an int, or one count per model (a reset model starts again)
        self.calls = 0 if population is None else np.zeros(population, np.int64)
        self._mask = None

    def _next_seed(self):
        """The generator seed of the next mask (one per model for a population)."""
        if self.population is None:
            return self._call_seed(self.seed, self.calls)
        return np.array([self._call_seed(s, c) for s, c in zip(self.seed, self.calls)],
                        np.int64)

    @staticmethod
    def _call_seed(seed, calls):
        # distinct (seed, call) pairs give distinct generator keys (seeds below 2**31)
        return ((seed << 32) + int(calls)) & (2**63 - 1)

    def forward(self, x, rows=None):
        """y = x * mask / (1 - p) in training (x itself in eval mode). ``rows``: in
        data-parallel training, ``fastdl.dropout.Rows(first, total, axis)``, where x's examples
        sit in the global batch: masks keyed by global position, the same whatever the number
        of ranks (:func:`fastdl.dropout_forward`)."""
        if not self.training:
            self._mask = None
            return x
        y, self._mask = dropout_forward(x, self.p, self._next_seed(), rows=rows,
                                        population=self.population is not None,
                                        out=self._out_like("y", x),
                                        mask_out=self._out_like("mask", x, np.bool_))
        self.calls += 1  # after the call: a rejected input draws no mask
        return y

    def state_dict(self):
        """The mask stream: seeds and call counts (and the rates)."""
        return {"seed": np.array(self.seed, np.int64), "calls": np.array(self.calls, np.int64),
                "p": np.array(self.p, np.float64)}

    def load_state_dict(self, state):
        _validate.entries(state, "state", ("seed", "calls", "p"))
        shape = () if self.population is None else (self.population,)
        for name, dtype in [("seed", np.int64), ("calls", np.int64), ("p", np.float64)]:
            _saved_array(state[name], f"state[{name!r}]", np.dtype(dtype), shape)
        if self.population is None:
            self.seed, self.calls, self.p = (int(state["seed"]), int(state["calls"]),
                                             float(state["p"]))
        else:
            self.seed = [int(s) for s in state["seed"]]
            self.calls, self.p = state["calls"].copy(), state["p"].copy()

    def reset_model(self, k, seed=None):
        """Model ``k`` draws its masks from the start again: call count 0, and ``seed`` as
        its seed when given."""
        k = _model_index(k, self.population)
        seed = None if seed is None else _validate.seed(seed, "seed")
        if self.population is None:
            self.calls, self.seed = 0, self.seed if seed is None else seed
        else:
            self.calls[k] = 0
            if seed is not None:
                self.seed[k] = seed

    def copy_model(self, src, dst):
        """Model ``dst`` takes model ``src``'s seed, call count and rate."""
        src, dst = _model_index(src, self.population), _model_index(dst, self.population)
        if self.population is not None:
            self.seed[dst], self.calls[dst] = self.seed[src], self.calls[src]
            self.p = self.p.copy()  # the (K,) rates may be the caller's array
            self.p[dst] = self.p[src]

    def backward(self, dout):
        """dx = dout * mask / (1 - p) (dout itself in eval mode)."""
        if not self.training:
            return dout
        if self._mask is None:
            raise ValueError("backward needs a training forward first")
        return dropout_backward(dout, self._mask, self.p, out=self._out_like("dx", dout))

    def __repr__(self):
        return f"Dropout(p={self.p}, training={self.training})"


class SoftmaxCrossEntropy(Layer):
    """Softmax cross-entropy loss (SPEC.md): ``loss = forward(logits, target)``, then
    ``backward()`` returns dloss/dlogits, computed in the same fused pass as the loss.

    Keywords as :func:`fastdl.softmax_cross_entropy`; ``population=K`` gives per-model losses of
    shape (K,) (each model's gradient is that of its own loss) for logits with a leading axis
    of K models, against per-model targets or the models' shared batch of class indices (e.g.
    logits (K, N, C) and labels (N,)). ``weight``: class weights (C,) (with a population also
    (K, C), per model), kept by reference.
    """

    def __init__(self, axis=-1, reduction="mean", label_smoothing=0.0, ignore_index=-100,
                 population=None, weight=None):
        population = _validate.model_count(population)
        # checked here as the function checks them (axis against the rank at forward; weight's
        # dtype, device and class count against the logits at forward)
        if weight is not None:
            _validate.float_array(weight, "weight", ranks=(1, 1 if population is None else 2),
                                  needs="one weight per class, or per model and class")
            if len(weight.shape) == 2 and weight.shape[0] != population:
                raise ValueError(f"weight of shape {tuple(weight.shape)} must have one row per "
                                 f"model ({population}) or be shared (C,)")
        self.options = dict(
            axis=_validate.integer(axis, "axis"),
            reduction=_validate.option(reduction, "reduction", REDUCTIONS),
            label_smoothing=_validate.number(label_smoothing, "label_smoothing",
                                             _validate.closed_unit_interval),
            ignore_index=_validate.integer(ignore_index, "ignore_index"),
            population=population is not None, weight=weight)
        self.population = population
        self._grad = None

    def forward(self, logits, target):
        """The loss of ``logits`` (classes along ``axis``) against ``target`` (class indices
        or probabilities); the gradient is kept for :meth:`backward`."""
        if self.population is not None:
            target = self._per_model_target(logits, target)
        out = self._out_like("dlogits", logits)
        loss, self._grad = softmax_cross_entropy(logits, target, out=out, **self.options)
        self._scale = 1.0
        return loss

    def _per_model_target(self, logits, target):
        """Check that ``logits`` hold this loss's K models; class indices shared by the models
        (no leading K axis) are broadcast into a reused (K, ...) buffer of their dtype."""
        shape = tuple(getattr(logits, "shape", ()))
        if shape and shape[0] != self.population:
            raise ValueError(f"logits must have a leading axis of population={self.population} "
                             f"models; got shape {shape}")
        target_shape = tuple(getattr(target, "shape", ()))
        dtype = getattr(target, "dtype", None)
        if not shape or dtype is None or np.dtype(dtype).kind not in "iu" \
                or len(target_shape) != len(shape) - 2:
            return target  # per-model targets, or something the function will reject
        device = location(target)
        if device != location(logits):
            return target  # the function names the mixed devices
        labels = self._out("labels", (self.population,) + target_shape, dtype, target)
        arrays = _dispatch.arrays(device)
        for k in range(self.population):
            arrays.write(labels[k], target)
        return labels

    def backward(self, dout=1.0):
        """dloss/dlogits times ``dout`` (a scalar: the loss is the end of the network)."""
        if self._grad is None:
            raise ValueError("backward needs a forward first")
        dout = _validate.number(dout, "dout")
        if dout != self._scale:  # the gradient is scaled in place, relative to what it holds
            if self._scale == 0:
                raise ValueError("the gradient was scaled by 0: call forward again")
            _dense.ops(location(self._grad)).scale(self._grad, dout / self._scale)
            self._scale = dout
        return self._grad

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"SoftmaxCrossEntropy({options})"


class Sequential(Layer):
    """Layers applied in order; their parameters and gradients live in one flat buffer each,
    so that ``fastdl.optim`` steps the whole network with one kernel launch.

    The buffers hold the params that weight decay applies to (Linear weights) first, then the
    rest (biases, BatchNorm's gamma and beta): :meth:`param_groups` gives the two groups as
    neighbouring ranges of the buffer, still one launch. ``params()`` / ``grads()`` list them
    in that order. The layers' own attributes are rebound to views of the buffers.

    Example::

        model = fd.nn.Sequential(fd.nn.Linear(64, 128, bias=False), fd.nn.BatchNorm(128),
                                 fd.nn.ReLU(), fd.nn.Linear(128, 10))
        opt = fd.optim.Adam(model.param_groups(weight_decay=1e-4), lr=1e-3)
        loss = loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward()); opt.step(model.grads())
    """

    def __init__(self, *layers):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}] must be a fastdl.nn layer; got "
                                f"{_validate.describe(layer)}")
        self.layers = list(layers)
        slots = [(layer, name, grad, name in layer.decay_names) for layer in layers
                 for name, grad in zip(layer.param_names, layer.grad_names)]
        slots.sort(key=lambda slot: not slot[3])  # decayed first; stable within each part
        arrays = [getattr(layer, name) for layer, name, _, _ in slots]
        dtypes = {np.dtype(a.dtype) for a in arrays}
        devices = {location(a) for a in arrays}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"all parameters must have one dtype and live on one device; got "
                             f"{sorted(map(str, dtypes))} on {sorted(devices)}")
        self.n_decayed = sum(slot[3] for slot in slots)
        self._slots = slots
        if not slots:
            return
        dtype, device = dtypes.pop(), devices.pop()
        sizes = [math.prod(a.shape) for a in arrays]
        offsets = np.cumsum([0] + sizes)
        allocate = _dispatch.arrays(device)
        self.flat_params = allocate.zeros(int(offsets[-1]), dtype)
        self.flat_grads = allocate.zeros(int(offsets[-1]), dtype)
        for i, (layer, name, grad, _) in enumerate(slots):
            shape = tuple(arrays[i].shape)
            view = self.flat_params[offsets[i]:offsets[i + 1]].reshape(shape)
            allocate.write(view, arrays[i])
            setattr(layer, name, view)
            setattr(layer, grad, self.flat_grads[offsets[i]:offsets[i + 1]].reshape(shape))

    def train(self):
        for layer in self.layers:
            layer.train()
        return super().train()

    def eval(self):
        for layer in self.layers:
            layer.eval()
        return super().eval()

    def _units(self):
        """The layers, each BatchNorm - ReLU - Dropout run as one fused unit
        (fastdl._block), built on first use."""
        units = self.__dict__.get("_fused_units")
        if units is None:
            units = self._fused_units = _block.units(self.layers, (BatchNorm, ReLU, Dropout))
        return units

    def forward(self, x, rows=None):
        """Every layer in turn. ``rows`` (data-parallel training): where x's examples sit in
        the global batch, for the Dropout layers' masks (:meth:`Dropout.forward`)."""
        linears = [layer for layer in self.layers if isinstance(layer, Linear)]
        shape = tuple(x.shape)
        if linears and len(shape) >= 2:  # the batch's examples, for _kernel_threads
            self._examples = shape[-1] if linears[0].feature_axis == 0 else shape[-2]
        with _kernel_threads(self, x, self.__dict__.get("_examples", 1)):
            for unit in self._units():
                x = unit.forward(x, rows) if _takes_rows(unit) else unit.forward(x)
        return x

    def backward(self, dout, input_grad=True):
        """Backward through every layer; returns the input's gradient, or None with
        ``input_grad=False`` (training on data: a first Linear then skips that product)."""
        units = self._units()
        with _kernel_threads(self, dout, self.__dict__.get("_examples", 1)):
            for i in range(len(units) - 1, -1, -1):
                unit = units[i]
                if i == 0 and not input_grad:
                    if isinstance(unit, Linear):
                        return unit.backward(dout, input_grad=False)
                    unit.backward(dout)
                    return None
                dout = unit.backward(dout)
        return dout

    def state_dict(self):
        """Every layer's :meth:`Layer.state_dict`, in order: ``{"layers": [...]}``."""
        return {"layers": [layer.state_dict() for layer in self.layers]}

    def load_state_dict(self, state):
        """Load :meth:`state_dict`'s output into every layer (all checked first)."""
        _validate.entries(state, "state", ("layers",))
        layers = state["layers"]
        if not isinstance(layers, (list, tuple)) or len(layers) != len(self.layers):
            raise ValueError(f"state['layers'] must hold {len(self.layers)} layers' states; got "
                             f"{_validate.describe(layers)}")
        for i, saved in enumerate(layers):
            if not isinstance(saved, dict):
                raise TypeError(f"state['layers'][{i}] must be a dict; got "
                                f"{_validate.describe(saved)}")
        snapshot = self.state_dict()  # a rejected layer puts the earlier ones back
        try:
            for layer, saved in zip(self.layers, layers):
                layer.load_state_dict(saved)
        except (TypeError, ValueError):
            for layer, saved in zip(self.layers, snapshot["layers"]):
                layer.load_state_dict(saved)
            raise

    def reset_model(self, k, seed=None):
        """Reinitialize model ``k`` of every layer. ``seed``: a new model seed, giving the layer
        at position i the seed ``spawn_seed(seed, i)`` (as :func:`fastdl.training.
        build_network` seeds its layers); None keeps each layer's seed."""
        if seed is not None:
            seed = _validate.seed(seed, "seed")
        for i, layer in enumerate(self.layers):
            layer.reset_model(k, None if seed is None else spawn_seed(seed, i))

    def copy_model(self, src, dst):
        """Make model ``dst`` of every layer a copy of model ``src``."""
        for layer in self.layers:
            layer.copy_model(src, dst)

    def params(self):
        return [getattr(layer, name) for layer, name, _, _ in self._slots]

    def grads(self):
        return [getattr(layer, grad) for layer, _, grad, _ in self._slots]

    def param_groups(self, weight_decay=0.0):
        """PyTorch-style groups for ``fastdl.optim``: the weights with ``weight_decay`` (L2, or
        decoupled for AdamW), the biases and BatchNorm's gamma and beta without."""
        params = self.params()
        groups = [{"params": params[:self.n_decayed], "weight_decay": weight_decay},
                  {"params": params[self.n_decayed:], "weight_decay": 0.0}]
        return [group for group in groups if group["params"]]

    def __repr__(self):
        inner = "".join(f"\n  {layer!r}," for layer in self.layers)
        return f"Sequential({inner}\n)"


def _takes_rows(unit):
    """Whether a Sequential's unit keys masks by global position (takes ``rows``)."""
    return isinstance(unit, (Dropout, _block.NormReluDropout))


def _kernel_threads(model, like, n_examples):
    """The threads for fastdl's CPU kernels around ``model``'s forward, backward or optimizer
    step on batches of ``n_examples``.

    :func:`fastdl.device.threads_beside_blas` (one thread, for a host ``like``) for one model,
    and for a population whose Linear layers run their products on BLAS
    (``fastdl._dense.blas_product``: large ones); no limit for a population whose products are
    all fastdl's kernels (kernels/dense.py): no other thread pool runs, and its products,
    batch norm, dropout and optimizer steps each split the K models across the cores. (One
    small model gains nothing from a second thread: a demo epoch took 13-16 ms either way.)"""
    layers = model.layers if isinstance(model, Sequential) else [model]
    if all(getattr(layer, "population", None) is None for layer in layers) or any(
            isinstance(layer, Linear) and _dense.blas_product(n_examples * layer.n_in
                                                              * layer.n_out)
            for layer in layers):
        return threads_beside_blas(like)
    return contextlib.nullcontext()


class EarlyStopping:
    """Stop training when the dev loss has not improved by more than ``min_delta`` for
    ``patience`` epochs; keeps a host copy of the parameters at the best dev loss.

    ``stop = stopper.step(dev_loss)`` after each epoch; ``stopper.restore()`` puts the best
    parameters back into the model.
    """

    def __init__(self, model, patience=5, min_delta=0.0):
        if not isinstance(model, Layer):
            raise TypeError(f"model must be a fastdl.nn layer; got {_validate.describe(model)}")
        self.model = model
        self.min_delta = _validate.number(min_delta, "min_delta", _validate.finite)
        self.patience = _validate.integer(patience, "patience", minimum=1)
        self.best_loss, self.best_epoch, self.epoch = math.inf, None, -1
        self.best_params = None

    def step(self, dev_loss):
        """Record one epoch's dev loss; True when training should stop."""
        dev_loss = _validate.real_value(dev_loss, "dev_loss")  # a bad value counts no epoch
        self.epoch += 1
        if dev_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch = dev_loss, self.epoch
            self.best_params = [np.array(to_host(p)) for p in self.model.params()]
        return self.epoch - self.best_epoch >= self.patience if self.best_epoch is not None \
            else self.epoch + 1 >= self.patience

    def state_dict(self):
        """Where the stopper stands (best loss and epoch, epochs seen, the best parameters)."""
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "epoch": self.epoch,
                "best_params": None if self.best_params is None else list(self.best_params)}

    def load_state_dict(self, state):
        _validate.entries(state, "state", ("best_loss", "best_epoch", "epoch", "best_params"))
        params = self.model.params()
        best = state["best_params"]
        if best is not None:
            if not isinstance(best, (list, tuple)) or len(best) != len(params):
                raise ValueError(f"state['best_params'] must hold {len(params)} arrays; got "
                                 f"{_validate.describe(best)}")
            for i, (saved, p) in enumerate(zip(best, params)):
                _saved_array(saved, f"state['best_params'][{i}]", p.dtype, tuple(p.shape))
        self.best_loss = _validate.real_value(state["best_loss"], "state['best_loss']")
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])
        self.epoch = int(state["epoch"])
        self.best_params = None if best is None else [np.array(a) for a in best]

    def restore(self):
        """Copy the parameters of the best epoch back into the model."""
        if self.best_params is None:
            raise ValueError("restore needs at least one step with a finite dev loss")
        for p, best in zip(self.model.params(), self.best_params):
            _dispatch.arrays(location(p)).write(p, best)
