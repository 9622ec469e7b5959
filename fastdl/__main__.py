"""``python -m fastdl demo`` trains a deep network on the digits end to end (the main job);
``python -m fastdl tune`` searches its hyperparameters, K models at once; ``python -m fastdl
bench`` times the fused optimizers against NumPy (and PyTorch). The jobs live in
:mod:`fastdl.jobs`, which only this module imports."""

import sys

from .jobs import bench, demo, tune

JOBS = {"demo": demo, "tune": tune, "bench": bench}
USAGE = ("usage: fastdl {demo,tune,bench} [options]\n"
         "  demo   train a network on the 8x8 digits with fastdl (--help for options)\n"
         "  tune   random search, coarse to fine, K models at once (--help for options)\n"
         "  bench  time fastdl's optimizers against NumPy and PyTorch (--quick)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in JOBS:
        print(f"fastdl: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    return JOBS[command].run(rest)


if __name__ == "__main__":
    sys.exit(main())
