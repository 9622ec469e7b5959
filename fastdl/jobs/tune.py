"""``python -m fastdl tune``: random search, coarse to fine, over the demo network's
hyperparameters on the digits, K models a round trained as one population
(:func:`fastdl.tune.search_round`); prints each round, a leaderboard and the best
configuration, and writes ``results.csv`` and ``search.png``."""

import argparse
import os

from .. import data, tune
from .common import select_device


def run(argv=None):
    parser = argparse.ArgumentParser(prog="fastdl tune", description="Random search, coarse to "
                                     "fine, over the demo network's hyperparameters on the "
                                     "digits: K models a round, trained as one population.")
    parser.add_argument("--models", type=int, default=16, help="models per round (K)")
    parser.add_argument("--rounds", type=int, default=2, help="round 1 coarse, then finer")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--optimizer", default="adam", choices=sorted(tune.BETAS))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fastdl-tune", help="folder of results.csv and "
                        "search.png (default: fastdl-tune)")
    args = parser.parse_args(argv)
    for name in ("models", "rounds", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    device = select_device(args.device, "fastdl tune")
    if device is None:
        return 2
    splits = data.load_digits(args.seed)
    space = tune.default_space(args.optimizer)
    results = []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}: {args.models} models ({args.optimizer}, {args.epochs} "
              f"epochs) as one population over", flush=True)
        for name, sampler in space.items():
            print(f"  {name:13s} {sampler!r}")
        records, seconds = tune.search_round(space, splits, args.models, args.epochs,
                                             args.optimizer, args.seed, round_index, device)
        results += records
        top = tune.best(records)[0]
        diverged = sum(r["diverged"] for r in records)
        print(f"  {seconds:.2f} s; best dev accuracy {top['dev_accuracy']:.3f}; {diverged} "
              f"diverged (frozen, reported as nan)", flush=True)
        space = tune.coarse_to_fine(space, records, keep=0.25)
    print("\nleaderboard (dev accuracy after the last epoch):")
    print(tune.leaderboard(results, top=10))
    os.makedirs(args.out, exist_ok=True)
    csv_path = tune.write_csv(results, os.path.join(args.out, "results.csv"))
    png_path = tune.scatter(results, "lr", "weight_decay",
                            path=os.path.join(args.out, "search.png"),
                            space=tune.default_space(args.optimizer))
    print(f"results: {csv_path}; plot: {png_path}")
    winner = tune.best(results)[0]
    config = ", ".join(f"{k}={winner[k]:.4g}" for k in tune.default_space(args.optimizer))
    print(f"best: dev accuracy {winner['dev_accuracy']:.3f} with {config}")
    return 0
