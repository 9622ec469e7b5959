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
    if triad:
        print(f"Memory bandwidth in the same run (STREAM triad, 2 threads): {triad:.0f} GB/s. "
              "Times are the best of each benchmark's rounds.")
    info = data["machine_info"]
    print(f"Machine: {info.get('cpu', {}).get('brand_raw', info.get('processor'))}, "
          f"{data['datetime'][:10]}, Python {info['python_version']}.")


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
