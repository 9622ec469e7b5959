"""``python -m fastdl bench``: time fastdl's fused optimizers against the NumPy textbook version
and PyTorch's ``fused=True`` optimizers (when PyTorch is installed), float32, default options
on both sides.

The optimizer cases here are also those of ``benchmarks/test_optim_bench.py``. Each case builds
a ``step()`` callable per implementation: ``fastdl``, ``numpy`` (:class:`TextbookAdam`: one
array expression per formula line) and ``torch``.
"""

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .. import optim
from .common import machine_description, torch_version
from .textbook import TextbookAdam

IMPLEMENTATIONS = ("fastdl", "numpy", "torch")


@dataclass
class OptimCase:
    """One optimizer workload: params of ``shapes`` (float32) stepped by ``optimizer`` with
    ``options``. ``bytes_per_element`` counts the memory traffic of a fused step;
    ``smoke_shapes`` (default: ``shapes``) are the small shapes of the benchmarks' untimed
    smoke run."""

    name: str
    shapes: list
    optimizer: str = "Adam"
    options: dict = field(default_factory=dict)
    bytes_per_element: int = 28  # Adam: p, m, v read and written, g read (float32)
    smoke_shapes: list = None

    @property
    def size(self):
        return sum(math.prod(s) for s in self.shapes)

    def smoke(self):
        """This case at its smoke shapes (same name)."""
        return dataclasses.replace(self, shapes=self.smoke_shapes or self.shapes)


def _separate_shapes(n, low, high, seed=0):
    return [(int(s),) for s in np.random.default_rng(seed).integers(low, high + 1, n)]


OPTIM_CASES = {
    "adam_1e7": OptimCase("Adam, one tensor of 1e7", [(10_000_000,)],
                          smoke_shapes=[(10_000,)]),
    "adam_200_tensors": OptimCase("Adam, 200 tensors of 1e3-1e4",
                                  _separate_shapes(200, 1000, 10_000),
                                  smoke_shapes=_separate_shapes(200, 10, 100)),
    "adam_1000": OptimCase("Adam, one tensor of 1000 (call overhead)", [(1000,)]),
    "adamw_clip_1e7": OptimCase("AdamW + max_grad_norm, 1e7 in 3 tensors",
                                [(4_000_000,), (3_000_000,), (3_000_000,)], "AdamW",
                                dict(max_grad_norm=1.0), bytes_per_element=32,
                                smoke_shapes=[(4000,), (3000,), (3000,)]),
}


def make_optim_step(case, implementation, seed=0):
    """A zero-argument callable doing one optimizer step of ``case`` with ``implementation``
    (one of :data:`IMPLEMENTATIONS`), on seeded params and gradients (g ~ 0.01 N(0, 1))."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s, np.float32) for s in case.shapes]
    grads = [rng.standard_normal(s, np.float32) * np.float32(1e-2) for s in case.shapes]
    if implementation == "fastdl":
        opt = getattr(optim, case.optimizer)(params, **case.options)
        return lambda: opt.step(grads)
    if implementation == "numpy":
        decoupled = case.optimizer == "AdamW"
        opt = TextbookAdam(params, weight_decay=0.01 if decoupled else 0.0,
                           decoupled=decoupled, **case.options)
        return lambda: opt.step(grads)
    if implementation == "torch":
        import torch

        tensors = [torch.from_numpy(p) for p in params]
        for t, g in zip(tensors, grads):
            t.requires_grad_(True)
            t.grad = torch.from_numpy(g)
        opt = getattr(torch.optim, case.optimizer)(tensors, fused=True)
        max_norm = case.options.get("max_grad_norm")
        if max_norm is None:
            return opt.step

        def step():
            torch.nn.utils.clip_grad_norm_(tensors, max_norm)
            opt.step()

        return step
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")


def triad_bandwidth(n=10_000_000, repeats=5):
    """The machine's memory bandwidth in GB/s, from a parallel STREAM triad a = b + s*c
    (12 bytes per float32 element), measured now so it drifts with the benchmarks."""
    from fastdl.kernels.measure import triad

    a, b, c = (np.ones(n, np.float32) for _ in range(3))
    triad(a, b, c, np.float32(3.0))
    best = min(_seconds(lambda: triad(a, b, c, np.float32(3.0)), 1) for _ in range(repeats))
    return 12 * n / best / 1e9


def _seconds(fn, number):
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def time_steps(steps, budget=0.2, rounds=7):
    """Best mean time of one call for each of ``steps`` (name -> callable).

    The implementations take turns, round by round, so that a slow spell of a shared machine
    hits all of them alike; each round times a batch of calls worth ~``budget / rounds`` s.
    """
    numbers = {}
    for name, step in steps.items():
        step()  # compile / warm up
        once = _seconds(step, 1)
        numbers[name] = max(1, int(budget / rounds / max(once, 1e-7)))
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = min(best[name], _seconds(step, numbers[name]))
    return best


def run(argv=None):
    """Print a table: time per step of each implementation and fastdl's speed-up over each."""
    parser = argparse.ArgumentParser(prog="fastdl bench", description="time fastdl's "
                                     "optimizers against the NumPy textbook version and "
                                     "PyTorch (if installed)")
    parser.add_argument("--quick", action="store_true", help="shorter timing rounds")
    quick = parser.parse_args(argv).quick
    implementations = [i for i in IMPLEMENTATIONS if i != "torch" or torch_version() is not None]
    print(f"fastdl optimizer benchmark — {machine_description()}")
    print(f"device: cpu; float32; implementations alternate round by round, best of 7 rounds;"
          f" {time.strftime('%Y-%m-%d')}")
    bandwidth = triad_bandwidth()
    print(f"memory bandwidth (STREAM triad, 2 threads, now): {bandwidth:.1f} GB/s\n")
    header = f"{'case':44s}" + "".join(f"{i + ' (ms)':>14s}" for i in implementations)
    header += "".join(f"{'vs ' + i:>10s}" for i in implementations[1:]) + f"{'fastdl GB/s':>13s}"
    print(header)
    print("-" * len(header))
    for case in OPTIM_CASES.values():
        steps = {i: make_optim_step(case, i) for i in implementations}
        times = time_steps(steps, 0.3 if quick else 1.5)
        row = f"{case.name:44s}" + "".join(f"{times[i] * 1e3:14.3f}" for i in implementations)
        row += "".join(f"{times[i] / times['fastdl']:9.1f}x" for i in implementations[1:])
        row += f"{case.bytes_per_element * case.size / times['fastdl'] / 1e9:13.1f}"
        print(row)
    if "torch" not in implementations:
        print("\n(PyTorch is not installed: `pip install -e .[compare]` adds it as a baseline)")
    return 0
