"""torch.nn modules over fastdl's kernels: ``BatchNorm1d / 2d / 3d``, ``CrossEntropyLoss`` (and
``cross_entropy``), ``Dropout``, and ``patch(model)``, which puts them into a model.

Each is its PyTorch 2.13 counterpart (a subclass: same arguments, parameters, buffers and
state_dict keys), with forward and backward in a ``torch.autograd.Function`` over fastdl's
fused kernels; a PyTorch user changes one import. Inputs are read in place: contiguous and
channels-last tensors (any layout where moving the channel / class axis gives a C-contiguous
view) as they are, other layouts copied once to contiguous, as torch's kernels do; outputs come
back in the input's layout. float32 and float64 only: bfloat16, float16, integer and sparse
tensors are a TypeError, never cast nor handed to torch.

Outputs (y, gradients, dropout masks) on the CPU come from a small per-module pool of NumPy
buffers (``_tensors.BufferPool``), reused once no tensor over them is alive: keep an output as
long as you like, the pool never hands out memory a live tensor uses. Double backward is not
supported (a RuntimeError at the second differentiation). CUDA tensors take the
``__cuda_array_interface__`` path, untested here (no GPU).
"""

import functools
import itertools

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from fastdl.batchnorm import batch_norm_backward, batch_norm_forward
from fastdl.dropout import MASK64, dropout_backward, dropout_forward, seed_key
from fastdl.softmax import softmax_cross_entropy

from ._tensors import BufferPool, array, check_float, kernel_layout, tensor


def _array_or_none(t):
    return None if t is None else array(t)


def _once_differentiable(backward):
    """torch's ``once_differentiable``, also when the incoming gradients do not require grad
    (a loss's): under ``create_graph=True`` the gradients returned are marked so that
    differentiating them again raises torch's "trying to differentiate twice" RuntimeError,
    instead of being taken as constants (a silently wrong second derivative)."""
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            grads = [g.detach().requires_grad_() if isinstance(g, torch.Tensor) else g
                     for g in grads]
        return once(ctx, *grads)

    return wrapper


# -- batch normalization --------------------------------------------------------------------------

