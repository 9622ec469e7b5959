"""Low-precision optimizer state: one Adam step (lr 1e-3, float32 params, gradients computed
beforehand) with ``state_dtype`` "float32", "bfloat16" and "int8", against bitsandbytes' CPU
8-bit Adam (``bnb.optim.Adam8bit``) and PyTorch's ``Adam(fused=True)`` at 1e7 elements.

    python benchmarks/state_dtype.py                 # the README table (Markdown on stdout)
    python benchmarks/state_dtype.py --cases state_1e7 --rounds 3

The variants of a case take turns round by round (each round times every variant once, in
turn, a batch of calls worth ~``--budget`` s each, the starting variant rotating), so that a
slow spell of the shared machine hits all alike; a variant's figure is the median over the
rounds of its mean time per call. Per variant the table gives the state's memory per parameter
(the bytes of the optimizer's own state buffers after a step, over the number of parameters:
float32 8, bfloat16 4, int8 ~2.03 = 2 codes + 2 float32 absmax per block of 256) and the bytes
a fused step moves per element, 12 + 2 x that state (the param read and written and the
gradient read, 12; the state read and written once), with GB/s = bytes/element * n / time.

benchmarks/test_state_dtype_bench.py times the same cases with pytest-benchmark (and runs
this script at its smoke sizes in the normal test run).
"""

import argparse
import dataclasses
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata

import numpy as np

# Before PyTorch: fastdl's kernel configuration sets GOMP_SPINCOUNT (kernels/config.py), which
# libgomp reads once, when it is loaded. PyTorch brings its own libgomp.so.1, which numba's
# OpenMP layer then uses too: imported first, it leaves fastdl's threads libgomp's default spin,
# which beside other busy processes made the 200-tensor step several times slower (2026-12-05:
# 0.25 ms against 1-16 ms). Imported here first, every variant runs with fastdl's setting, as
# in a program that imports fastdl before PyTorch.
import fastdl.kernels.config  # noqa: F401
from fastdl import optim
from fastdl.jobs import bench
from fastdl.jobs.common import machine_description

LR = 1e-3
FASTDL_VARIANTS = ("fastdl-float32", "fastdl-bfloat16", "fastdl-int8")
# the baselines and the module each needs
BASELINES = {"bnb-adam8bit": "bitsandbytes", "torch-fused": "torch"}
LABELS = {"fastdl-float32": "fastdl, state float32", "fastdl-bfloat16": "fastdl, state bfloat16",
          "fastdl-int8": "fastdl, state int8", "bnb-adam8bit": "bitsandbytes `Adam8bit`",
          "torch-fused": "PyTorch `Adam(fused=True)`"}


@dataclass
class StateCase:
    """Adam over float32 params of ``shapes`` (separate arrays), with ``variants``;
    ``smoke_shapes`` in the normal test run."""

    name: str
    shapes: list
    smoke_shapes: list
    variants: tuple = FASTDL_VARIANTS

    @property
    def size(self):
        return sum(math.prod(s) for s in self.shapes)

    def smoke(self):
        return dataclasses.replace(self, shapes=self.smoke_shapes)


CASES = {
    "state_1e7": StateCase("one tensor of 1e7", [(10_000_000,)], [(10_000,)],
                           FASTDL_VARIANTS + tuple(BASELINES)),
    "state_1e8": StateCase("one tensor of 1e8", [(100_000_000,)], [(100_000,)]),
    # the optimizer table's case (fastdl/jobs/bench.py): 200 separate arrays, 1.1e6 elements
    "state_200_tensors": StateCase("200 separate tensors of 1e3-1e4",
                                   bench.OPTIM_CASES["adam_200_tensors"].shapes,
                                   bench.OPTIM_CASES["adam_200_tensors"].shapes[:20]),
}


