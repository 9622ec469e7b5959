"""Fused optimizer kernels for CUDA GPUs: the element functions of ``kernels/optim.py`` run by
the same chunk tables (see that module's docstring), one block per chunk, grid-stride.

A step is one launch of ``grad_stats`` (only when skipping or clipping is asked for; it writes
one partial sum of squares and one non-finite flag per chunk, which the host adds up per model
in float64, so the result does not depend on scheduling) and one launch of the update kernel.
Params and grads arrive as tuples of 1-D arrays: one array each for a flat buffer (one launch),
up to ``MAX_TENSORS_PER_LAUNCH`` separate arrays per launch otherwise.

No float64 instruction is executed by the float32 kernels: coefficients come precomputed in
the parameters' dtype, and the partial sums are accumulated in that dtype (each thread adds at
most CHUNK_SIZE / THREADS_PER_BLOCK = 32 squares before the shared-memory tree).

State storage (kernels/quantize.py): the float updates read and write state through
:func:`_load` / :func:`_store`, which decode and round bfloat16 (uint16 arrays) and pass float
state through, chosen when the kernel is compiled for the state's dtype. 8-bit state has its
own updates (``*_update_8bit_cuda``), the CPU's ``update_kernel_8bit`` block by block: one CUDA
block runs a chunk's quantization blocks in turn; per quantization block each thread decodes,
updates and writes (params, EMA) its elements i = tid, tid + blockDim, ... (one element on a
GPU, BLOCK / 32 in the simulator), keeping the new state in shared memory; a shared-memory
tree gives the block's absmax, and each thread encodes its elements.
"""

import math

import numpy as np
from numba import types
from numba.extending import overload

from . import optim as cpu
from . import quantize
from .cudalib import (
    MAX_TENSORS_PER_LAUNCH,
    THREADS_PER_BLOCK,
    array,
    cuda,
    device_function,
    float32_bits,
    float32_from_bits,
    kernel,
)
from .optim import ADAM, CHUNK, MOMENTUM, RMSPROP, SGD
from .quantize import BLOCK, SIGNED_CODES, UNSIGNED_CODES

_sgd = device_function(cpu.sgd_element)
_momentum = device_function(cpu.momentum_element)
_rmsprop = device_function(cpu.rmsprop_element)
_adam = device_function(cpu.adam_element)
_ema = device_function(cpu.ema_element)
_shared = device_function(cpu.shared_coefficients)

DTYPES = (np.float32, np.float64)
BFLOAT16_BITS = np.uint16  # bfloat16 state: the upper halves of float32 values


def _signatures(n_state):
    """Registry signatures of an update kernel: both dtypes, flat (1) and batched tensors, and
    float32 params with bfloat16 state."""
    signatures = []
    for dtype, state_dtype in ((np.float32, np.float32), (np.float64, np.float64),
                               (np.float32, BFLOAT16_BITS)):
        for n_tensors in (1, MAX_TENSORS_PER_LAUNCH):
            tensors = types.UniTuple(array(dtype), n_tensors)
            signatures.append((tensors, tensors, array(np.int64, 2), array(dtype, 2),
                               array(np.bool_)) + (array(state_dtype),) * n_state
                              + (array(dtype),))
    return signatures


def _thread_range(chunks, c):
    """This thread's first element, the end, and the offsets of element 0 in the state and
    the EMA arrays (CHUNK.state, CHUNK.flat)."""
    lo, hi = chunks[c, CHUNK.lo], chunks[c, CHUNK.hi]
    return lo + cuda.threadIdx.x, hi, chunks[c, CHUNK.state] - lo, chunks[c, CHUNK.flat] - lo


_thread_range = device_function(_thread_range)


def _operands(params, grads, chunks, coef, c):
    """Chunk c's parameter and gradient arrays and its coefficient row."""
    ptr = chunks[c, CHUNK.ptr]
    return params[ptr], grads[ptr], coef[chunks[c, CHUNK.row]]


_operands = device_function(_operands)


# -- state of any storage dtype: float, or bfloat16 as uint16 bits ------------------------------

def _holds_bfloat16(state):
    """Whether ``state`` holds bfloat16 bits (uint16): a constant once compiled (the overload
    below), so a kernel keeps only its dtype's branch of :func:`_load` / :func:`_store`."""
    return state.dtype == BFLOAT16_BITS


