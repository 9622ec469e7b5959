"""Addressing memory by pointer, so that one CPU kernel call can update many separate arrays.

Passing hundreds of arrays into a numba kernel is slow either way numba offers: a typed List
costs ~270 µs to build per call, and a tuple longer than 100 cannot enter a ``prange`` region
(and compiles for seconds). Instead the host passes an int64 table of addresses, and the kernel
views a range of each array with :func:`view`. The caller keeps the arrays alive.
"""

from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import CACHE, register


@intrinsic
def _void_pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


def address(a):
    """The address of ``a``'s first element (as an int)."""
    return a.ctypes.data


address = register("pointers.address", njit(cache=CACHE)(address))


@njit(inline="always")
def view(address, start, stop, like):
    """A 1-D array of ``like``'s dtype over elements [start, stop) of the memory at ``address``."""
    return carray(_void_pointer(address + start * like.itemsize), stop - start, like.dtype)
