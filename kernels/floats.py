"""Float tests that fast-math cannot delete."""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


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
