"""Softmax, log-softmax and fused softmax cross-entropy on the CPU.

Logits are viewed as (rows, C, inner): the class axis has C values ``inner`` elements apart.
Two kernel layouts, each reading the logits in order:

* ``inner == 1`` (``(m, C)``, class axis last): a row's C values are contiguous. Per row, pass A
  takes the max (on :func:`ordered_bits`, so that it vectorizes) and what the loss needs of the
  logits, pass B writes ``e = exp(z - max)`` into the output and sums it, pass C turns ``e``
  into the result in place. The row stays in L1/L2 between passes, so the logits are read from
  memory once and the output written once; no probability array is ever made.
* ``inner > 1`` (the notes' ``(C, m)``, or ``(N, C, H, W)``): a tile of TILE neighbouring
  positions is processed class by class, each pass vectorized across the tile, with the
  per-position max and sums in a scratch block per worker.

``mode`` picks the result: SOFTMAX, LOG_SOFTMAX, or the gradient of the cross-entropy with
index targets (XENT_INDEX) or probability targets (XENT_PROB), plus each position's loss;
``weighted`` adds class weights ``w`` (SPEC.md; all ones without them, ``W = sum_j w_j``)::

    index:  loss = (1-eps) * w_y * (lse - z_y) + eps/C * sum_j w_j * (lse - z_j)
            grad = g * (softmax(z) * ((1-eps) * w_y + eps/C * W) - (1-eps) * w_y * onehot(y)
                        - eps/C * w)
    prob:   t = w * ((1-eps) * y + eps/C) ;  T = sum_j t_j
            loss = T * lse - sum_j t_j z_j ;  grad = g * (softmax(z) * T - t)

with ``lse = max + log(sum_j e_j)`` and ``g = grad_scale[model]`` (1 / the divisor for "mean",
1 else); ignored positions get loss 0 and gradient 0. ``smoothing`` holds (1 - eps, eps, eps / C)
in the logits' dtype, made on the host so that no float64 enters the vector loops. ``weight``
is (K_w, C): row ``model % K_w`` weighs model ``model``'s rows (K_w = 1: shared by all).
Unused inputs are passed as 1-element dummies. Losses are written in float64 for the host to
reduce.

Each (layout, mode, weighted) case is its own compiled kernel (:data:`KERNELS`, a closure
over its constants whose other branches numba prunes before typing), so that a call compiles
only the code of its case: the demo's cross-entropy (index targets, no weights) compiles no
softmax, probability-target or weight code.

Accuracy: every sum over classes is blocked (BLOCK values in the logits' dtype, vectorized, then
float64), so float32 holds SPEC.md's tolerance at C = 1e6. Reproducibility: the loops whose
result depends on the order LLVM picks under fast-math (multiply-adds, the per-position loss and
coefficients) are compiled as separate functions without ``contract`` / ``reassoc`` or with an
explicit FMA, so a parallel kernel loaded from numba's cache gives the bits of one just
compiled (numba issue 10617; tests/test_softmax_accuracy.py).
"""

import math

import numpy as np
from numba import njit, prange

from . import config
from .config import FASTMATH, FASTMATH_IN_ORDER, FASTMATH_REPRODUCIBLE, cpu_kernel, cpu_kernel_pair
from .floats import (
    exp_fast,
    from_ordered_bits,
    fused_multiply_add,
    ordered_bits,
    ordered_bits_empty,
)

SOFTMAX, LOG_SOFTMAX, XENT_INDEX, XENT_PROB = range(4)

# Positions per tile of the inner > 1 kernel: long enough that the per-class loops run mostly
# vectorized (shorter tiles measured slower), short enough that a tile of C ~ 2000 float32
# classes stays in L2 between its passes.
TILE = 128


@njit(inline="always")
def _row_max(z):
    top = ordered_bits(z[0])
    for j in range(z.shape[0]):
        top = max(top, ordered_bits(z[j]))
    return from_ordered_bits(top, z[0])


# Sums over classes: a partial sum in the logits' dtype over BLOCK values (a vectorized loop, no
# conversion per element), carried in float64 across blocks; one float32 running sum over
# C = 1e6 values is off by ~1e-4 relative (SPEC.md asks for float32 to hold at any C <= 1e6).
BLOCK = 256


