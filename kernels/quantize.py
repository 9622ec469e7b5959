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
from .floats import bfloat16_decode, bfloat16_encode

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

    Positive side: index ``zero + k``, k = 0 for the code 0, decade e's codes at k = first_e ..
    first_e + n_e - 1 (first_e = n_e signed, n_e - 1 unsigned), the top k for 1. A negative s
    of the signed map takes the mirrored index ``zero - k`` (its side has no -1: k stops at
    the code below 1)."""
    codes = dynamic_map(signed)
    zero = int(np.searchsorted(codes, 0.0))
    positive = codes[zero:].astype(np.float64)
    sizes = decade_sizes(signed)
    firsts = [n if signed else n - 1 for n in sizes]  # k of each decade's first code
    # thresholds: between 0 and decade 0, between decades, between decade 6 and the code 1
    t = [np.float32((positive[firsts[e] - 1] + positive[firsts[e]]) / 2) for e in range(DECADES)]
    t.append(np.float32((positive[-2] + positive[-1]) / 2))
    t0, t1, t2, t3, t4, t5, t6, t7 = t
    # 10**(6 - e), exact in float32
    u0, u1, u2, u3, u4, u5, u6 = (np.float32(10.0 ** (6 - e)) for e in range(DECADES))
    tenth, per_tenth = np.float32(0.1), np.float32(1 / 0.9)
    extra = 0 if signed else 1  # unsigned: n_e = 2**(e+1), first_e = n_e - 1
    top = len(positive) - 1  # k of the code 1
    below_one = top - 1 if signed else top  # a negative s's largest k (the signed map has no -1)

    def nearest(s):
        negative = signed and s < 0
        a = -s if negative else s
        e = (np.int32(a >= t1) + np.int32(a >= t2) + np.int32(a >= t3) + np.int32(a >= t4)
             + np.int32(a >= t5) + np.int32(a >= t6))
        unit = u0
        unit = u1 if a >= t1 else unit
        unit = u2 if a >= t2 else unit
        unit = u3 if a >= t3 else unit
        unit = u4 if a >= t4 else unit
        unit = u5 if a >= t5 else unit
        unit = u6 if a >= t6 else unit
        n = np.int32(1) << (e + extra)
        x = (a * unit - tenth) * (np.float32(n) * per_tenth)
        j = np.int32(x)  # truncation: floor for x >= 0, and x < 0 is clamped to 0 below
        j = j if j > 0 else np.int32(0)
        j = j if j < n - 1 else n - 1
        k = n - extra + j
        k = np.int32(0) if a < t0 else k
        k = np.int32(top) if a >= t7 else k
        if negative:
            k = k if k < below_one else np.int32(below_one)
            return np.int32(zero) - k
        return np.int32(zero) + k

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
def encode_block(values, n, codes, start, signed):
    """Round ``values[:n]`` (float32) to ``codes[start:start + n]`` on their absmax (each
    value times 1 / absmax, in float32, as the NumPy reference does; a block of zeros gets
    absmax 0 and the code of 0); return the absmax."""
    top = np.float32(0)
    for i in range(n):
        a = abs(values[i])
        top = a if a > top else top
    inverse = np.float32(1) / top if top > 0 else np.float32(0)
    for i in range(n):
        s = values[i] * inverse
        codes[start + i] = nearest_signed(s) if signed else nearest_unsigned(s)
    return top


def _quantize_rows(values, codes, absmax, signed):
    """Host conversion (loading float state into 8-bit state): each row of ``values``
    (rows, blocks * BLOCK) float32 quantized block by block into ``codes`` (same shape, uint8)
    and ``absmax`` (rows, blocks) float32."""
    for r in range(values.shape[0]):
        for b in range(absmax.shape[1]):
            absmax[r, b] = encode_block(values[r, b * BLOCK:(b + 1) * BLOCK], BLOCK, codes[r],
                                        b * BLOCK, signed)


quantize_rows = cpu_kernel(_quantize_rows, name="quantize.quantize_rows")
