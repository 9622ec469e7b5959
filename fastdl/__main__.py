"""``python -m fastdl demo`` trains a deep network on the digits end to end (the main job);
``python -m fastdl tune`` searches its hyperparameters, K models at once; ``python -m fastdl
bench`` times the fused optimizers against NumPy (and PyTorch)."""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = ("usage: fastdl {demo,tune,bench} [options]\n"
             "  demo   train a network on the 8x8 digits with fastdl (--help for options)\n"
             "  tune   random search, coarse to fine, K models at once (--help for options)\n"
             "  bench  time fastdl's optimizers against NumPy and PyTorch (--quick)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import run

        return run(rest)
    if command == "tune":
        from .tune import run

        return run(rest)
    if command == "bench":
        import argparse

        from . import bench

        parser = argparse.ArgumentParser(prog="fastdl bench", description="time fastdl's "
                                         "optimizers against the NumPy textbook version and "
                                         "PyTorch (if installed)")
        parser.add_argument("--quick", action="store_true", help="shorter timing rounds")
        bench.run(quick=parser.parse_args(rest).quick)
        return 0
    print(f"fastdl: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