@njit(inline="always")
def _row_sum(z, shift):
    """sum(z - shift) in float64: the logits enter the loss relative to their max, exact near
    it."""
    total = 0.0
    for start in range(0, z.shape[0], BLOCK):
        zb = z[start:start + BLOCK]
        part = z.dtype.type(0)
        for j in range(zb.shape[0]):
            part += zb[j] - shift
        total += np.float64(part)
    return total


# The multiply-adds of the probability targets and of the weights are compiled without
# ``contract``, in functions of their own (not numba-inlined, so that their instructions keep
# these flags): whether LLVM fused them into FMAs differed between a parallel kernel just
# compiled and the same kernel loaded from numba's cache (numba issue 10617), one ulp apart in a
# third of the gradients.
FASTMATH_NO_FMA = FASTMATH - {"contract"}


@njit(fastmath=FASTMATH_NO_FMA, error_model="numpy", cache=config.CACHE)
def _target_sums(z, t, shift):
    """(sum_j t_j * (z_j - shift), sum_j t_j) in float64."""
    dot = mass = 0.0
    for start in range(0, z.shape[0], BLOCK):
        zb, tb = z[start:start + BLOCK], t[start:start + BLOCK]
        part_dot = part_mass = z.dtype.type(0)
        for j in range(zb.shape[0]):
            part_dot += tb[j] * (zb[j] - shift)
            part_mass += tb[j]
        dot += np.float64(part_dot)
        mass += np.float64(part_mass)
    return dot, mass


@njit(fastmath=FASTMATH_NO_FMA, error_model="numpy", cache=config.CACHE)
def _weighted_target_sums(z, t, w, shift):
    """(sum_j w_j t_j * (z_j - shift), sum_j w_j t_j) in float64."""
    dot = mass = 0.0
    for start in range(0, z.shape[0], BLOCK):
        zb, tb, wb = z[start:start + BLOCK], t[start:start + BLOCK], w[start:start + BLOCK]
        part_dot = part_mass = z.dtype.type(0)
        for j in range(zb.shape[0]):
            weighted = wb[j] * tb[j]
            part_dot += weighted * (zb[j] - shift)
            part_mass += weighted
        dot += np.float64(part_dot)
        mass += np.float64(part_mass)
    return dot, mass


@njit(fastmath=FASTMATH_NO_FMA, error_model="numpy", cache=config.CACHE)
def _weighted_sums(z, w, shift):
    """(sum_j w_j * (z_j - shift), sum_j w_j) in float64: the smoothing term of weighted
    classes."""
    dot = mass = 0.0
    for start in range(0, z.shape[0], BLOCK):
        zb, wb = z[start:start + BLOCK], w[start:start + BLOCK]
        part_dot = part_mass = z.dtype.type(0)
        for j in range(zb.shape[0]):
            part_dot += wb[j] * (zb[j] - shift)
            part_mass += wb[j]
        dot += np.float64(part_dot)
        mass += np.float64(part_mass)
    return dot, mass


@njit(fastmath=FASTMATH_REPRODUCIBLE, error_model="numpy", cache=config.CACHE)
def _weight_sum(w):
    """sum_j w_j in float64, in order (the tiles kernel's W, once per row)."""
    total = 0.0
    for j in range(w.shape[0]):
        total += np.float64(w[j])
    return total


@njit(fastmath=FASTMATH_NO_FMA, error_model="numpy", cache=config.CACHE)
def _target_sums_tile(z, t, top, part_dot, part_mass):
    """part_dot += t * (z - top), part_mass += t, per position of a tile."""
    for j in range(z.shape[0]):
        part_dot[j] += t[j] * (z[j] - top[j])
        part_mass[j] += t[j]


@njit(fastmath=FASTMATH_NO_FMA, error_model="numpy", cache=config.CACHE)
def _weighted_target_sums_tile(z, t, w, top, part_dot, part_mass):
    """part_dot += w t * (z - top), part_mass += w t, per position of a tile (``w`` the class's
    weight)."""
    for j in range(z.shape[0]):
        weighted = w * t[j]
        part_dot[j] += weighted * (z[j] - top[j])
        part_mass[j] += weighted