@dataclass
class Built:
    """A variant ready to time: ``step()`` does one optimizer step; ``state_nbytes()`` is the
    memory of the optimizer's state buffers (allocated by the first step); ``size`` the number
    of parameters."""

    step: object
    state_nbytes: object
    size: int

    def state_per_param(self):
        return self.state_nbytes() / self.size

    def bytes_per_element(self):
        """Bytes a fused step moves per element: param read + written and gradient read (12),
        the state read and written once."""
        return 12 + 2 * self.state_per_param()


def make_step(case, variant, seed=0):
    """``variant`` (one of ``case.variants``) on seeded params and gradients, g ~ 0.01 N(0, 1),
    as ``fastdl.jobs.bench.make_optim_step``."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s, np.float32) for s in case.shapes]
    grads = [rng.standard_normal(s, np.float32) * np.float32(1e-2) for s in case.shapes]
    if variant in FASTDL_VARIANTS:
        opt = optim.Adam(params, lr=LR, state_dtype=variant.removeprefix("fastdl-"))

        def state_nbytes():  # FloatStore: arrays; Int8Store: Int8Buffer (codes, absmax, small)
            return sum(a.nbytes for buffer in opt._state.values()
                       for a in (buffer.arrays() if hasattr(buffer, "arrays") else (buffer,)))

        return Built(lambda: opt.step(grads), state_nbytes, case.size)
    if variant not in BASELINES:
        raise ValueError(f"variant must be one of {FASTDL_VARIANTS + tuple(BASELINES)}; got "
                         f"{variant!r}")
    import torch

    tensors = [torch.nn.Parameter(torch.from_numpy(p)) for p in params]
    for t, g in zip(tensors, grads):
        t.grad = torch.from_numpy(g)
    if variant == "bnb-adam8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.Adam8bit(tensors, lr=LR)
    else:
        opt = torch.optim.Adam(tensors, lr=LR, fused=True)

    def state_nbytes():  # per-element state; not the step counter or bnb's 256-entry code maps
        return sum(v.nbytes for state in opt.state.values() for key, v in state.items()
                   if torch.is_tensor(v) and key != "step" and not key.startswith("qmap"))

    return Built(opt.step, state_nbytes, case.size)


def _seconds(fn, number):
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def alternate(steps, rounds=7, budget=0.2):
    """{name: [seconds per call, one per round]} of ``steps`` (name -> callable), the names
    taking turns round by round (the first of a round rotating); each round times a batch of
    calls of each worth ~``budget`` s."""
    numbers = {}
    for name, step in steps.items():
        step()  # compile, allocate the state
        step()
        numbers[name] = max(1, round(budget / max(_seconds(step, 1), 1e-7)))
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_seconds(steps[name], numbers[name]))
    return times


def _llc():
    """The last-level cache as sysfs reports it ("L3 32 MiB"), and as CPUID reports it
    (``getconf LEVEL3_CACHE_SIZE``) where that differs (in this VM: 32 MiB and 320 MiB), or
    None."""
    caches = "/sys/devices/system/cpu/cpu0/cache"
    try:
        levels = sorted(d for d in os.listdir(caches) if d.startswith("index"))
        with open(f"{caches}/{levels[-1]}/size") as f:
            size = f.read().strip()
        with open(f"{caches}/{levels[-1]}/level") as f:
            level = f.read().strip()
    except (OSError, IndexError):
        return None
    kib = int(size[:-1]) * {"K": 1, "M": 1024}.get(size[-1], 0) if size[:-1].isdigit() else 0
    text = f"L{level} {kib / 1024:g} MiB (sysfs)"
    try:
        cpuid = int(subprocess.run(["getconf", f"LEVEL{level}_CACHE_SIZE"], capture_output=True,
                                   text=True, timeout=10).stdout.strip() or 0)
    except (OSError, ValueError, subprocess.SubprocessError):
        cpuid = 0
    if cpuid and cpuid != kib * 1024:
        text += f", {cpuid / 2**20:g} MiB (CPUID, getconf)"
    return text


def _vector_flags():
    """The x86 vector extensions /proc/cpuinfo lists, of AVX2 and some of AVX-512."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "vector extensions unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512bw", "avx512_bf16") if f in flags) \
        or "no AVX2"


