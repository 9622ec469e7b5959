"""The population benchmark's table, the implementations taking turns round by round: K demo
networks (64-256-128-10, batch 64, 10 epochs on the digits, random hyperparameters per model),
timed whole as in test_population_bench.py (build, 10 epochs, dev evaluation after each), as
one fastdl population and as the PyTorch ensembles of cases.TorchEnsemble.

    python benchmarks/population_rounds.py --rounds 5 --models 16 64

Each round runs every implementation once, in turn, so that a slow spell of a shared machine
hits all alike; on Linux, a run during which other processes used more than 0.1 of a core
(/proc/stat against this process's own CPU time) is run again (at most 20 times). Prints a
Markdown table of medians (min-max) and each one's time over fastdl's population.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from fastdl.jobs.common import machine_description

sys.path.insert(0, str(Path(__file__).parent))

import cases  # noqa: E402

IMPLEMENTATIONS = ("fastdl-population", "torch-vmap-per-model-adam", "torch-vmap-fused-adam",
                   "torch-bmm-per-model-adam", "torch-bmm-fused-adam")


def _busy_seconds():
    """CPU seconds all processes have used (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds():
    t = os.times()
    return t.user + t.system


def timed(run, max_other=0.1, tries=20):
    """Seconds of one call of ``run`` while other processes used at most ``max_other`` cores
    (tried again otherwise), and the number of calls thrown away."""
    for attempt in range(tries):
        busy, own, start = _busy_seconds(), _own_seconds(), time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        if busy is None:
            return seconds, attempt
        other = (_busy_seconds() - busy - (_own_seconds() - own)) / seconds
        if other <= max_other:
            return seconds, attempt
        time.sleep(2)
    return seconds, tries


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    # imported before fastdl's kernels, which set GOMP_SPINCOUNT (kernels/config.py): PyTorch's
    # OpenMP keeps its default
    import torch

    results, thrown = {}, 0
    for n_models in args.models:
        runs = {name: cases.make_population_run(name, n_models, args.epochs)
                for name in IMPLEMENTATIONS}
        for run in runs.values():
            run()  # compile and warm up
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                seconds, dropped = timed(run)
                times[name].append(seconds)
                thrown += dropped
        results[n_models] = times

    header = " | ".join(f"K = {k}: median (min-max) | vs fastdl" for k in args.models)
    print(f"| {args.epochs} epochs of K demo networks | {header} |")
    print("|---|" + "---:|---:|" * len(args.models))
    for name in IMPLEMENTATIONS:
        cells = []
        for k in args.models:
            t, ours = results[k][name], np.median(results[k]["fastdl-population"])
            cells += [f"{np.median(t):.2f} s ({min(t):.2f}-{max(t):.2f})",
                      f"{np.median(t) / ours:.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{args.rounds} rounds, implementations alternating; {thrown} runs thrown away "
          f"(other processes busy). {machine_description()}; torch "
          f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d')}.")


if __name__ == "__main__":
    main()