@njit(fastmath=FASTMATH_NO_FMA, error_model="numpy", cache=config.CACHE)
def _prob_grad(e, t, a, c, b, out):
    """out = e * a - (c * t + b): the gradient from e = exp(z - max) (``out`` may be ``e``)."""
    for j in range(e.shape[0]):
        out[j] = e[j] * a - (c * t[j] + b)


@njit(fastmath=FASTMATH_NO_FMA, error_model="numpy", cache=config.CACHE)
def _weighted_prob_grad(e, t, w, a, c, b, out):
    """out = e * a - w * (c * t + b) (``out`` may be ``e``)."""
    for j in range(e.shape[0]):
        out[j] = e[j] * a - w[j] * (c * t[j] + b)


@njit(fastmath=FASTMATH_NO_FMA, error_model="numpy", cache=config.CACHE)
def _weighted_index_grad(e, w, a, b, out):
    """out = e * a - b * w (``out`` may be ``e``)."""
    for j in range(e.shape[0]):
        out[j] = e[j] * a - b * w[j]


@njit(fastmath=FASTMATH_NO_FMA, error_model="numpy", cache=config.CACHE)
def _prob_grad_tile(e, t, a, c, b, out):
    """out = e * a - (c * t + b) per position of a tile, ``a`` per position."""
    for j in range(e.shape[0]):
        out[j] = e[j] * a[j] - (c * t[j] + b)


@njit(fastmath=FASTMATH_NO_FMA, error_model="numpy", cache=config.CACHE)
def _weighted_prob_grad_tile(e, t, w, a, c, b, out):
    """out = e * a - w * (c * t + b) per position of a tile, ``a`` per position, ``w`` the
    class's weight."""
    for j in range(e.shape[0]):
        out[j] = e[j] * a[j] - w * (c * t[j] + b)


@njit(fastmath=FASTMATH_NO_FMA, error_model="numpy", cache=config.CACHE)
def _weighted_index_grad_tile(e, w, a, b, out):
    """out = e * a - b * w per position of a tile, ``a`` and ``b`` per position, ``w`` the
    class's weight."""
    for j in range(e.shape[0]):
        out[j] = e[j] * a[j] - b[j] * w


@njit(fastmath=FASTMATH_IN_ORDER, error_model="numpy", cache=config.CACHE)
def _shift_row(z, top, log_total, out):
    """out = (z - top) - log_total, in that order: exact where z is near top (z - lse is not,
    once top is large: 3e4 + log_total rounds to 0.002 in float32)."""
    for j in range(z.shape[0]):
        out[j] = (z[j] - top) - log_total


@njit(fastmath=FASTMATH_IN_ORDER, error_model="numpy", cache=config.CACHE)
def _shift_tile(z, top, log_total, out):
    """out = (z - top) - log_total per position of a tile (see _shift_row)."""
    for j in range(z.shape[0]):
        out[j] = (z[j] - top[j]) - log_total[j]


@njit(fastmath=FASTMATH_IN_ORDER, error_model="numpy", cache=config.CACHE)
def _shifted_sum_tile(z, top, part):
    """part += z - top per position of a tile, in that order: without ``reassoc`` LLVM has no
    second order (``(part + z) - top``) to pick, whichever way the kernel was compiled."""
    for j in range(z.shape[0]):
        part[j] += z[j] - top[j]


@njit(fastmath=FASTMATH_REPRODUCIBLE, error_model="numpy", cache=config.CACHE)
def _weighted_shifted_sum_tile(z, w, top, part):
    """part += w * (z - top) per position of a tile (``w`` the class's weight), in that order
    and unfused (see _shifted_sum_tile)."""
    for j in range(z.shape[0]):
        part[j] += w * (z[j] - top[j])