class BatchNormFunction(torch.autograd.Function):
    """``y = weight * (x - mean) / sqrt(var + eps) + bias`` per channel (axis 1 of x), with
    batch statistics when ``training`` (running_mean / running_var, when given, updated in
    place with ``momentum``) or the running ones; as ``torch.nn.functional.batch_norm``. The
    gradients of x, weight and bias are fastdl's batch_norm_backward (test time: statistics
    held constant). ``pool``: where the outputs come from (a :class:`BufferPool`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, pool,
                comm=None):
        view, k = kernel_layout(x, 1)
        y, out = pool.output(view.shape, x.dtype, x, k, 1)
        _, cache = batch_norm_forward(array(view), _array_or_none(weight),
                                      _array_or_none(bias), _array_or_none(running_mean),
                                      _array_or_none(running_var), training=training,
                                      momentum=momentum, eps=eps, channel_axis=k, out=out,
                                      comm=comm)
        # x is saved through autograd (an in-place change of it before backward is torch's
        # error), not in the cache, which backward gets back with x restored
        ctx.save_for_backward(view)
        ctx.cache, ctx.k, ctx.pool = cache._replace(x=None), k, pool
        return y

    @staticmethod
    @_once_differentiable
    def backward(ctx, dy):
        (view,) = ctx.saved_tensors
        k = ctx.k
        dy = dy.movedim(1, k).contiguous()  # the forward's layout (a copy only if it differs)
        dx, out = ctx.pool.output(view.shape, view.dtype, view, k, 1)
        _, dgamma, dbeta = batch_norm_backward(array(dy), ctx.cache._replace(x=array(view)),
                                               out=out)
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None, tensor(dgamma, view) if needs[1] else None,
                tensor(dbeta, view) if needs[2] else None, None, None, None, None, None, None,
                None)


class _FastBatchNorm:
    """fastdl's forward for torch's ``_BatchNorm`` modules, mixed in before the torch class,
    whose constructor, parameters, buffers, ``_check_input_dim`` and state_dict it keeps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fastdl_setup()

    def _fastdl_setup(self):
        self._pool = BufferPool()

    def _comm(self):
        """What the batch statistics are reduced over: nothing (SyncBatchNorm: its group)."""
        return None

    def forward(self, input):
        """As ``torch.nn.BatchNorm*d.forward``: in training, batch statistics, and the running
        ones updated (``momentum=None``: the cumulative average, factor 1 /
        num_batches_tracked) when ``track_running_stats``; in eval mode, the running
        statistics, or batch ones when there are none (``track_running_stats=False``).
        ``num_batches_tracked`` is incremented after the kernel succeeds, so a rejected input
        changes nothing (torch increments it first)."""
        check_float(input, "input")
        self._check_input_dim(input)
        track = (self.training and self.track_running_stats
                 and self.num_batches_tracked is not None)
        momentum = 0.0 if self.momentum is None else self.momentum  # torch's factor
        if track and self.momentum is None:
            momentum = 1.0 / (int(self.num_batches_tracked) + 1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_stats = not self.training or self.track_running_stats
        y = BatchNormFunction.apply(input, self.weight, self.bias,
                                    self.running_mean if use_stats else None,
                                    self.running_var if use_stats else None, bn_training,
                                    momentum, self.eps, self._pool,
                                    self._comm() if bn_training else None)
        if track:
            self.num_batches_tracked.add_(1)
        return y


class BatchNorm1d(_FastBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` (inputs (N, C) or (N, C, L)) on fastdl's kernels."""


class BatchNorm2d(_FastBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (inputs (N, C, H, W), contiguous or channels-last, read in
    place; y in the input's memory format) on fastdl's kernels."""


class BatchNorm3d(_FastBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` (inputs (N, C, D, H, W), contiguous or channels_last_3d)
    on fastdl's kernels."""


class TorchDistributedComm:
    """A ``torch.distributed`` process group as fastdl's batch norm takes it (``comm=``):
    ``size`` and an in-place SUM ``allreduce`` of host float64 arrays, the same bits on every
    rank (two ranks add a + b, commutative; more reduce to the group's first rank and
    broadcast, since a ring allreduce adds in another order on each rank). CPU tensors over
    the NumPy arrays, no copy; gloo."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._root = dist.get_global_rank(group, 0) if group is not None else 0

    def allreduce(self, array):
        t = torch.from_numpy(array)  # the same memory
        if self.size == 2:
            self.dist.all_reduce(t, group=self.group)
        elif self.size > 2:
            self.dist.reduce(t, dst=self._root, group=self.group)
            self.dist.broadcast(t, src=self._root, group=self.group)
        return array


class SyncBatchNorm(_FastBatchNorm, torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` on fastdl's kernels, on the CPU (which PyTorch 2.13's own
    refuses: "SyncBatchNorm expected input tensor to be on GPU"): in training, the statistics
    of the batch over every rank of ``process_group`` (default: the whole world of
    ``torch.distributed``, gloo), one allreduce of per-channel float64 sums in forward and one
    in backward, as fastdl's synchronized batch norm (``fastdl.batchnorm``); alone (no process
    group, or one rank) the plain batch norm. Inputs (N, C, ...) as any BatchNorm*d; a
    ``DistributedDataParallel`` model with it trains like one process on the whole batch (it
    is not a ``torch.nn.SyncBatchNorm`` subclass: DDP refuses those on the CPU)::

        model = fastdl.torch.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _comm(self):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        comm = TorchDistributedComm(self.process_group)
        return comm if comm.size > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """``module`` with every ``torch.nn`` (or fastdl) BatchNorm1d / 2d / 3d made a fastdl
        SyncBatchNorm of ``process_group``, in place (the same Parameters and buffers), as
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``; returns ``module``."""
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, cls):
                m.__class__ = cls
                m.process_group = process_group
                m._fastdl_setup()
        return module


# -- cross-entropy ------------------------------------------------------------------------------

def _softmax_cross_entropy(view, target, k, options, pool, like):
    """The fused kernel on the kernel-layout logits ``view`` (classes at axis k): (loss
    tensor, dlogits tensor in ``like``'s layout)."""
    dim = 0 if view.dim() == 1 else 1
    grad, out = pool.output(view.shape, view.dtype, like, k, dim)
    weight = options["weight"]
    extra = {} if weight is None else {"weight": array(weight)}  # fd's weight= keyword
    loss, _ = softmax_cross_entropy(array(view), array(target), axis=k,
                                    reduction=options["reduction"],
                                    label_smoothing=options["label_smoothing"],
                                    ignore_index=options["ignore_index"], out=out, **extra)
    if not like.is_cuda:
        loss = np.asarray(loss)
    return tensor(loss, like), grad


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of softmax(logits) (classes at axis 1, or 0 for one unbatched row) and
    its gradient from one fused pass, in forward; backward scales the stored gradient by
    grad_output in place (a scalar, or per position for ``reduction="none"``) and hands it
    over. A second backward through the same graph (``retain_graph=True``) recomputes it from
    the saved logits."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, pool):
        dim = 0 if logits.dim() == 1 else 1
        view, k = kernel_layout(logits, dim)
        if target.is_floating_point():  # probabilities: the logits' layout
            target = target.movedim(dim, k).contiguous()
        else:
            target = target.contiguous()
        weight = None if weight is None else weight.contiguous()
        options = dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                       label_smoothing=label_smoothing)
        loss, grad = _softmax_cross_entropy(view, target, k, options, pool, logits)
        ctx.save_for_backward(view, target, weight)  # for a second backward only
        ctx.grad, ctx.k, ctx.pool = grad, k, pool
        ctx.options = dict(options, weight=None)  # tensors go through save_for_backward
        return loss

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None  # handed over: the caller may keep or modify it
        if grad is None:  # a second backward through this graph: recompute
            view, target, weight = ctx.saved_tensors
            _, grad = _softmax_cross_entropy(view, target, ctx.k,
                                             dict(ctx.options, weight=weight), ctx.pool, view)
        if grad_loss.dim() > 0:  # "none": one value per position, broadcast over the classes
            grad.mul_(grad_loss.unsqueeze(1))
        elif grad_loss.is_cuda or float(grad_loss) != 1.0:  # loss.backward(): nothing to do
            grad.mul_(grad_loss)
        return grad, None, None, None, None, None, None


_FUNCTION_POOL = BufferPool()  # the outputs of cross_entropy() called as a function


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0):
    """``torch.nn.functional.cross_entropy`` (same arguments, in torch's order) on fastdl's
    fused softmax cross-entropy (SPEC.md's formulas).

    input: float32/float64 logits (C,), (N, C) or (N, C, d1, ...), classes at axis 1 (0 when
    unbatched). target: class indices (an integer tensor of input's shape without the class
    axis; ``ignore_index`` marks positions that count for nothing) or probabilities (input's
    shape and dtype). weight: (C,) class weights. ``size_average`` / ``reduce`` are torch's
    deprecated arguments, mapped to ``reduction`` as torch does (with its warning). Returns the
    loss (a 0-d tensor, or per position for ``reduction="none"``), differentiable in input.
    Labels out of range are a ValueError (torch: an IndexError), and so are ignore_index with
    probability targets (torch: a RuntimeError) and a target or weight that requires grad
    (no gradient is computed for them).
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    return _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                          _FUNCTION_POOL)


def _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, pool):
    check_float(input, "input")
    if input.dim() == 0:
        raise ValueError("input must have a class axis: shape (C,), (N, C) or (N, C, d1, ...); "
                         "got a 0-d tensor")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor; got {type(target).__name__}")
    if target.layout != torch.strided:
        raise TypeError(f"target must be a dense (strided) tensor; got layout {target.layout}")
    if target.device != input.device:
        raise TypeError(f"target is on {target.device} but input is on {input.device}")
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"target probabilities must have input's shape "
                             f"{tuple(input.shape)}; got {tuple(target.shape)}")
        if target.requires_grad:
            raise ValueError("target requires grad: fastdl's cross_entropy computes no "
                             "gradient for probability targets (detach it)")
        if ignore_index != -100:  # torch's rule (fastdl's function would ignore it)
            raise ValueError(f"ignore_index is not supported for probability targets (as "
                             f"torch); got ignore_index={ignore_index}")
    if weight is not None:
        check_float(weight, "weight")
        if weight.requires_grad:
            raise ValueError("weight requires grad: cross_entropy computes no gradient for "
                             "class weights (as torch; detach it)")
    return CrossEntropyFunction.apply(input, target, weight, ignore_index, reduction,
                                      label_smoothing, pool)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` (same constructor, torch's deprecated ``size_average`` /
    ``reduce`` included, and its ``weight`` buffer) computing :func:`cross_entropy`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fastdl_setup()

    def _fastdl_setup(self):
        self._pool = BufferPool()

    def forward(self, input, target):
        return _cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                              self.label_smoothing, self._pool)


# -- dropout ------------------------------------------------------------------------------------

def mask_seed(initial_seed, index, call):
    """fastdl's one integer seed for call number ``call`` (from 0) of the Dropout module
    created ``index``-th (from 0) in this process, under ``torch.initial_seed()``::

        seed = splitmix64(initial_seed) XOR (index << 40) XOR call        (64 bits)

    splitmix64 is fastdl.dropout.seed_key's mixer (a bijection of 64-bit values). Under one
    torch seed, distinct (index, call) pairs give distinct seeds (for index < 2**24 and call
    < 2**40), hence distinct generator keys: two modules never share a mask, nor two calls."""
    low, high = seed_key(initial_seed)
    return (low | high << 32) ^ ((index << 40) & MASK64) ^ call


class DropoutFunction(torch.autograd.Function):
    """``y = x * mask / (1 - p)``, mask = fastdl's counter-based draw for ``seed`` (u >= p);
    ``dx = dy * mask / (1 - p)``. ``inplace``: y is written over x (marked dirty)."""

    @staticmethod
    def forward(ctx, x, p, seed, inplace, pool):
        dim = 1 if x.dim() > 1 else 0
        view, k = kernel_layout(x, dim)
        _, mask = pool.output(view.shape, torch.bool, x, k, dim)
        if inplace:
            dropout_forward(array(view), p, seed, out=array(view), mask_out=mask)
            if view.data_ptr() != x.data_ptr():  # a copy (x's layout is not read in place)
                x.copy_(view)
            ctx.mark_dirty(x)
            y = x
        else:
            y, out = pool.output(view.shape, x.dtype, x, k, dim)
            dropout_forward(array(view), p, seed, out=out, mask_out=mask)
        ctx.mask, ctx.p, ctx.k, ctx.dim, ctx.pool = mask, p, k, dim, pool
        return y

    @staticmethod
    @_once_differentiable
    def backward(ctx, dy):
        dy = dy.movedim(ctx.dim, ctx.k).contiguous()
        dx, out = ctx.pool.output(dy.shape, dy.dtype, dy, ctx.k, ctx.dim)
        dropout_backward(array(dy), ctx.mask, ctx.p, out=out)
        return dx, None, None, None, None


def _check_inplace(t):
    """torch's rule for in-place ops, checked before the kernel writes (autograd would say so
    only after): no leaf that requires grad, nor a view of one."""
    base = t._base if t._is_view() else t
    if torch.is_grad_enabled() and t.requires_grad and base.is_leaf:
        raise RuntimeError(f"a {'view of a ' if base is not t else ''}leaf Variable that "
                           "requires grad is being used in an in-place operation "
                           "(Dropout(inplace=True)); use inplace=False here")


_DROPOUT_INDEX = itertools.count()  # the creation index of each Dropout module


class Dropout(torch.nn.Dropout):
    """``torch.nn.Dropout(p=0.5, inplace=False)`` with fastdl's counter-based mask.

    In training (p > 0) call number ``calls`` of this module draws its mask from
    :func:`mask_seed` (``torch.initial_seed()``, ``index``, ``calls``): ``index`` is the
    module's creation index in the process (a copy or an unpickled module gets a new one),
    so two modules never share masks and a run that seeds torch and builds its modules in
    the same order draws the same masks, on the CPU and the GPU. torch's generator is not
    advanced. Eval mode, p = 0 and empty inputs return ``input`` itself, as torch.
    ``inplace=True`` writes y over the input (torch's rule applies: not on a leaf that
    requires grad).
    """

    def __init__(self, p=0.5, inplace=False):
        super().__init__(p, inplace)
        self._fastdl_setup()

    def _fastdl_setup(self):
        self._pool = BufferPool()
        self.index, self.calls = next(_DROPOUT_INDEX), 0

    def __setstate__(self, state):
        super().__setstate__(state)
        self.index = next(_DROPOUT_INDEX)  # a copy is another module: masks of its own

    def forward(self, input):
        check_float(input, "input")
        if not self.training or self.p == 0 or input.numel() == 0:
            return input
        if self.inplace:
            _check_inplace(input)
        seed = mask_seed(torch.initial_seed(), self.index, self.calls)
        y = DropoutFunction.apply(input, self.p, seed, self.inplace, self._pool)
        self.calls += 1  # after the call: a rejected input draws no mask
        return y


# -- patch --------------------------------------------------------------------------------------

_REPLACEMENTS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                 torch.nn.BatchNorm3d: BatchNorm3d, torch.nn.SyncBatchNorm: SyncBatchNorm,
                 torch.nn.Dropout: Dropout, torch.nn.CrossEntropyLoss: CrossEntropyLoss}


def patch(model):
    """Make every ``torch.nn.BatchNorm1d / 2d / 3d``, ``SyncBatchNorm``, ``Dropout`` and
    ``CrossEntropyLoss`` in ``model`` (``model`` itself included, recursively) fastdl's;
    returns ``model``.

    Only those exact classes are replaced (not subclasses, nor fastdl's own).
    Each module object stays where it is and only its class changes, to fastdl's subclass:
    its Parameters and buffers (the very objects, so an optimizer made before still holds
    them), options, training mode and hooks are untouched.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    for module in model.modules():
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            module._fastdl_setup()
    return model
