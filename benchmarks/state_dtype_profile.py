"""Where an 8-bit Adam step's time goes: the per-element cost of each stage of
``kernels.optim``'s 8-bit driver, on one core, with the data in cache (so compute, not memory).

The driver runs, per block of 256: decode both moments (``quantize.decode_block``), the float
Adam chunk function over the block, then ``quantize.encode_block`` for each moment (its block
maximum, then the nearest code of every value). This script times the same functions stage by
stage over a 32768-element tensor (L2-resident), adding one stage at a time, and prints each
stage's cost in ns per element, then the compute model of a 1e8-element step on the machine's
cores against fastdl's float32 step measured in the same run::

    python benchmarks/state_dtype_profile.py
"""

import os
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # one core: the per-core cost

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from fastdl.kernels import quantize  # noqa: E402
from fastdl.kernels.config import CPU_OPTIONS  # noqa: E402
from fastdl.kernels.optim import ADAM, _adam_chunk  # noqa: E402

BLOCK = quantize.BLOCK
STAGES = ("decode both moments", "Adam update", "block maxima", "nearest codes")


@njit(**CPU_OPTIONS)
def _stages(p, g, codes_m, codes_v, absmax_m, absmax_v, row, ema, last_stage, repeats):
    """Stages 1..last_stage of the 8-bit driver over every block, ``repeats`` times."""
    m = np.empty(BLOCK, np.float32)
    v = np.empty(BLOCK, np.float32)
    for _ in range(repeats):
        for b0 in range(0, p.shape[0], BLOCK):
            blk, b1 = b0 // BLOCK, b0 + BLOCK
            if last_stage >= 1:
                quantize.decode_block(codes_m[b0:b1], quantize.SIGNED_CODES, absmax_m[blk], m)
                quantize.decode_block(codes_v[b0:b1], quantize.UNSIGNED_CODES, absmax_v[blk], v)
            if last_stage >= 2:
                _adam_chunk(p[b0:b1], g[b0:b1], m, v, v, ema, row, False, False)
            if last_stage == 3:
                absmax_m[blk], absmax_v[blk] = quantize.absmax(m), quantize.absmax(v)
            if last_stage >= 4:
                absmax_m[blk] = quantize.encode_block(m, codes_m[b0:b1], quantize.nearest_signed)
                absmax_v[blk] = quantize.encode_block(v, codes_v[b0:b1],
                                                      quantize.nearest_unsigned)


def stage_costs(n=32768, repeats=100, rounds=5):
    """ns per element of each stage (cumulative differences, best of ``rounds``)."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    codes_m = rng.integers(0, 256, n).astype(np.uint8)
    codes_v = rng.integers(0, 256, n).astype(np.uint8)
    absmax_m = np.full(n // BLOCK, 1e-3, np.float32)
    absmax_v = np.full(n // BLOCK, 1e-6, np.float32)
    row = np.zeros(len(ADAM), np.float32)  # an Adam coefficient row (kernels/optim.py)
    row[ADAM.grad], row[ADAM.decay] = 1, 1
    row[ADAM.beta1], row[ADAM.one_minus_beta1] = 0.9, 0.1
    row[ADAM.beta2], row[ADAM.one_minus_beta2] = 0.999, 0.001
    row[ADAM.step_size], row[ADAM.bias_correction2_sqrt], row[ADAM.eps] = 1e-3, 0.03, 1e-8
    ema = np.zeros(0, np.float32)
    cumulative = []
    for last in range(len(STAGES) + 1):
        _stages(p, g, codes_m, codes_v, absmax_m, absmax_v, row, ema, last, 1)
        best = np.inf
        for _ in range(rounds):
            start = time.perf_counter()
            _stages(p, g, codes_m, codes_v, absmax_m, absmax_v, row, ema, last, repeats)
            best = min(best, time.perf_counter() - start)
        cumulative.append(best / (repeats * n) * 1e9)
    return [cumulative[i + 1] - cumulative[i] for i in range(len(STAGES))]


def float32_step_ms(n=10**8, repeats=5):
    """fastdl's float32 Adam step on ``n`` elements, on every core (a fresh process would be
    needed for the thread count: this one runs on NUMBA_NUM_THREADS=1, so it is timed in a
    subprocess)."""
    import subprocess
    import sys

    code = (f"import numpy as np, time, fastdl as fd\n"
            f"p = np.zeros({n}, np.float32); g = np.full({n}, 1e-3, np.float32)\n"
            f"opt = fd.optim.Adam([p]); opt.step([g]); best = 1e9\n"
            f"for _ in range({repeats}):\n"
            f"    t = time.perf_counter(); opt.step([g])\n"
            f"    best = min(best, time.perf_counter() - t)\n"
            f"print(best * 1e3)")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    return float(out.stdout)


def main():
    costs = stage_costs()
    total = sum(costs)
    cores = len(os.sched_getaffinity(0))
    print("8-bit Adam, per element on one core, data in cache (ns):")
    for name, cost in zip(STAGES, costs):
        print(f"  {name:22s} {cost:6.3f}")
    print(f"  {'total':22s} {total:6.3f}")
    f32 = float32_step_ms()
    model = total * 1e8 / cores / 1e6
    print(f"model of a 1e8-element int8 step on {cores} cores: {model:.0f} ms; fastdl float32 "
          f"step measured now: {f32:.1f} ms ({28e8 / f32 / 1e6:.1f} GB/s); 1.4x float32 needs "
          f"{f32 / 1.4:.0f} ms = {f32 / 1.4 * 1e6 * cores / 1e8:.2f} ns per element per core")


if __name__ == "__main__":
    main()