# The per-position scalars (loss, gradient coefficients) are computed in float64 by these
# functions, compiled without fast-math and not inlined by numba (their instructions keep these
# flags). That was not enough: the float64 loss ``mass * lse - keep * dot`` still differed
# between a parallel kernel just compiled and one loaded from numba's cache (numba issue 10617:
# one of them fused the multiply and the subtraction), so every multiply-add here is an
# explicit FMA, which no compilation can split or fuse differently.
@njit(error_model="numpy", cache=config.CACHE)
def _index_terms(g, keep, uniform, w_label, w_sum, total, label_gap, wz_sum):
    """Loss ``keep * w_y * (lse - z_y) + uniform * (W * lse - sum_j w_j z_j)`` (sums relative
    to the max: ``label_gap = max - z_y``, ``wz_sum = sum_j w_j (z_j - max)``) and the softmax
    coefficient ``g * (keep * w_y + uniform * W) / total``, float64."""
    keep_w, uniform = np.float64(keep) * np.float64(w_label), np.float64(uniform)
    log_total = math.log(total)
    smooth = uniform * fused_multiply_add(w_sum, log_total, -wz_sum)
    loss = fused_multiply_add(keep_w, log_total + label_gap, smooth)
    return loss, np.float64(g) * fused_multiply_add(uniform, w_sum, keep_w) / total


@njit(error_model="numpy", cache=config.CACHE)
def _prob_terms(g, keep, uniform, w_sum, total, target_dot_z, target_sum, wz_sum):
    """Loss ``T * lse - sum_j t_j z_j`` (``T = keep * sum_j w_j y_j + uniform * W``, sums
    relative to the max) and the softmax coefficient ``g * T / total``, float64."""
    keep, uniform = np.float64(keep), np.float64(uniform)
    mass = fused_multiply_add(keep, target_sum, uniform * w_sum)
    loss = fused_multiply_add(-uniform, wz_sum,
                              fused_multiply_add(-keep, target_dot_z, mass * math.log(total)))
    return loss, np.float64(g) * mass / total


@njit(inline="always")
def _exp_sum(zr, top):
    """sum_j exp(zr_j - top) in float64."""
    total = 0.0
    for start in range(0, zr.shape[0], BLOCK):
        zb = zr[start:start + BLOCK]
        part = zr.dtype.type(0)
        for j in range(zb.shape[0]):
            part += exp_fast(zb[j] - top)
        total += np.float64(part)
    return total


@njit(inline="always")
def _log_softmax_row(zr, outr):
    top = _row_max(zr)
    _shift_row(zr, top, zr.dtype.type(math.log(_exp_sum(zr, top))), outr)


@njit(inline="always")
def _exp_row(zr, top, outr):
    """outr = exp(zr - top); returns the sum of outr in float64."""
    total = 0.0
    for start in range(0, zr.shape[0], BLOCK):
        zb, ob = zr[start:start + BLOCK], outr[start:start + BLOCK]
        part = zr.dtype.type(0)
        for j in range(zb.shape[0]):
            e = exp_fast(zb[j] - top)
            ob[j] = e
            part += e
        total += np.float64(part)
    return total


@njit(inline="always")
def _softmax_row(zr, outr):
    total = _exp_row(zr, _row_max(zr), outr)
    inverse = zr.dtype.type(1 / total)
    for j in range(zr.shape[0]):
        outr[j] *= inverse


@njit(inline="always")
def _index_xent_row(zr, label, wr, weighted, g, keep, eps, uniform, outr):
    """Write the gradient of row ``zr`` with class ``label`` (class weights ``wr`` if
    ``weighted``, a constant) into ``outr``; return the loss."""
    top = _row_max(zr)
    # what the loss needs of z, read before outr (which may be zr) is written
    label_gap = np.float64(top - zr[label])
    w_label = wr[label] if weighted else zr.dtype.type(1)
    wz_sum = w_sum = 0.0  # the smoothing term's sums (uniform = 0 without smoothing)
    if eps != 0:
        if weighted:
            wz_sum, w_sum = _weighted_sums(zr, wr, top)
        else:
            wz_sum, w_sum = _row_sum(zr, top), np.float64(zr.shape[0])
    total = _exp_row(zr, top, outr)
    loss, a = _index_terms(g, keep, uniform, w_label, w_sum, total, label_gap, wz_sum)
    a, b = zr.dtype.type(a), g * uniform
    if weighted:
        _weighted_index_grad(outr, wr, a, b, outr)
    else:
        for j in range(zr.shape[0]):
            outr[j] = outr[j] * a - b
    outr[label] -= g * keep * w_label
    return loss


