"""Float tests that fast-math cannot delete."""

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .config import FASTMATH


@intrinsic
def is_finite(typingctx, x):
    """True when x is neither inf nor NaN, tested on its exponent bits.

    A float test (``x - x == 0``, ``x == x``) may be folded away by LLVM under fast-math, even
    without the ``nnan`` flag once the test is reassociated into a sum; an integer test cannot,
    and it vectorizes.
    """
    if not isinstance(x, types.Float):
        return None
    width = x.bitwidth
    mantissa_bits = {32: 23, 64: 52}[width]
    exponent_mask = ((1 << (width - 1 - mantissa_bits)) - 1) << mantissa_bits

    def codegen(context, builder, signature, args):
        int_type = ir.IntType(width)
        bits = builder.bitcast(args[0], int_type)
        mask = ir.Constant(int_type, exponent_mask)
        return builder.icmp_unsigned("!=", builder.and_(bits, mask), mask)

    return types.boolean(x), codegen


@intrinsic
def scale_by_pow2(typingctx, x, n):
    """``x * 2**n`` for a float ``n`` holding an integer in the dtype's normal exponent range
    (-126..127 for float32, -1022..1023 for float64): 2**n is built from its exponent bits,
    which vectorizes where ``ldexp`` is a libm call."""
    if not (isinstance(x, types.Float) and x == n):
        return None
    width = x.bitwidth
    mantissa_bits = {32: 23, 64: 52}[width]
    bias = {32: 127, 64: 1023}[width]

    def codegen(context, builder, signature, args):
        int_type = ir.IntType(width)
        exponent = builder.add(builder.fptosi(args[1], int_type), ir.Constant(int_type, bias))
        bits = builder.shl(exponent, ir.Constant(int_type, mantissa_bits))
        return builder.fmul(args[0], builder.bitcast(bits, args[0].type))

    return x(x, n), codegen


@intrinsic
def fused_multiply_add(typingctx, a, b, c):
    """``a * b + c`` rounded once (llvm.fma), for floats of one dtype: an explicit FMA leaves
    LLVM no choice of whether to fuse, so the result does not depend on how a kernel was
    compiled (a multiply and an add may be fused or not under ``contract``)."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


def exp_fast(x):
    """``e**x`` for ``x <= 0`` as plain arithmetic, so that loops over it vectorize (numba's
    ``math.exp`` is a scalar libm call here). Below the smallest normal result it returns 0
    (also for -inf); NaN gives NaN. Relative error 1.2e-7 in float32 (Cephes' ``expf``
    polynomial) and 3e-14 in float64 (Taylor to degree 12; fast-math's reassociation of the
    two-part range reduction costs the last digits)."""
    raise NotImplementedError("exp_fast is compiled by numba only")


def _exp32(x):
    lowest = np.float32(-87.0)  # e**-87.3 is the smallest normal float32
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    # r = x - n*ln2 in two parts: n*0.693359375 is exact, the rest is a small correction
    r = (x - n * np.float32(0.693359375)) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    return np.float32(0.0) if x < lowest else scale_by_pow2(p, n)


def _exp64(x):
    lowest = -708.0  # e**-708.4 is the smallest normal float64
    n = np.floor(x * 1.4426950408889634 + 0.5)
    r = (x - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6
    p = 1.0 / 479001600.0  # 1/12!
    for k in range(11, 0, -1):
        p = p * r + _INVERSE_FACTORIALS[k]
    p = p * r + 1.0
    return 0.0 if x < lowest else scale_by_pow2(p, n)


_INVERSE_FACTORIALS = tuple(1.0 / math.factorial(k) for k in range(12))


@overload(exp_fast, jit_options={"fastmath": FASTMATH})
def _exp_fast_overload(x):
    if isinstance(x, types.Float):
        return _exp32 if x.bitwidth == 32 else _exp64
    return None



def _flip_negative(builder, bits):
    """Negative floats' bits with all but the sign bit flipped: as signed integers, the bits of
    floats then order as the floats do (-inf < ... < -0 < 0 < ... < inf)."""
    width = bits.type.width
    sign = builder.ashr(bits, ir.Constant(bits.type, width - 1))
    return builder.xor(bits, builder.lshr(sign, ir.Constant(bits.type, 1)))


@intrinsic
def ordered_bits(typingctx, x):
    """A signed integer of x's width that orders as the floats do (NaNs sort beyond +-inf).

    Integer max reductions vectorize without fast-math's ``nnan`` (a float max reduction does
    not, here): ``max`` over ``ordered_bits`` and back through :func:`from_ordered_bits`.
    """
    if not isinstance(x, types.Float):
        return None
    int_type = types.int32 if x.bitwidth == 32 else types.int64

    def codegen(context, builder, signature, args):
        return _flip_negative(builder, builder.bitcast(args[0], ir.IntType(x.bitwidth)))

    return int_type(x), codegen


@intrinsic
def from_ordered_bits(typingctx, i, like):
    """The float (of ``like``'s type) whose :func:`ordered_bits` are ``i``."""
    if not (isinstance(i, types.Integer) and isinstance(like, types.Float)
            and i.bitwidth == like.bitwidth):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(_flip_negative(builder, args[0]), context.get_value_type(like))

    return like(i, like), codegen


def ordered_bits_empty(n, like):
    """An uninitialized array of ``n`` integers of the width of float ``like``, for
    :func:`ordered_bits` values."""
    raise NotImplementedError("ordered_bits_empty is compiled by numba only")


@overload(ordered_bits_empty)
def _ordered_bits_empty_overload(n, like):
    int_dtype = np.int32 if like.bitwidth == 32 else np.int64

    def impl(n, like):
        return np.empty(n, int_dtype)

    return impl


# -- bfloat16: the upper half of a float32 ------------------------------------------------------

@intrinsic
def bfloat16_encode(typingctx, x):
    """float32 -> bfloat16 bits (uint16): the upper 16 bits, rounded to the nearest, ties to
    even (add 0x7FFF and the kept half's lowest bit, then shift); a NaN stays a NaN, its upper
    half made quiet (rounding would carry a signaling NaN's low payload into an infinity). In
    integer arithmetic: it vectorizes, and fast-math cannot touch it."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        upper = builder.lshr(bits, ir.Constant(i32, 16))
        lsb = builder.and_(upper, ir.Constant(i32, 1))
        rounded = builder.lshr(builder.add(builder.add(bits, ir.Constant(i32, 0x7FFF)), lsb),
                               ir.Constant(i32, 16))
        magnitude = builder.and_(bits, ir.Constant(i32, 0x7FFFFFFF))
        is_nan = builder.icmp_unsigned(">", magnitude, ir.Constant(i32, 0x7F800000))
        quiet = builder.or_(upper, ir.Constant(i32, 0x40))
        return builder.trunc(builder.select(is_nan, quiet, rounded), ir.IntType(16))

    return types.uint16(x), codegen


@intrinsic
def bfloat16_decode(typingctx, bits):
    """bfloat16 bits (uint16) -> float32, exactly."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(bits), codegen
