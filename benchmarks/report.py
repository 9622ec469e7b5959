"""Turn a pytest-benchmark JSON file into the README's Markdown table.

    python benchmarks/report.py benchmarks/latest.json
"""

import json
import sys

from fastdl import bench


def main(path):
    with open(path) as f:
        data = json.load(f)
    times = {}  # (case, implementation) -> min seconds
    moved = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        times[info["case"], info["implementation"]] = b["stats"]["min"]
        moved[info["case"]] = info["bytes_moved"]
    triad = moved["triad"] / times["triad", "numba"] / 1e9
    print("| case | fastdl | NumPy textbook | PyTorch fused | vs NumPy | vs PyTorch | "
          "fastdl GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, case in bench.OPTIM_CASES.items():
        ours = times[key, "fastdl"]
        numpy = times.get((key, "numpy"))
        torch = times.get((key, "torch"))
        cells = [case.name, _ms(ours), _ms(numpy), _ms(torch),
                 _ratio(numpy, ours), _ratio(torch, ours), f"{moved[key] / ours / 1e9:.0f}"]
        print("| " + " | ".join(cells) + " |")
    info = data["machine_info"]
    print(f"\nMemory bandwidth in the same run (STREAM triad, 2 threads): {triad:.0f} GB/s. "
          f"Times are the best of each benchmark's rounds.")
    print(f"Machine: {info.get('cpu', {}).get('brand_raw', info.get('processor'))}, "
          f"{data['datetime'][:10]}, Python {info['python_version']}.")


def _ms(seconds):
    return "—" if seconds is None else f"{seconds * 1e3:.3f} ms"


def _ratio(theirs, ours):
    return "—" if theirs is None else f"{theirs / ours:.1f}x"


if __name__ == "__main__":
    main(sys.argv[1])