@njit(inline="always")
def _prob_xent_row(zr, tr, wr, weighted, g, keep, eps, uniform, outr):
    """Write the gradient of row ``zr`` with target probabilities ``tr`` (class weights ``wr``
    if ``weighted``, a constant) into ``outr``; return the loss."""
    top = _row_max(zr)
    if weighted:
        target_dot_z, target_sum = _weighted_target_sums(zr, tr, wr, top)
    else:
        target_dot_z, target_sum = _target_sums(zr, tr, top)
    wz_sum = w_sum = 0.0
    if eps != 0:
        if weighted:
            wz_sum, w_sum = _weighted_sums(zr, wr, top)
        else:
            wz_sum, w_sum = _row_sum(zr, top), np.float64(zr.shape[0])
    total = _exp_row(zr, top, outr)
    loss, a = _prob_terms(g, keep, uniform, w_sum, total, target_dot_z, target_sum, wz_sum)
    a, b, c = zr.dtype.type(a), g * uniform, g * keep
    if weighted:
        _weighted_prob_grad(outr, tr, wr, a, c, b, outr)
    else:
        _prob_grad(outr, tr, a, c, b, outr)
    return loss


def _rows_driver(mode, weighted):
    """The ``inner == 1`` kernel of ``mode`` and ``weighted`` (constants: numba prunes the other
    modes' branches before typing, so only this case's code is compiled)."""

    def rows_kernel(z, target, weight, grad_scale, rows_per_model, smoothing, ignore_index,
                    out, row_loss):
        """z, out: (rows, C); target: (rows,) ints or (rows, C) probabilities; weight:
        (K_w, C)."""
        keep, eps, uniform = smoothing[0], smoothing[1], smoothing[2]
        for r in prange(z.shape[0]):
            if mode == LOG_SOFTMAX:
                _log_softmax_row(z[r], out[r])
            elif mode == SOFTMAX:
                _softmax_row(z[r], out[r])
            else:
                model = r // rows_per_model
                g = grad_scale[model]
                # a row view only where it is read: one per row costs ~35 ns (its reference
                # count), as much as the rest of a 10-class row
                wr = weight[model % weight.shape[0]] if weighted else weight
                if mode == XENT_PROB:
                    row_loss[r] = _prob_xent_row(z[r], target[r], wr, weighted, g, keep, eps,
                                                 uniform, out[r])
                elif target[r] == ignore_index:
                    for j in range(z.shape[1]):
                        out[r, j] = 0
                    row_loss[r] = 0.0
                else:
                    row_loss[r] = _index_xent_row(z[r], target[r], wr, weighted, g, keep, eps,
                                                  uniform, out[r])

    return rows_kernel


