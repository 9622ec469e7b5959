"""Turn a pytest-benchmark JSON file into the README's Markdown tables.

    python benchmarks/report.py benchmarks/latest.json
"""

import json
import sys

from fastdl.jobs.bench import OPTIM_CASES

import cases


def main(path):
    with open(path) as f:
        data = json.load(f)
    times = {}  # (case, implementation) -> min seconds
    moved = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        times[info["case"], info["implementation"]] = b["stats"]["min"]
        moved[info["case"]] = info["bytes_moved"]
    triad = moved["triad"] / times["triad", "numba"] / 1e9 if ("triad", "numba") in times \
        else None
    if any(key in moved for key in OPTIM_CASES):
        print("| optimizer step | fastdl | NumPy textbook | PyTorch fused | vs NumPy | "
              "vs PyTorch | fastdl GB/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for key, case in OPTIM_CASES.items():
            _row(case.name, key, times, moved, ("fastdl", "numpy", "torch"))
        print()
    tables = [(cases.BATCHNORM_CASES, "batch norm, forward + backward"),
              (cases.SOFTMAX_CASES, "softmax cross-entropy, loss + gradient"),
              (cases.DROPOUT_CASES, "dropout")]
    for table, title in tables:
        if any(key in moved for key in table):
            print(f"| {title} | fastdl | fastdl serial | NumPy textbook | PyTorch | "
                  "parallel vs serial | vs NumPy | vs PyTorch | fastdl GB/s |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for key, case in table.items():
                _row(case.name, key, times, moved,
                     ("fastdl", "fastdl-serial", "numpy", "torch"))
            print()
    if any(key in moved for key in cases.EPOCH_CASES):
        print("| one training epoch | fastdl | NumPy textbook | PyTorch | vs NumPy | "
              "vs PyTorch |")
        print("|---|---:|---:|---:|---:|---:|")
        for key, case in cases.EPOCH_CASES.items():
            if (key, "fastdl") in times:
                others = [times.get((key, i)) for i in ("fastdl", "numpy", "torch")]
                cells = [case.name] + [_ms(t) for t in others] + [
                    _ratio(t, others[0]) for t in others[1:]]
                print("| " + " | ".join(cells) + " |")
        print()
    sizes = [k for k in (16, 64) if (f"population_{k}", "fastdl-population") in times]
    if sizes:
        print("| K demo networks, 10 epochs on the digits | "
              + " | ".join(f"K = {k} | population is faster by" for k in sizes) + " |")
        print("|---|" + "---:|---:|" * len(sizes))
        for implementation in cases.POPULATION_IMPLEMENTATIONS:
            cells = []
            for k in sizes:
                t = times.get((f"population_{k}", implementation))
                cells += [_ms(t), _ratio(t, times[f"population_{k}", "fastdl-population"])]
            print(f"| {implementation} | " + " | ".join(cells) + " |")
        print()
    if any(key in moved for key in cases.TORCH_CASES):
        print("| through autograd / optimizer.step() | fastdl.torch | torch | vs torch | "
              "fastdl GB/s |")
        print("|---|---:|---:|---:|---:|")
        for key, case in cases.TORCH_CASES.items():
            ours, theirs = times.get((key, "fastdl.torch")), times.get((key, "torch"))
            if ours is not None:
                rate = f"{moved[key] / ours / 1e9:.0f}" if moved[key] else "—"
                print(f"| {case.name} | {_ms(ours)} | {_ms(theirs)} | "
                      f"{_ratio(theirs, ours)} | {rate} |")
        print()
    if ("study_64", "fastdl-population") in times:
        _study_tables(times)
    if triad:
        print(f"Memory bandwidth in the same run (STREAM triad, 2 threads): {triad:.0f} GB/s. "
              "Times are the best of each benchmark's rounds.")
    info = data["machine_info"]
    print(f"Machine: {info.get('cpu', {}).get('brand_raw', info.get('processor'))}, "
          f"{data['datetime'][:10]}, Python {info['python_version']}.")


def _study_tables(times):
    """The Optuna study benchmarks (benchmarks/test_study_bench.py): seconds to finish a study
    of 64 trials, and trials finished per second."""
    ours = times["study_64", "fastdl-population"]
    n_trials = cases.STUDY_CASES["study_64"].n_trials
    print("| 64 trials of the demo network, 10 epochs each | time | trials / s | "
          "fastdl population faster by |")
    print("|---|---:|---:|---:|")
    names = {"fastdl-population": "fastdl, 1 worker x 16 models (`fastdl.tune.optimize`)",
             "optuna-fastdl-per-trial": "Optuna's `study.optimize`, one fastdl model per trial",
             "optuna-torch-per-trial": "Optuna's `study.optimize`, one PyTorch model per trial"}
    for implementation, name in names.items():
        t = times.get(("study_64", implementation))
        if t is not None:
            print(f"| {name} | {t:.2f} s | {n_trials / t:.1f} | {_ratio(t, ours)} |")
    for workers, models in [(1, 16), (2, 8)]:
        t = times.get(("study_workers", f"{workers}x{models}"))
        if t is not None:
            print(f"| `python -m fastdl tune --workers {workers} --models {models}` (whole "
                  f"command) | {t:.2f} s | {n_trials / t:.1f} | — |")
    for key in ("study_64_median_refill", "study_64_median_rounds"):
        t = times.get((key, "fastdl-population"))
        if t is not None:
            print(f"| {cases.STUDY_CASES[key].name} | {t:.2f} s | {n_trials / t:.1f} | — |")
    print()


def _row(name, key, times, moved, implementations):
    if (key, "fastdl") not in times:
        return
    ours = times[key, "fastdl"]
    others = [times.get((key, i)) for i in implementations]
    cells = [name] + [_ms(t) for t in others] + [_ratio(t, ours) for t in others[1:]]
    print("| " + " | ".join(cells + [f"{moved[key] / ours / 1e9:.0f}"]) + " |")


def _ms(seconds):
    return "—" if seconds is None else f"{seconds * 1e3:.3f} ms"


def _ratio(theirs, ours):
    return "—" if theirs is None else f"{theirs / ours:.1f}x"


if __name__ == "__main__":
    main(sys.argv[1])
