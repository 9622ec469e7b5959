"""Inverted dropout on the CPU, and the counter-based generator it shares with the GPU.

The mask bit of element ``i`` is a pure function of (seed, i): ``uniform_bits`` hashes the
64-bit index with a 64-bit key derived from the seed, so the mask is the same on any number of
threads and on the GPU (``kernels/dropout_cuda.py`` calls the same function). Element i is kept
when its 24 uniform bits ``u24`` (u = u24 / 2**24 in [0, 1)) satisfy ``u >= p``, i.e.
``u24 >= ceil(p * 2**24)``: an exact integer test, the same on every device.

The hash is two rounds of Wellons' ``lowbias32`` (a 32-bit avalanche mixer), keyed by the low
and the high half of the key. ``uniform_bits`` is plain Python on int64 masked to 32 bits (for
CUDA and the simulator); the CPU kernels use the same hash built in 32-bit LLVM integers, and
the tests hold the two equal.
"""

from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import config
from .config import cpu_kernel_pair

UNIFORM_BITS = 24
MASK32 = 0xFFFFFFFF


def uniform_bits(index, key_low, key_high):
    """24 uniform random bits for element ``index`` (int64 >= 0) under a 64-bit key split in
    two 32-bit halves: ``lowbias32(lowbias32(lo(index) ^ key_low) ^ hi(index) ^ key_high)``.

    Plain Python for CUDA and the simulator; the CPU kernels test ``>= threshold`` with
    :func:`_keep_cpu`, the same function on 32-bit integers.
    """
    h = (index & MASK32) ^ key_low
    for round in range(2):
        h ^= h >> 16
        h = (h * LOWBIAS32[0]) & MASK32
        h ^= h >> 15
        h = (h * LOWBIAS32[1]) & MASK32
        h ^= h >> 16
        if round == 0:
            h ^= ((index >> 32) & MASK32) ^ key_high
    return h >> (32 - UNIFORM_BITS)


LOWBIAS32 = (0x7FEB352D, 0x846CA68B)


@intrinsic
def _keep_cpu(typingctx, index, key_low, key_high, threshold):
    """``uniform_bits(index, key_low, key_high) >= threshold`` (threshold <= 2**24) in 32-bit
    integer arithmetic, which vectorizes 8 lanes wide with AVX2: numba widens integer
    arithmetic to 64 bits, and AVX2 has no 64-bit multiply (nor a cheap 64-bit compare)."""
    if not all(isinstance(a, types.Integer) for a in (index, key_low, key_high, threshold)):
        return None

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        index64 = builder.sext(args[0], i64) if args[0].type.width < 64 else args[0]
        low = builder.trunc(index64, i32)
        high = builder.trunc(builder.lshr(index64, ir.Constant(i64, 32)), i32)

        def word(value):
            width = value.type.width
            return builder.trunc(value, i32) if width > 32 else builder.zext(value, i32) \
                if width < 32 else value

        def lowbias32(h):
            for shift, multiplier in [(16, LOWBIAS32[0]), (15, LOWBIAS32[1])]:
                h = builder.xor(h, builder.lshr(h, ir.Constant(i32, shift)))
                h = builder.mul(h, ir.Constant(i32, multiplier))
            return builder.xor(h, builder.lshr(h, ir.Constant(i32, 16)))

        h = lowbias32(builder.xor(low, word(args[1])))
        h = lowbias32(builder.xor(builder.xor(h, high), word(args[2])))
        bits = builder.lshr(h, ir.Constant(i32, 32 - UNIFORM_BITS))
        return builder.icmp_unsigned(">=", bits, word(args[3]))

    return types.boolean(index, key_low, key_high, threshold), codegen


@njit(inline="always")
def _chunk_end(c, chunk, n):
    """min(n, (c + 1) * chunk), without ``min``: numba compiles an overload of the builtin on
    its first use (0.03 s of a cold run)."""
    end = (c + 1) * chunk
    return end if end < n else n


@njit(inline="always")
def _smaller(a, b):
    return a if a < b else b


def forward_kernel(x, keys_low, keys_high, model_stride, offset, run, run_stride, thresholds,
                   scales, chunk, y, mask):
    """x, y, mask: (K, n) per-model rows. Element j of model k has index
    ``k * model_stride + offset + (j // run) * run_stride + j % run`` under key k: its position
    in the array the mask is keyed on (model_stride = that array's per-model size with one key
    for all: the flat index; 0 with a key per model: each model's own index; a local part of a
    global batch sits at ``offset`` in runs of ``run`` elements ``run_stride`` apart; the
    whole array is one run at offset 0). Keep it when its bits >= thresholds[k]; y = x *
    scales[k] where kept, x * 0 where dropped (so inf * 0 = NaN, as x * mask * scale)."""
    n_models, n = x.shape
    chunks_per_model = (n + chunk - 1) // chunk
    for item in prange(n_models * chunks_per_model):
        k, c = item // chunks_per_model, item % chunks_per_model
        threshold, scale = thresholds[k], scales[k]
        key_low, key_high = keys_low[k], keys_high[k]
        zero = scale - scale
        j, hi = c * chunk, _chunk_end(c, chunk, n)
        while j < hi:  # one segment of a run at a time: its indices are consecutive
            q = j % run
            end = _smaller(j + run - q, hi)
            # slices: an index numba cannot prove non-negative costs a wrap-around test
            xs, ys, masks = x[k, j:end], y[k, j:end], mask[k, j:end]
            first = k * model_stride + offset + (j // run) * run_stride + q
            for t in range(end - j):
                keep = _keep_cpu(first + t, key_low, key_high, threshold)
                masks[t] = keep
                ys[t] = xs[t] * (scale if keep else zero)
            j = end


forward_serial, forward_parallel = cpu_kernel_pair(forward_kernel)


def backward_kernel(dy, mask, scales, chunk, dx):
    """dx = dy * mask * scales[k], for (K, n) rows."""
    n_models, n = dy.shape
    chunks_per_model = (n + chunk - 1) // chunk
    for item in prange(n_models * chunks_per_model):
        k, c = item // chunks_per_model, item % chunks_per_model
        scale = scales[k]
        zero = scale - scale
        lo, hi = c * chunk, _chunk_end(c, chunk, n)
        dys, masks, dxs = dy[k, lo:hi], mask[k, lo:hi], dx[k, lo:hi]
        for j in range(hi - lo):
            dxs[j] = dys[j] * (scale if masks[j] else zero)


backward_serial, backward_parallel = cpu_kernel_pair(backward_kernel)


# -- launchers (NumPy arrays, checked by fastdl.dropout) --------------------------------------

CHUNK = 65_536  # elements per work item: a few per thread even at 1e6 elements


def forward(x, n_models, keys_low, keys_high, model_stride, offset, run, run_stride,
            thresholds, scales, y, mask):
    """The mask and y of x, each viewed as (K, n) rows (host arrays, as :func:`forward_kernel`
    says)."""
    kernel = forward_parallel if config.use_parallel(x.size) else forward_serial
    kernel(x.reshape(n_models, -1), keys_low, keys_high, model_stride, offset, run, run_stride,
           thresholds, scales, CHUNK, y.reshape(n_models, -1), mask.reshape(n_models, -1))


def backward(dy, mask, n_models, scales, dx):
    """dx = dy * mask * scales[k], each viewed as (K, n) rows."""
    kernel = backward_parallel if config.use_parallel(dy.size) else backward_serial
    kernel(dy.reshape(n_models, -1), mask.reshape(n_models, -1), scales, CHUNK,
           dx.reshape(n_models, -1))