@overload(_holds_bfloat16)
def _holds_bfloat16_overload(state):
    flag = state.dtype == types.uint16
    return lambda state: flag


def _bfloat16_decode(bits):
    """bfloat16 bits -> float32, exactly."""
    return float32_from_bits(np.uint32(bits) << 16)


def _bfloat16_encode(x):
    """float32 -> bfloat16 bits as ``kernels/floats.py`` bfloat16_encode: the upper half
    rounded to nearest, ties to even; a NaN's upper half made quiet."""
    bits = float32_bits(x)
    upper = bits >> 16
    rounded = (bits + 0x7FFF + (upper & 1)) >> 16
    return upper | 0x40 if (bits & 0x7FFFFFFF) > 0x7F800000 else rounded


_bfloat16_decode = device_function(_bfloat16_decode)
_bfloat16_encode = device_function(_bfloat16_encode)


def _load(state, i):
    """State element i as a float (of the params' dtype: bfloat16 state has float32 params)."""
    if _holds_bfloat16(state):
        return _bfloat16_decode(state[i])
    return state[i]


def _store(state, i, x):
    """``state[i] = x``, rounded to bfloat16 for uint16 state."""
    if _holds_bfloat16(state):
        state[i] = _bfloat16_encode(x)
    else:
        state[i] = x


_load = device_function(_load)
_store = device_function(_store)


