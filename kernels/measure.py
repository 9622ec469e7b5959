"""Kernels that measure the machine rather than train: the yardstick for benchmark figures."""

from numba import njit, prange

from .config import CACHE, register


@njit(parallel=True, cache=CACHE, error_model="numpy")
def triad(a, b, c, scalar):
    """STREAM triad ``a = b + scalar * c``: 12 bytes per float32 element, all cores."""
    for i in prange(a.shape[0]):
        a[i] = b[i] + scalar * c[i]


register("measure.triad", triad)