def _tiles_driver(mode, weighted):
    """The ``inner > 1`` kernel of ``mode`` and ``weighted`` (constants, as _rows_driver)."""

    def tiles_kernel(z, target, weight, grad_scale, rows_per_model, smoothing, ignore_index,
                     n_workers, out, loss):
        """z, out: (rows, C, inner) with inner > 1; target: (rows, inner) ints or (rows, C,
        inner) probabilities; weight: (K_w, C); loss: (rows, inner).

        Work items are (row, tile of TILE positions); each of ``n_workers`` takes a contiguous
        share and keeps one scratch block (per-position max bits, sums, labels) for all of them.
        Sums over classes run per position in the logits' dtype over BLOCK classes
        (``part_*``), then in float64 (``total``, ``target_dot_z``, ...).
        """
        n_rows, n_classes, inner = z.shape
        n_tiles = (inner + TILE - 1) // TILE
        n_items = n_rows * n_tiles
        keep, eps, uniform = smoothing[0], smoothing[1], smoothing[2]
        one = z.dtype.type(1)
        for worker in prange(n_workers):
            top, part_a, part_b, scale, offset, w_label = np.empty((6, TILE), z.dtype)
            total, target_dot_z, target_sum, z_sum, label_gap = np.empty((5, TILE), np.float64)
            top_bits = ordered_bits_empty(TILE, z[0, 0, 0])
            labels = np.empty(TILE, np.int64)
            for item in range(worker * n_items // n_workers,
                              (worker + 1) * n_items // n_workers):
                r, tile = item // n_tiles, item % n_tiles
                lo = tile * TILE
                n = min(TILE, inner - lo)
                zr, outr = z[r], out[r]
                model = r // rows_per_model
                g = grad_scale[model]
                wr = weight[model % weight.shape[0]] if weighted else weight  # see _rows_driver
                # pass A: per-position max, and what the loss needs of z
                for j in range(n):
                    top_bits[j] = ordered_bits(zr[0, lo + j])
                    total[j] = 0
                    target_dot_z[j] = 0
                    target_sum[j] = 0
                    z_sum[j] = 0
                for c in range(n_classes):
                    zc = zr[c, lo:lo + n]
                    # an integer max: a float select here becomes a masked store (slow on AMD)
                    for j in range(n):
                        top_bits[j] = max(top_bits[j], ordered_bits(zc[j]))
                for j in range(n):
                    top[j] = from_ordered_bits(top_bits[j], zr[0, 0])
                if mode == XENT_INDEX:
                    for j in range(n):
                        labels[j] = target[r, lo + j]
                        ignored = labels[j] == ignore_index
                        label_gap[j] = 0 if ignored else top[j] - zr[labels[j], lo + j]
                        w_label[j] = wr[labels[j]] if weighted and not ignored else one
                elif mode == XENT_PROB:
                    for c0 in range(0, n_classes, BLOCK):
                        part_a[:n] = 0
                        part_b[:n] = 0
                        for c in range(c0, min(c0 + BLOCK, n_classes)):
                            if weighted:
                                _weighted_target_sums_tile(zr[c, lo:lo + n],
                                                           target[r, c, lo:lo + n], wr[c], top,
                                                           part_a, part_b)
                            else:
                                _target_sums_tile(zr[c, lo:lo + n], target[r, c, lo:lo + n],
                                                  top, part_a, part_b)
                        for j in range(n):
                            target_dot_z[j] += part_a[j]
                            target_sum[j] += part_b[j]
                w_sum = 0.0  # W of the smoothing term (uniform = 0 without smoothing)
                if mode >= XENT_INDEX and eps != 0:
                    w_sum = _weight_sum(wr) if weighted else np.float64(n_classes)
                    for c0 in range(0, n_classes, BLOCK):
                        part_a[:n] = 0
                        for c in range(c0, min(c0 + BLOCK, n_classes)):
                            if weighted:
                                _weighted_shifted_sum_tile(zr[c, lo:lo + n], wr[c], top, part_a)
                            else:
                                _shifted_sum_tile(zr[c, lo:lo + n], top, part_a)
                        for j in range(n):
                            z_sum[j] += part_a[j]
                # pass B: e = exp(z - max) (into out unless log-softmax), and its sum
                for c0 in range(0, n_classes, BLOCK):
                    part_a[:n] = 0
                    for c in range(c0, min(c0 + BLOCK, n_classes)):
                        zc, oc = zr[c, lo:lo + n], outr[c, lo:lo + n]
                        if mode == LOG_SOFTMAX:
                            for j in range(n):
                                part_a[j] += exp_fast(zc[j] - top[j])
                        else:
                            for j in range(n):
                                e = exp_fast(zc[j] - top[j])
                                oc[j] = e
                                part_a[j] += e
                    for j in range(n):
                        total[j] += part_a[j]
                # pass C
                if mode == LOG_SOFTMAX:
                    for j in range(n):
                        scale[j] = math.log(total[j])
                    for c in range(n_classes):
                        _shift_tile(zr[c, lo:lo + n], top, scale, outr[c, lo:lo + n])
                elif mode == SOFTMAX:
                    for j in range(n):
                        scale[j] = 1 / total[j]
                    for c in range(n_classes):
                        oc = outr[c, lo:lo + n]
                        for j in range(n):
                            oc[j] *= scale[j]
                elif mode == XENT_INDEX:
                    for j in range(n):
                        if labels[j] == ignore_index:
                            loss[r, lo + j] = 0.0
                            scale[j] = offset[j] = 0
                        else:
                            loss[r, lo + j], a = _index_terms(g, keep, uniform, w_label[j],
                                                              w_sum, total[j], label_gap[j],
                                                              z_sum[j])
                            scale[j] = a
                            offset[j] = g * uniform
                    for c in range(n_classes):
                        oc = outr[c, lo:lo + n]
                        if weighted:
                            _weighted_index_grad_tile(oc, wr[c], scale, offset, oc)
                        else:
                            for j in range(n):
                                oc[j] = oc[j] * scale[j] - offset[j]
                    for j in range(n):
                        if labels[j] != ignore_index:
                            outr[labels[j], lo + j] -= g * keep * w_label[j]
                else:
                    for j in range(n):
                        loss[r, lo + j], a = _prob_terms(g, keep, uniform, w_sum, total[j],
                                                         target_dot_z[j], target_sum[j],
                                                         z_sum[j])
                        scale[j] = a
                    keep_g, offset_g = g * keep, g * uniform
                    for c in range(n_classes):
                        oc = outr[c, lo:lo + n]
                        if weighted:
                            _weighted_prob_grad_tile(oc, target[r, c, lo:lo + n], wr[c], scale,
                                                     keep_g, offset_g, oc)
                        else:
                            _prob_grad_tile(oc, target[r, c, lo:lo + n], scale, keep_g,
                                            offset_g, oc)

    return tiles_kernel


# (mode, weighted) -> the name of its kernels: ``softmax.rows_kernel`` / ``softmax.tiles_kernel``
# for cross-entropy with index targets and no weights (a training loop's case: the demo's
# compile notice names it), the others with a suffix.
CASES = {(XENT_INDEX, False): "", (XENT_INDEX, True): "_weighted", (XENT_PROB, False): "_prob",
         (XENT_PROB, True): "_prob_weighted", (SOFTMAX, False): "_softmax",
         (LOG_SOFTMAX, False): "_log_softmax"}

# (layout, mode, weighted) -> (serial, parallel) kernels; layout "rows" (inner == 1) or "tiles".
# Compiled on first call (and cached on disk: each is a closure over its constants, which
# numba's cache keys on).
KERNELS = {(layout, mode, weighted): cpu_kernel_pair(driver(mode, weighted),
                                                     f"softmax.{layout}_kernel{suffix}")
           for layout, driver in (("rows", _rows_driver), ("tiles", _tiles_driver))
           for (mode, weighted), suffix in CASES.items()}


@cpu_kernel
def label_counts(labels, n_classes, ignore_index, counts):
    """Per model (row of ``labels``, shape (K, m)): counts[k] = labels not ignored. Returns the
    first label out of [0, n_classes) that is not ``ignore_index``, or ``ignore_index``."""
    for k in range(labels.shape[0]):
        row = labels[k]
        n = 0
        bad = 0
        for i in range(row.shape[0]):
            label = row[i]
            ignored = label == ignore_index
            n += not ignored
            bad += (not ignored) and (label < 0 or label >= n_classes)
        counts[k] = n
        if bad:
            for i in range(row.shape[0]):
                if row[i] != ignore_index and (row[i] < 0 or row[i] >= n_classes):
                    return row[i]
    return ignore_index


@cpu_kernel
def label_weights(labels, weight, ignore_index, sums):
    """Per model (row of ``labels``, shape (K, m), every label in range or ignored):
    sums[k] = sum of weight[k % K_w, label] over its labels not ignored, in float64 (the
    divisor of a weighted "mean")."""
    for k in range(labels.shape[0]):
        row, w = labels[k], weight[k % weight.shape[0]]
        total = 0.0
        for i in range(row.shape[0]):
            if row[i] != ignore_index:
                total += np.float64(w[row[i]])
        sums[k] = total
