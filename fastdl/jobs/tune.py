"""``python -m fastdl tune``: hyperparameter search over the demo network on the digits, K
models trained at once as one population.

Without ``--trials``: random search, coarse to fine, K models a round
(:func:`fastdl.tune.search_round`); no Optuna needed. With ``--trials N``: an Optuna study of N
trials (:func:`fastdl.tune.optimize`) on an embedded journal file under ``--out`` or the
``--storage`` URL, with pruning (a pruned model's slot refilled at once), PBT, and ``--workers``
local processes; the same command on another machine with the same ``--storage`` joins.
Both print a leaderboard and the best configuration and write ``results.csv`` and
``search.png``."""

import argparse
import contextlib
import multiprocessing
import os
import sys
import warnings

from .. import data, tune
from .common import select_device

SAMPLERS = ("tpe", "random", "cmaes")
PRUNERS = ("none", "median", "halving", "hyperband")


def parse(argv):
    parser = argparse.ArgumentParser(prog="fastdl tune", description="Hyperparameter search "
                                     "over the demo network on the digits, K models at once "
                                     "as one population: random search coarse to fine, or an "
                                     "Optuna study (--trials).")
    parser.add_argument("--models", type=int, default=16, help="models trained at once (K)")
    parser.add_argument("--rounds", type=int, default=2, help="random search: round 1 "
                        "coarse, then finer")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--optimizer", default="adam", choices=sorted(tune.BETAS))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fastdl-tune", help="folder of results.csv, "
                        "search.png and the study's journal file (default: fastdl-tune)")
    study = parser.add_argument_group("an Optuna study (the tune extra: pip install "
                                      "'fastdl[tune]')")
    study.add_argument("--trials", type=int, help="finished trials to reach (COMPLETE or "
                       "PRUNED); runs an Optuna study")
    study.add_argument("--storage", help="sqlite:///..., postgresql://..., mysql://... "
                       "(Optuna's RDB storage, shared by workers on other machines); default: "
                       "a journal file under --out")
    study.add_argument("--study", default="fastdl-tune", help="study name (default: "
                       "fastdl-tune); an existing one continues")
    study.add_argument("--workers", type=int, default=1, help="local worker processes")
    study.add_argument("--sampler", default="tpe", choices=SAMPLERS)
    study.add_argument("--pruner", default="none", choices=PRUNERS)
    study.add_argument("--pbt", action="store_true", help="population-based training inside "
                       "each worker's population")
    study.add_argument("--pbt-interval", type=int, default=5, help="epochs between PBT steps")
    study.add_argument("--heartbeat", type=float, default=tune.HEARTBEAT_INTERVAL,
                       help=argparse.SUPPRESS)  # seconds; the fault tests shorten both
    study.add_argument("--stale-after", type=float, default=tune.STALE_AFTER,
                       help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("models", "rounds", "epochs", "workers", "pbt_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.trials is None:
        given = [flag for flag, default in [("storage", None), ("pbt", False),
                                            ("pruner", "none"), ("workers", 1)]
                 if getattr(args, flag) != default]
        if given:
            parser.error(f"--{given[0]} belongs to an Optuna study: give --trials N")
    elif args.trials < 1:
        parser.error("--trials must be >= 1")
    if args.heartbeat <= 0 or args.stale_after <= args.heartbeat:
        parser.error("--heartbeat must be > 0 and --stale-after longer than it")
    return args


def run(argv=None):
    args = parse(argv)
    device = select_device(args.device, "fastdl tune")
    if device is None:
        return 2
    if args.trials is not None:
        return run_study(args, device)
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
    report(args, results, group="round")
    return 0


def report(args, results, group, metric="dev_accuracy", maximize=True):
    """The leaderboard (by ``metric``), results.csv, search.png (coloured by dev accuracy,
    markers by ``group``) and the best configuration."""
    print(f"\nleaderboard ({metric.replace('_', ' ')} after the last epoch):")
    print(tune.leaderboard(results, metric=metric, maximize=maximize, top=10))
    os.makedirs(args.out, exist_ok=True)
    csv_path = tune.write_csv(results, os.path.join(args.out, "results.csv"))
    space = tune.default_space(args.optimizer)
    png_path = tune.scatter(results, "lr", "weight_decay", path=os.path.join(args.out,
                            "search.png"), space=space, group=group)
    print(f"results: {csv_path}; plot: {png_path}")
    winner = tune.best(results, metric=metric, maximize=maximize)[0]
    config = ", ".join(f"{k}={winner[k]:.4g}" for k in space)
    print(f"best: dev accuracy {winner['dev_accuracy']:.3f} with {config}")


# -- an Optuna study ----------------------------------------------------------------------------

def open_study(args, worker=0):
    """The study of ``args`` on its storage (created, or loaded when it exists), with the
    sampler and pruner asked for; the sampler is seeded per worker. Raises RuntimeError naming
    the storage when it cannot be reached, ValueError when the study cannot take this search
    (another direction or search space)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(args)
    seed = args.seed * 1000 + worker
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(constant_liar=True, seed=seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=seed),
               "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed)}[args.sampler]()
    pruner = {"none": optuna.pruners.NopPruner,
              "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=args.models),
              "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(
                  min_resource=1, max_resource=args.epochs)}[args.pruner]()
    study = optuna.create_study(study_name=args.study, storage=storage, sampler=sampler,
                                pruner=pruner, direction="minimize", load_if_exists=True)
    tune.check_study(study, tune.default_space(args.optimizer))
    return study


def open_storage(args):
    """An embedded journal file under ``--out`` (several local workers share it), or
    Optuna's RDB storage at the ``--storage`` URL with Optuna's heartbeat on (SPEC.md)."""
    import optuna

    if args.storage is None:
        os.makedirs(args.out, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(os.path.join(args.out, "journal.log")))
    import sqlalchemy

    connect = {"connect_args": {"connect_timeout": 10}} \
        if args.storage.startswith("postgresql") else {}
    with warnings.catch_warnings():  # "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    try:
        return optuna.storages.RDBStorage(
            args.storage, engine_kwargs={"pool_pre_ping": True, **connect},
            heartbeat_interval=max(1, round(args.heartbeat)),
            grace_period=max(2, round(args.stale_after)),
            heartbeat_stale_trial_callback=retry)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise RuntimeError(f"cannot open the storage {args.storage!r}: {reason}") from None


def run_study(args, device):
    try:
        study = open_study(args)
    except ImportError as error:
        print(f"fastdl tune: --trials needs Optuna ({error}); pip install 'fastdl[tune]'",
              file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as error:
        print(f"fastdl tune: {error}", file=sys.stderr)
        return 2
    where = args.storage or os.path.join(args.out, "journal.log")
    pbt = f", PBT every {args.pbt_interval} epochs" if args.pbt else ""
    print(f"study {study.study_name!r} on {where}: {args.trials} trials of {args.epochs} "
          f"epochs, {args.workers} worker(s) x {args.models} models, sampler {args.sampler}, "
          f"pruner {args.pruner}{pbt}", flush=True)
    if args.workers == 1:
        work(args, device, 0, study)
    else:
        context = multiprocessing.get_context("spawn")  # no OpenMP pool is forked
        workers = [context.Process(target=work, args=(args, device, i)) for i in
                   range(args.workers)]
        with worker_threads(args.workers):
            for worker in workers:
                worker.start()
        for worker in workers:
            worker.join()
        failed = [i for i, w in enumerate(workers) if w.exitcode != 0]
        if failed:
            print(f"fastdl tune: worker(s) {failed} ended with an error (their trials go stale "
                  f"and are retried by a re-run)", file=sys.stderr)
            return 1
    records = tune.study_records(study, tune.default_space(args.optimizer))
    if not any(r["state"] == "complete" for r in records):
        print("fastdl tune: no trial completed", file=sys.stderr)
        return 1
    report(args, [r for r in records if r["state"] == "complete"], group="generation",
           metric="dev_loss", maximize=False)
    best = study.best_trial
    if args.pbt:
        copied = sum(r["generation"] > 0 for r in records)
        lineage = ", ".join(f"epoch {e}: from trial {t}" for e, t in best.user_attrs["lineage"])
        print(f"PBT: {copied} trials continued a copy of a better model; the best trial's "
              f"lineage: {lineage or 'its own'}")
    print(f"trials: {sum(r['state'] == 'complete' for r in records)} complete, "
          f"{sum(r['state'] == 'pruned' for r in records)} pruned; best trial "
          f"{best.number}, dev loss {study.best_value:.4f}")
    return 0


# The thread pools a process's libraries start: OpenBLAS (NumPy's), OpenMP (numba's, and
# MKL's or torch's where present).
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS")


@contextlib.contextmanager
def worker_threads(workers):
    """The environment of ``workers`` processes started in the block: the CPUs shared out,
    one pool's worth each. Each library's threads spin for a while after their work instead
    of sleeping; W processes each starting as many threads as there are CPUs fought over
    them: 2 workers x 8 models took 254 s where 1 worker x 16 took 9 s, on 2 cores."""
    threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: threads for name in THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def work(args, device, worker, study=None):
    """One worker: its progress bar (trials finished / N, best value), then
    :func:`fastdl.tune.optimize` on the shared study."""
    from .. import set_device

    set_device(device)
    if study is None:
        study = open_study(args, worker)
    bar = _progress_bar(args.trials, worker)
    try:
        tune.optimize(study, tune.default_space(args.optimizer), args.trials,
                      population=args.models, epochs=args.epochs, optimizer=args.optimizer,
                      splits=data.load_digits(args.seed), seed=args.seed, pbt=args.pbt,
                      pbt_interval=args.pbt_interval, heartbeat_interval=args.heartbeat,
                      stale_after=args.stale_after, progress=bar.update, device=device)
    finally:
        bar.close()


class _progress_bar:  # noqa: N801 (a function-like factory)
    """A tqdm bar "worker i: finished / N, best value", or a line per trial without tqdm."""

    def __init__(self, total, worker):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.worker = worker
        self.bar = None if tqdm is None else tqdm(total=total, position=worker,
                                                  desc=f"worker {worker}", unit="trial")

    def update(self, finished, total, best):
        if self.bar is None:
            print(f"worker {self.worker}: {finished}/{total} trials, best {best:.4f}",
                  flush=True)
            return
        self.bar.n = min(finished, total)
        self.bar.set_postfix(best=f"{best:.4f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
