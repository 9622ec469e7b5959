"""Low-precision optimizer state (SPEC.md, "Low-precision optimizer state"): bfloat16 storage, and
8-bit blockwise dynamic quantization as bitsandbytes' 8-bit blockwise optimizers store it.

**bfloat16**: a uint16 array of the upper halves of float32 values (``floats.bfloat16_encode``,
round to nearest even). :func:`load` / :func:`store` read and write a state element of any
storage dtype as a value of the parameters' dtype, so one compiled update serves float32,
float64 and bfloat16 state.

**int8**: a state tensor is cut into blocks of BLOCK consecutive values (restarting at each
tensor and each model of a population); a block keeps one float32 ``absmax`` and one uint8 code
per value: ``value = codes[code] * absmax``. The code tables are bitsandbytes'
``create_dynamic_map`` (:func:`dynamic_map`): per decade e = 0 .. 6, ``n_e`` codes at the
midpoints of ``n_e + 1`` points evenly spaced in [0.1, 1], times 10**(e - 6) (n_e = 2**e
signed, 2**(e+1) unsigned; the signed map has their negatives too), then 0 and 1.

Rounding to the nearest code (:func:`nearest_code_function`) is arithmetic, not a search: the
decade of |s| from 7 compares against the thresholds between decades (each threshold the
midpoint of the codes on either side), then, inside decade e, the code ``floor((|s| * 10**(6-e)
- 0.1) * n_e / 0.9)``, whose boundaries are the midpoints between neighbouring codes. Compares,
selects and float arithmetic: no table, no branch, so the loop around it vectorizes (16 lanes
with AVX-512). The nearest code is the brute-force argmin's (tests/reference.py) except for
values within a few float32 ulps of a midpoint between two codes, which may round to either
neighbour (a near-tie: about 5 values in 10 million random ones; bitsandbytes' own CPU kernel
rounds about 1 in 1000 values to the other neighbour).
"""

import numpy as np
from numba import njit, types
from numba.extending import overload

from .config import CPU_OPTIONS, cpu_kernel
from .floats import bfloat16_decode, bfloat16_encode, from_ordered_bits, ordered_bits

BLOCK = 256  # values per block, each block with its own absmax
DECADES = 7


def _linspace32(start, end, n):
    """``torch.linspace(start, end, n, dtype=torch.float32)`` on the CPU, bit for bit: the step
    in float32, each point start + i * step (first half) or end - (n - 1 - i) * step (second
    half) rounded once, as its fused multiply-add."""
    start, end = np.float32(start), np.float32(end)
    step = (end - start) / np.float32(n - 1)
    i = np.arange(n)
    low = (np.float64(start) + np.float64(step) * i).astype(np.float32)
    high = (np.float64(end) - np.float64(step) * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, low, high)


def decade_sizes(signed):
    """Codes per decade e = 0 .. 6 on the positive side."""
    return [2 ** e if signed else 2 ** (e + 1) for e in range(DECADES)]


def dynamic_map(signed):
    """bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``: 256
    float32 codes, sorted, equal to its table bit for bit (tested)."""
    codes = []
    for e, n in enumerate(decade_sizes(signed)):
        bounds = _linspace32(0.1, 1, n + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (e - 6))  # torch multiplies float32 by a float32 scalar
        codes += list(scale * means)
        if signed:
            codes += list(-scale * means)
    codes += [np.float32(0), np.float32(1)]
    return np.sort(np.array(codes, np.float32))


SIGNED_CODES, UNSIGNED_CODES = dynamic_map(True), dynamic_map(False)