def _version(module):
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.2,
                        help="seconds of calls per variant per round")
    parser.add_argument("--smoke", action="store_true", help="the small smoke sizes")
    args = parser.parse_args(argv)
    missing = [v for v, module in BASELINES.items() if _version(module) is None]
    load = os.getloadavg()[0]
    versions = ", ".join(f"{m} {_version(m)}" for m in ("bitsandbytes",) if _version(m))
    command = shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]) \
        if argv is None else shlex.join(["python", "benchmarks/state_dtype.py", *argv])
    print("### Adam step with low-precision state\n")
    print(f"`{command}`, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(f"Machine: {machine_description()}" + (f", {versions}" if versions else "")
          + (f"; last-level cache {_llc()}" if _llc() else "") + f"; {_vector_flags()}.")
    # on 1e8 elements (1.2 GB): beyond any cache this machine reports
    triad_n = 10_000 if args.smoke else 100_000_000
    triad = bench.triad_bandwidth(triad_n)
    print(f"Memory bandwidth (STREAM triad on {triad_n:.0e} elements, 2 threads, now): "
          f"{triad:.1f} GB/s; load average (1 min) {load:.2f} before the run.")
    print(f"Median of {args.rounds} rounds; each round times every variant of a case in turn "
          f"(~{args.budget:g} s of calls each); spread = (slowest - fastest round) / median; "
          "\"vs X\" = X's time / this row's time.\n")
    print("| case | implementation | ms / step | spread | vs fastdl float32 | vs bnb 8-bit | "
          "state B / param | B moved / element | GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    medians = {}
    for key in args.cases:
        case = CASES[key].smoke() if args.smoke else CASES[key]
        variants = [v for v in case.variants if v not in missing]
        built = {v: make_step(case, v) for v in variants}
        times = alternate({v: b.step for v, b in built.items()}, args.rounds, args.budget)
        median = {v: statistics.median(t) for v, t in times.items()}
        medians[key] = median
        name = f"{case.name} (smoke: {case.size} elements)" if args.smoke else case.name
        for v in variants:
            b, t = built[v], median[v]
            spread = (max(times[v]) - min(times[v])) / t
            vs_bnb = f"{median['bnb-adam8bit'] / t:.1f}x" if "bnb-adam8bit" in median else "—"
            print(f"| {name} | {LABELS[v]} | {t * 1e3:.3f} | {spread:.0%} | "
                  f"{median['fastdl-float32'] / t:.2f}x | {vs_bnb} | "
                  f"{b.state_per_param():.3f} | {b.bytes_per_element():.2f} | "
                  f"{b.bytes_per_element() * b.size / t / 1e9:.1f} |")
        del built, b  # free the 1e8 arrays before the next case
    print()
    print(f"- load average (1 min) after the run: {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} CPUs)")
    if args.smoke:
        return 0
    targets = [("state_1e8", "fastdl-int8", "fastdl-float32", 1.4),
               ("state_1e8", "fastdl-bfloat16", "fastdl-float32", 1.2),
               ("state_1e7", "fastdl-int8", "bnb-adam8bit", 10.0)]
    for key, ours, theirs, goal in targets:
        if key in medians and theirs in medians[key]:
            ratio = medians[key][theirs] / medians[key][ours]
            print(f"- target {LABELS[ours]} >= {goal:g}x {LABELS[theirs]} at "
                  f"{CASES[key].name.removeprefix('one tensor of ')}: {ratio:.2f}x, "
                  f"{'met' if ratio >= goal else 'not met'}")
    for v in missing:
        print(f"- {LABELS[v]}: not run ({BASELINES[v]} is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
