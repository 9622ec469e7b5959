"""``python -m fastdl bench``: time the fused optimizers against NumPy (and PyTorch)."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastdl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time fastdl's optimizers against the NumPy "
                                              "textbook version and PyTorch (if installed)")
    bench.add_argument("--quick", action="store_true", help="shorter timing rounds")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from . import bench as bench_module

        bench_module.run(quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