def nearest_code_function(signed):
    """``nearest(s) -> int32``: the index in ``dynamic_map(signed)`` of the code nearest the
    float32 ``s`` (in [-1, 1] signed, [0, 1] unsigned): plain scalar Python over closure
    constants, compiled for the CPU (``njit``) and as a CUDA device function alike.

    On the positive side, k = 0 is the code 0, decade e's n_e codes are k = first_e ..
    first_e + n_e - 1 (first_e = n_e signed, n_e - 1 unsigned) and the top k is the code 1;
    the index is ``zero + k``, or ``zero - k`` for a negative s of the signed map (its side has
    no -1: k stops below the top). Every step is float32 arithmetic, compares and selects (no
    integer widening: numba would make int32 arithmetic int64, half the SIMD lanes), one
    conversion at the end."""
    codes = dynamic_map(signed)
    zero = int(np.searchsorted(codes, 0.0))
    positive = codes[zero:].astype(np.float64)
    sizes = decade_sizes(signed)
    firsts = [n if signed else n - 1 for n in sizes]  # k of each decade's first code
    # thresholds: between 0 and decade 0, between decades, between decade 6 and the code 1
    t = [np.float32((positive[firsts[e] - 1] + positive[firsts[e]]) / 2) for e in range(DECADES)]
    t.append(np.float32((positive[-2] + positive[-1]) / 2))
    t0, t1, t2, t3, t4, t5, t6, t7 = t
    f32 = np.float32
    u0, u1, u2, u3, u4, u5, u6 = (f32(10.0 ** (6 - e)) for e in range(DECADES))  # exact
    n0, n1, n2, n3, n4, n5, n6 = (f32(n) for n in sizes)
    tenth, per_tenth, one = f32(0.1), f32(1 / 0.9), f32(1)
    zero_index, top = f32(zero), f32(len(positive) - 1)
    below_one = top - one if signed else top  # a negative s's largest k
    extra = f32(0) if signed else f32(1)  # n_e - first_e

    def nearest(s):
        negative = signed and s < 0
        a = -s if negative else s
        unit, n = u0, n0  # the decade's 10**(6-e) and n_e
        unit = u1 if a >= t1 else unit
        n = n1 if a >= t1 else n
        unit = u2 if a >= t2 else unit
        n = n2 if a >= t2 else n
        unit = u3 if a >= t3 else unit
        n = n3 if a >= t3 else n
        unit = u4 if a >= t4 else unit
        n = n4 if a >= t4 else n
        unit = u5 if a >= t5 else unit
        n = n5 if a >= t5 else n
        unit = u6 if a >= t6 else unit
        n = n6 if a >= t6 else n
        # the position in the decade: code j spans (0.1 + [j, j+1] * 0.9 / n) * 10**(e-6)
        # floor as truncation (to int32 and back: a vector convert on the CPU, cvt on a GPU):
        # they differ only below 0, which is clamped to 0 next
        j = f32(np.int32((a * unit - tenth) * (n * per_tenth)))
        j = j if j > 0 else f32(0)
        j = j if j < n - one else n - one
        k = n - extra + j
        k = f32(0) if a < t0 else k
        k = top if a >= t7 else k
        if negative:
            k = k if k < below_one else below_one
            return np.int32(zero_index - k)
        return np.int32(zero_index + k)

    return nearest


# -- reading and writing one state element, whatever its storage dtype -------------------------

def load(state, i, p):
    """Element ``i`` of a state array as a value of the params ``p``'s dtype: bfloat16 (uint16
    storage) decoded, float32/float64 converted."""


def store(state, i, x):
    """``state[i] = x``, rounded to bfloat16 for uint16 storage (x float32), converted
    otherwise."""


@overload(load, inline="always")
def _load_overload(state, i, p):
    if state.dtype == types.uint16:
        return lambda state, i, p: bfloat16_decode(state[i])
    return lambda state, i, p: p.dtype.type(state[i])


@overload(store, inline="always")
def _store_overload(state, i, x):
    if state.dtype == types.uint16:
        def impl(state, i, x):
            state[i] = bfloat16_encode(x)
        return impl

    def impl(state, i, x):
        state[i] = x
    return impl


# -- 8-bit blocks on the CPU ---------------------------------------------------------------------

nearest_signed = njit(inline="always", **CPU_OPTIONS)(nearest_code_function(True))
nearest_unsigned = njit(inline="always", **CPU_OPTIONS)(nearest_code_function(False))


@njit(inline="always", **CPU_OPTIONS)
def absmax(values):
    """max |values| of a float32 array, as an integer max of the bits (a float max reduction
    does not vectorize without fast-math's ``nnan``); a NaN wins (its bits are the largest)."""
    top = ordered_bits(np.float32(0))
    for i in range(values.shape[0]):
        b = ordered_bits(abs(values[i]))
        top = b if b > top else top
    return from_ordered_bits(top, np.float32(0))


@njit(inline="always", **CPU_OPTIONS)
def encode_block(values, codes, nearest):
    """Round ``values`` (float32) to ``codes`` (uint8, as long) on their absmax with
    ``nearest`` (:data:`nearest_signed` or :data:`nearest_unsigned`: a compile-time choice),
    each value times 1 / absmax in float32, as the NumPy reference does (a block of zeros
    gets absmax 0 and the code of 0); return the absmax."""
    top = absmax(values)
    inverse = np.float32(1) / top if top > 0 else np.float32(0)
    for i in range(values.shape[0]):
        codes[i] = nearest(values[i] * inverse)
    return top


@njit(inline="always", **CPU_OPTIONS)
def decode_block(codes, table, scale, out):
    """out = table[codes] * scale (the block's absmax), float32."""
    for i in range(codes.shape[0]):
        out[i] = table[codes[i]] * scale


def _quantize_rows(values, codes, absmax, nearest):
    """Host conversion (loading float state into 8-bit state): each row of ``values``
    (rows, blocks * BLOCK) float32 quantized block by block into ``codes`` (same shape, uint8)
    and ``absmax`` (rows, blocks) float32, with ``nearest`` (signed or unsigned)."""
    for r in range(values.shape[0]):
        for b in range(absmax.shape[1]):
            absmax[r, b] = encode_block(values[r, b * BLOCK:(b + 1) * BLOCK],
                                        codes[r, b * BLOCK:(b + 1) * BLOCK], nearest)


quantize_rows = cpu_kernel(_quantize_rows, name="quantize.quantize_rows")