@kernel(_signatures(1))
def sgd_update_cuda(params, grads, chunks, coef, active, buf, ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            lr, buf_keep, buf_gain, momentum = r[SGD.lr], r[SGD.buf_keep], r[SGD.buf_gain], \
                r[SGD.momentum]
            nesterov, use_buf = r[SGD.nesterov] != 0, r[SGD.use_buf] != 0
            use_ema = ema.shape[0] > 0
            start, stop, s, f = _thread_range(chunks, c)
            for i in range(start, stop, cuda.blockDim.x):
                b = _load(buf, s + i) if use_buf else gmul
                pi, b = _sgd(p[i], g[i], b, gmul, wd, lr, buf_keep, buf_gain, momentum,
                             nesterov, use_buf)
                p[i] = pi
                if use_buf:
                    _store(buf, s + i, b)
                if use_ema:
                    ema[f + i] = _ema(ema[f + i], pi, ema_keep, ema_gain)


@kernel(_signatures(1))
def momentum_update_cuda(params, grads, chunks, coef, active, velocity, ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            lr, beta = r[MOMENTUM.lr], r[MOMENTUM.beta]
            one_minus_beta = r[MOMENTUM.one_minus_beta]
            use_ema = ema.shape[0] > 0
            start, stop, s, f = _thread_range(chunks, c)
            for i in range(start, stop, cuda.blockDim.x):
                pi, v = _momentum(p[i], g[i], _load(velocity, s + i), gmul, wd, lr, beta,
                                  one_minus_beta)
                p[i] = pi
                _store(velocity, s + i, v)
                if use_ema:
                    ema[f + i] = _ema(ema[f + i], pi, ema_keep, ema_gain)


@kernel(_signatures(3))
def rmsprop_update_cuda(params, grads, chunks, coef, active, square_avg, grad_avg, buf, ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            lr, alpha, one_minus_alpha = r[RMSPROP.lr], r[RMSPROP.alpha], \
                r[RMSPROP.one_minus_alpha]
            eps, momentum = r[RMSPROP.eps], r[RMSPROP.momentum]
            centered, use_buf = r[RMSPROP.centered] != 0, r[RMSPROP.use_buf] != 0
            use_ema = ema.shape[0] > 0
            start, stop, s, f = _thread_range(chunks, c)
            for i in range(start, stop, cuda.blockDim.x):
                a = _load(grad_avg, s + i) if centered else gmul
                b = _load(buf, s + i) if use_buf else gmul
                pi, sq, a, b = _rmsprop(p[i], g[i], _load(square_avg, s + i), a, b, gmul, wd,
                                        lr, alpha, one_minus_alpha, eps, momentum, centered,
                                        use_buf)
                p[i] = pi
                _store(square_avg, s + i, sq)
                if centered:
                    _store(grad_avg, s + i, a)
                if use_buf:
                    _store(buf, s + i, b)
                if use_ema:
                    ema[f + i] = _ema(ema[f + i], pi, ema_keep, ema_gain)


@kernel(_signatures(3))
def adam_update_cuda(params, grads, chunks, coef, active, exp_avg, exp_avg_sq, max_exp_avg_sq,
                     ema):
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            decay, beta1, one_minus_beta1 = r[ADAM.decay], r[ADAM.beta1], r[ADAM.one_minus_beta1]
            beta2, one_minus_beta2 = r[ADAM.beta2], r[ADAM.one_minus_beta2]
            step_size, bias_correction2_sqrt = r[ADAM.step_size], r[ADAM.bias_correction2_sqrt]
            eps, amsgrad = r[ADAM.eps], r[ADAM.amsgrad] != 0
            use_ema = ema.shape[0] > 0
            start, stop, s, f = _thread_range(chunks, c)
            for i in range(start, stop, cuda.blockDim.x):
                vm = _load(max_exp_avg_sq, s + i) if amsgrad else gmul
                pi, m, v, vm = _adam(p[i], g[i], _load(exp_avg, s + i),
                                     _load(exp_avg_sq, s + i), vm, gmul, wd, decay, beta1,
                                     one_minus_beta1, beta2, one_minus_beta2, step_size,
                                     bias_correction2_sqrt, eps, amsgrad)
                p[i] = pi
                _store(exp_avg, s + i, m)
                _store(exp_avg_sq, s + i, v)
                if amsgrad:
                    _store(max_exp_avg_sq, s + i, vm)
                if use_ema:
                    ema[f + i] = _ema(ema[f + i], pi, ema_keep, ema_gain)


UPDATES = {"sgd": sgd_update_cuda, "momentum": momentum_update_cuda,
           "rmsprop": rmsprop_update_cuda, "adam": adam_update_cuda,
           "adamw": adam_update_cuda}


# -- 8-bit state (kernels/quantize.py; the CPU's optim.update_kernel_8bit) ------------------------
# A chunk starts at a block boundary; its quantization blocks are run in turn by the CUDA
# block: thread tid updates elements b0 + tid, b0 + tid + blockDim, ... of the block at b0,
# from their decoded state (code table in shared memory, times the block's absmax), writes the
# params and EMA, and keeps the new state in shared memory; then the block's new absmax (a
# shared-memory max tree) and each value's nearest code (quantize.nearest_code_function, the
# CPU's function).

N_CODES = SIGNED_CODES.shape[0]

# The state buffers an 8-bit update reads, by their index in ``Algorithm.state`` (AMSGrad's
# maximum and centered RMSprop's mean have no 8-bit form): the host passes only these codes
# and absmax, which keeps a launch of 32 tensors within 4 KB of kernel parameters.
STATE_8BIT = {"sgd": (0,), "momentum": (0,), "rmsprop": (0, 2), "adam": (0, 1),
              "adamw": (0, 1)}

_nearest_signed = device_function(quantize.nearest_code_function(True))
_nearest_unsigned = device_function(quantize.nearest_code_function(False))


def _signatures_8bit(n_state):
    """Registry signatures of an 8-bit update: float32, flat (1) and batched tensors."""
    signatures = []
    for n_tensors in (1, MAX_TENSORS_PER_LAUNCH):
        tensors = types.UniTuple(array(np.float32), n_tensors)
        signatures.append((tensors, tensors, array(np.int64, 2), array(np.float32, 2),
                           array(np.bool_), types.UniTuple(array(np.uint8), n_state),
                           types.UniTuple(array(np.float32), n_state), array(np.float32)))
    return signatures


def _copy_table(table, codes):
    """``table[:] = codes`` by the block's threads (shared from constant memory: the decode's
    gathers are random); the caller syncs."""
    for i in range(cuda.threadIdx.x, N_CODES, cuda.blockDim.x):
        table[i] = codes[i]


def _block_start(chunks, c, b0):
    """The block at element b0 of chunk c: its size, its first state offset, its absmax
    index."""
    n = chunks[c, CHUNK.hi] - b0
    n = n if n < BLOCK else BLOCK
    start = chunks[c, CHUNK.state] + b0 - chunks[c, CHUNK.lo]
    return n, start, start // BLOCK


def _larger(top, x):
    """max(top, |x|) as quantize's absmax takes it: a NaN wins (the block decodes to NaN, as
    float state would keep it)."""
    a = abs(x)
    return a if a > top or a != a else top


def _block_max(x, tops):
    """The largest ``x`` of the CUDA block's threads, to every thread: a shared-memory tree
    over ``tops`` (THREADS_PER_BLOCK,); the caller syncs before ``tops`` is written again."""
    tid = cuda.threadIdx.x
    tops[tid] = x
    cuda.syncthreads()
    width = THREADS_PER_BLOCK // 2
    while width > 0:
        if tid < width:
            tops[tid] = _larger(tops[tid], tops[tid + width])  # both >= 0 or NaN
        cuda.syncthreads()
        width //= 2
    return tops[0]


def _encode(new, n, top, codes, start, signed):
    """This thread's share of ``quantize.encode_block``: ``new[j]`` (j < n) rounded to
    ``codes[start + j]`` on the absmax ``top`` (times 1 / top in float32; a block of zeros
    gets the code of 0)."""
    inverse = np.float32(1) / top if top > np.float32(0) else np.float32(0)
    for j in range(cuda.threadIdx.x, n, cuda.blockDim.x):
        x = new[j] * inverse
        codes[start + j] = _nearest_signed(x) if signed else _nearest_unsigned(x)


_copy_table = device_function(_copy_table)
_block_start = device_function(_block_start)
_larger = device_function(_larger)
_block_max = device_function(_block_max)
_encode = device_function(_encode)


def _close_block(new, n, top, tops, codes, absmax, blk, start, signed):
    """The end of a quantization block for one state: its absmax (the max tree over the
    threads' ``top``, in shared ``tops``), written by thread 0, and this thread's share of
    the codes."""
    top = _block_max(top, tops)
    _encode(new, n, top, codes, start, signed)
    if cuda.threadIdx.x == 0:
        absmax[blk] = top


_close_block = device_function(_close_block)


@kernel(_signatures_8bit(1))
def sgd_update_8bit_cuda(params, grads, chunks, coef, active, codes, absmax, ema):
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    table = cuda.shared.array(N_CODES, types.float32)
    _copy_table(table, cuda.const.array_like(SIGNED_CODES))
    new = cuda.shared.array(BLOCK, types.float32)
    tops = cuda.shared.array(THREADS_PER_BLOCK, types.float32)
    cuda.syncthreads()
    use_ema = ema.shape[0] > 0
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            lr, buf_keep, buf_gain, momentum = r[SGD.lr], r[SGD.buf_keep], r[SGD.buf_gain], \
                r[SGD.momentum]
            nesterov, use_buf = r[SGD.nesterov] != 0, r[SGD.use_buf] != 0
            flat = chunks[c, CHUNK.flat] - chunks[c, CHUNK.lo]
            for b0 in range(chunks[c, CHUNK.lo], chunks[c, CHUNK.hi], BLOCK):
                n, start, blk = _block_start(chunks, c, b0)
                scale = absmax[0][blk] if use_buf else gmul
                top = np.float32(0)
                for j in range(tid, n, threads):
                    i = b0 + j
                    b = table[codes[0][start + j]] * scale if use_buf else gmul
                    pi, b = _sgd(p[i], g[i], b, gmul, wd, lr, buf_keep, buf_gain, momentum,
                                 nesterov, use_buf)
                    p[i] = pi
                    if use_ema:
                        ema[flat + i] = _ema(ema[flat + i], pi, ema_keep, ema_gain)
                    new[j] = b
                    top = _larger(top, b)
                if use_buf:
                    _close_block(new, n, top, tops, codes[0], absmax[0], blk, start, True)
                cuda.syncthreads()


@kernel(_signatures_8bit(1))
def momentum_update_8bit_cuda(params, grads, chunks, coef, active, codes, absmax, ema):
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    table = cuda.shared.array(N_CODES, types.float32)
    _copy_table(table, cuda.const.array_like(SIGNED_CODES))
    new = cuda.shared.array(BLOCK, types.float32)
    tops = cuda.shared.array(THREADS_PER_BLOCK, types.float32)
    cuda.syncthreads()
    use_ema = ema.shape[0] > 0
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            lr, beta = r[MOMENTUM.lr], r[MOMENTUM.beta]
            one_minus_beta = r[MOMENTUM.one_minus_beta]
            flat = chunks[c, CHUNK.flat] - chunks[c, CHUNK.lo]
            for b0 in range(chunks[c, CHUNK.lo], chunks[c, CHUNK.hi], BLOCK):
                n, start, blk = _block_start(chunks, c, b0)
                scale = absmax[0][blk]
                top = np.float32(0)
                for j in range(tid, n, threads):
                    i = b0 + j
                    pi, v = _momentum(p[i], g[i], table[codes[0][start + j]] * scale, gmul, wd,
                                      lr, beta, one_minus_beta)
                    p[i] = pi
                    if use_ema:
                        ema[flat + i] = _ema(ema[flat + i], pi, ema_keep, ema_gain)
                    new[j] = v
                    top = _larger(top, v)
                _close_block(new, n, top, tops, codes[0], absmax[0], blk, start, True)
                cuda.syncthreads()


@kernel(_signatures_8bit(2))
def rmsprop_update_8bit_cuda(params, grads, chunks, coef, active, codes, absmax, ema):
    """``codes`` / ``absmax``: square_avg's and momentum_buffer's (STATE_8BIT)."""
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    table = cuda.shared.array(N_CODES, types.float32)
    _copy_table(table, cuda.const.array_like(SIGNED_CODES))
    new0 = cuda.shared.array(BLOCK, types.float32)
    new1 = cuda.shared.array(BLOCK, types.float32)
    tops0 = cuda.shared.array(THREADS_PER_BLOCK, types.float32)
    tops1 = cuda.shared.array(THREADS_PER_BLOCK, types.float32)
    cuda.syncthreads()
    use_ema = ema.shape[0] > 0
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            lr, alpha, one_minus_alpha = r[RMSPROP.lr], r[RMSPROP.alpha], \
                r[RMSPROP.one_minus_alpha]
            eps, momentum = r[RMSPROP.eps], r[RMSPROP.momentum]
            use_buf = r[RMSPROP.use_buf] != 0  # centered: refused with 8-bit state
            flat = chunks[c, CHUNK.flat] - chunks[c, CHUNK.lo]
            for b0 in range(chunks[c, CHUNK.lo], chunks[c, CHUNK.hi], BLOCK):
                n, start, blk = _block_start(chunks, c, b0)
                scale0 = absmax[0][blk]
                scale1 = absmax[1][blk] if use_buf else gmul
                top0 = top1 = np.float32(0)
                for j in range(tid, n, threads):
                    i = b0 + j
                    b = table[codes[1][start + j]] * scale1 if use_buf else gmul
                    pi, sq, _, b = _rmsprop(p[i], g[i], table[codes[0][start + j]] * scale0,
                                            gmul, b, gmul, wd, lr, alpha, one_minus_alpha, eps,
                                            momentum, False, use_buf)
                    p[i] = pi
                    if use_ema:
                        ema[flat + i] = _ema(ema[flat + i], pi, ema_keep, ema_gain)
                    new0[j], new1[j] = sq, b
                    top0, top1 = _larger(top0, sq), _larger(top1, b)
                _close_block(new0, n, top0, tops0, codes[0], absmax[0], blk, start, True)
                if use_buf:
                    _close_block(new1, n, top1, tops1, codes[1], absmax[1], blk, start, True)
                cuda.syncthreads()


@kernel(_signatures_8bit(2))
def adam_update_8bit_cuda(params, grads, chunks, coef, active, codes, absmax, ema):
    """``codes`` / ``absmax``: exp_avg's (signed map) and exp_avg_sq's (unsigned)."""
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    signed = cuda.shared.array(N_CODES, types.float32)
    unsigned = cuda.shared.array(N_CODES, types.float32)
    _copy_table(signed, cuda.const.array_like(SIGNED_CODES))
    _copy_table(unsigned, cuda.const.array_like(UNSIGNED_CODES))
    new0 = cuda.shared.array(BLOCK, types.float32)
    new1 = cuda.shared.array(BLOCK, types.float32)
    tops0 = cuda.shared.array(THREADS_PER_BLOCK, types.float32)
    tops1 = cuda.shared.array(THREADS_PER_BLOCK, types.float32)
    cuda.syncthreads()
    use_ema = ema.shape[0] > 0
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        if active[chunks[c, CHUNK.model]]:
            p, g, r = _operands(params, grads, chunks, coef, c)
            gmul, wd, ema_keep, ema_gain = _shared(r)
            decay, beta1, one_minus_beta1 = r[ADAM.decay], r[ADAM.beta1], r[ADAM.one_minus_beta1]
            beta2, one_minus_beta2 = r[ADAM.beta2], r[ADAM.one_minus_beta2]
            step_size, bias_correction2_sqrt = r[ADAM.step_size], r[ADAM.bias_correction2_sqrt]
            eps = r[ADAM.eps]  # amsgrad: refused with 8-bit state
            flat = chunks[c, CHUNK.flat] - chunks[c, CHUNK.lo]
            for b0 in range(chunks[c, CHUNK.lo], chunks[c, CHUNK.hi], BLOCK):
                n, start, blk = _block_start(chunks, c, b0)
                scale0, scale1 = absmax[0][blk], absmax[1][blk]
                top0 = top1 = np.float32(0)
                for j in range(tid, n, threads):
                    i = b0 + j
                    pi, m, v, _ = _adam(p[i], g[i], signed[codes[0][start + j]] * scale0,
                                        unsigned[codes[1][start + j]] * scale1, gmul, gmul, wd,
                                        decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                                        step_size, bias_correction2_sqrt, eps, False)
                    p[i] = pi
                    if use_ema:
                        ema[flat + i] = _ema(ema[flat + i], pi, ema_keep, ema_gain)
                    new0[j], new1[j] = m, v
                    top0, top1 = _larger(top0, m), _larger(top1, v)
                _close_block(new0, n, top0, tops0, codes[0], absmax[0], blk, start, True)
                _close_block(new1, n, top1, tops1, codes[1], absmax[1], blk, start, False)
                cuda.syncthreads()


UPDATES_8BIT = {"sgd": sgd_update_8bit_cuda, "momentum": momentum_update_8bit_cuda,
                "rmsprop": rmsprop_update_8bit_cuda, "adam": adam_update_8bit_cuda,
                "adamw": adam_update_8bit_cuda}


def _stats_signatures():
    signatures = []
    for dtype in DTYPES:
        for n_tensors in (1, MAX_TENSORS_PER_LAUNCH):
            signatures.append((types.UniTuple(array(dtype), n_tensors), array(np.int64, 2),
                               array(dtype), array(dtype), array(np.int32)))
    return signatures


@kernel(_stats_signatures())
def grad_stats_cuda(grads, chunks, inv_scale, chunk_sumsq, chunk_nonfinite):
    """Per chunk (one block): sum of (g * inv_scale[model])**2 and whether any is inf/NaN,
    reduced in shared memory."""
    tid = cuda.threadIdx.x
    sums = cuda.shared.array(THREADS_PER_BLOCK, chunk_sumsq.dtype)
    flags = cuda.shared.array(THREADS_PER_BLOCK, types.int32)
    for c in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        g = grads[chunks[c, CHUNK.ptr]]
        scale = inv_scale[chunks[c, CHUNK.model]]
        total = scale - scale  # zero in the dtype (a literal 0.0 would be float64)
        bad = 0
        for i in range(chunks[c, CHUNK.lo] + tid, chunks[c, CHUNK.hi], cuda.blockDim.x):
            x = g[i] * scale
            total += x * x
            if not math.isfinite(x):
                bad = 1
        sums[tid] = total
        flags[tid] = bad
        cuda.syncthreads()
        width = THREADS_PER_BLOCK // 2
        while width > 0:
            if tid < width:
                sums[tid] += sums[tid + width]
                flags[tid] |= flags[tid + width]
            cuda.syncthreads()
            width //= 2
        if tid == 0:
            chunk_sumsq[c] = sums[0]
            chunk_nonfinite[c] = flags[0]
        cuda.syncthreads()  # sums / flags are reused by this block's next chunk


@kernel([(array(dtype), array(dtype)) for dtype in DTYPES + (np.uint8, np.uint16)])
def fill_cuda(out, value):
    """``out[:] = value[0]`` (grid-stride): zeroed state without a host-to-device copy (float
    state, bfloat16 bits, 8-bit codes)."""
    v = value[0]
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = v
