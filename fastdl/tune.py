"""Hyperparameter search as the notes teach it: random points (not a grid), each on the right
scale, coarse to fine.

    space = {"lr": tune.loguniform(1e-4, 1e-1), "beta1": tune.beta_range(0.8, 0.99),
             "dropout": tune.uniform(0.0, 0.5), "optimizer": tune.choice(["adam", "adamw"])}
    configs = tune.random_search(space, n=16, seed=0)      # a list of dicts
    ...train, and add each config's "dev_accuracy"...
    finer = tune.coarse_to_fine(space, results, keep=0.25)  # ranges around the best quarter

Samplers draw NumPy arrays, so a round of K configurations is K values per hyperparameter:
exactly what a population (``population=True``) takes.
"""

import csv
import math
import time
import warnings

import numpy as np

from . import _validate, data, nn, training


class _Sampler:
    def sample(self, rng, n):
        raise NotImplementedError

    def around(self, values, margin=0.1):
        """A sampler of the same kind over the range the ``values`` span, widened by
        ``margin`` of that range (on the sampler's scale) and kept inside this one."""
        raise NotImplementedError


class uniform(_Sampler):  # noqa: N801  (a sampler reads like a distribution's name)
    """Uniform on [lo, hi]: for hyperparameters whose scale is linear (a dropout rate)."""

    def __init__(self, lo, hi):
        self.lo, self.hi = _bounds(lo, hi, "uniform")

    def _to(self, x):
        return np.asarray(x, np.float64)

    def _from(self, u):
        return u

    def sample(self, rng, n):
        low, high = sorted((float(self._to(self.lo)), float(self._to(self.hi))))
        return self._from(rng.uniform(low, high, n))

    def around(self, values, margin=0.1):
        scaled = self._to(values)
        edges = sorted((float(self._to(self.lo)), float(self._to(self.hi))))
        lo, hi = float(np.min(scaled)), float(np.max(scaled))
        # widen by margin of the span (at least 1 % of the whole range), within the range
        pad = max(margin * (hi - lo), 0.01 * (edges[1] - edges[0]))
        lo, hi = max(lo - pad, edges[0]), min(hi + pad, edges[1])
        return type(self)(*sorted((float(self._from(lo)), float(self._from(hi)))))

    def __repr__(self):
        return f"{type(self).__name__}({self.lo:.6g}, {self.hi:.6g})"


class loguniform(uniform):  # noqa: N801
    """``10 ** U(log10 lo, log10 hi)``: for learning rates and weight decays, whose scale is
    logarithmic (as much search between 1e-4 and 1e-3 as between 1e-2 and 1e-1)."""

    def __init__(self, lo, hi):
        super().__init__(lo, hi)
        if self.lo <= 0:
            raise ValueError(f"loguniform needs 0 < lo < hi; got lo={lo!r}")

    def _to(self, x):
        return np.log10(np.asarray(x, np.float64))

    def _from(self, u):
        return 10.0 ** np.asarray(u)


class beta_range(uniform):  # noqa: N801
    """``1 - 10 ** U(log10(1 - hi), log10(1 - lo))``: for averaging betas, where 0.9 to 0.99
    matters as much as 0.99 to 0.999 (the number of values averaged, 1 / (1 - beta), is what
    moves)."""

    def __init__(self, lo, hi):
        super().__init__(lo, hi)
        if not 0 <= self.lo < self.hi < 1:
            raise ValueError(f"beta_range needs 0 <= lo < hi < 1; got ({lo!r}, {hi!r})")

    def _to(self, x):
        return np.log10(1 - np.asarray(x, np.float64))

    def _from(self, u):
        return 1 - 10.0 ** np.asarray(u)


class choice(_Sampler):  # noqa: N801
    """One of ``options``, uniformly."""

    def __init__(self, options):
        self.options = list(options)
        if not self.options:
            raise ValueError("choice needs at least one option")

    def sample(self, rng, n):
        picks = rng.integers(0, len(self.options), n)
        return [self.options[i] for i in picks]

    def around(self, values, margin=0.1):
        kept = [o for o in self.options if o in list(values)]
        return choice(kept or self.options)

    def __repr__(self):
        return f"choice({self.options!r})"


def _bounds(lo, hi, name):
    for value, what in [(lo, "lo"), (hi, "hi")]:
        _validate.number(value, f"{name} {what}", _validate.finite)
    lo, hi = float(lo), float(hi)
    if not lo < hi:
        raise ValueError(f"{name} needs lo < hi; got ({lo!r}, {hi!r})")
    return lo, hi


def _check_space(space):
    if not isinstance(space, dict) or not space:
        raise TypeError(f"space must be a non-empty dict of name -> sampler; got "
                        f"{_validate.describe(space)}")
    for name, sampler in space.items():
        if not isinstance(sampler, _Sampler):
            raise TypeError(f"space[{name!r}] must be a sampler (loguniform, beta_range, "
                            f"uniform, choice); got {_validate.describe(sampler)}")


def sample_space(space, n, seed=None):
    """``n`` values of every hyperparameter: a dict name -> array (or list for choice)."""
    _check_space(space)
    n = _validate.integer(n, "n", minimum=1)
    rng = np.random.default_rng(seed)
    return {name: sampler.sample(rng, n) for name, sampler in space.items()}


def random_search(space, n, seed=None):
    """``n`` random configurations of ``space`` (seeded): a list of dicts name -> value."""
    values = sample_space(space, n, seed)
    return [{name: _plain(values[name][i]) for name in space} for i in range(n)]


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def best(results, metric="dev_accuracy", maximize=True, keep=None):
    """The results sorted best first on ``metric`` (NaN last); the first ``keep`` of them."""
    def key(record):
        value = record.get(metric, math.nan)
        bad = value is None or (isinstance(value, float) and math.isnan(value))
        return (bad, -value if (maximize and not bad) else (value if not bad else 0))

    ranked = sorted(results, key=key)
    return ranked if keep is None else ranked[:keep]


def coarse_to_fine(space, results, keep=0.25, metric="dev_accuracy", maximize=True,
                   margin=0.1):
    """A finer space: each sampler narrowed to the range spanned by the best ``keep`` of
    ``results`` (a fraction, or a count), on its own scale, widened by ``margin``."""
    _check_space(space)
    if isinstance(results, (dict, str, bytes)) or not hasattr(results, "__len__"):
        raise TypeError(f"results must be a list of dicts; got {_validate.describe(results)}")
    if not results:
        raise ValueError("coarse_to_fine needs results to narrow around")
    for i, record in enumerate(results):
        if not isinstance(record, dict):
            raise TypeError(f"results[{i}] must be a dict; got {_validate.describe(record)}")
        missing = [name for name in space if name not in record]
        if missing:
            raise ValueError(f"results[{i}] has no value for {missing[0]!r} (every result "
                             f"needs every key of the space: {list(space)})")
    count = _validate.fraction_or_count(keep, "keep", len(results))
    top = best(results, metric, maximize, keep=count)
    return {name: sampler.around([r[name] for r in top], margin)
            for name, sampler in space.items()}


def leaderboard(results, metric="dev_accuracy", maximize=True, top=10, columns=None):
    """The best ``top`` results as a text table."""
    ranked = best(results, metric, maximize, keep=top)
    if not ranked:
        return "(no results)"
    columns = columns or list(ranked[0].keys())
    rows = [["#"] + columns] + [[str(i + 1)] + [_format(r.get(c)) for c in columns]
                                for i, r in enumerate(ranked)]
    widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def _format(value):
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_csv(results, path):
    """The results as a CSV file, one row per configuration (columns: the union of keys)."""
    columns = []
    for record in results:
        columns += [key for key in record if key not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(results)
    return path


MARKERS = "osD^v<>pPX*h"


def scatter(results, x, y, metric="dev_accuracy", path="search.png", space=None, group=None):
    """The notes' picture of random search: each result at (x, y), coloured by ``metric``;
    axes on a log scale for loguniform hyperparameters (when ``space`` is given). ``group``: a
    key of the results (the round, a PBT generation) whose values get distinct markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    values = np.array([r.get(metric, np.nan) for r in results], np.float64)
    finite = values[np.isfinite(values)]
    limits = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    groups = sorted({r.get(group) for r in results}, key=str) if group else [None]
    points = None
    for i, name in enumerate(groups):
        chosen = [j for j, r in enumerate(results) if group is None or r.get(group) == name]
        points = ax.scatter([results[j][x] for j in chosen], [results[j][y] for j in chosen],
                            c=values[chosen], cmap="viridis", vmin=limits[0], vmax=limits[1],
                            marker=MARKERS[i % len(MARKERS)], edgecolors="k", linewidths=0.5,
                            label=None if group is None else f"{group} {name}")
    fig.colorbar(points, label=metric)
    if group is not None and len(groups) > 1:
        ax.legend(fontsize="small")
    for name, set_scale in [(x, ax.set_xscale), (y, ax.set_yscale)]:
        if space is not None and isinstance(space.get(name), loguniform):
            set_scale("log")
    ax.set(xlabel=x, ylabel=y, title=f"random search: {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the search of python -m fastdl tune (the job itself: fastdl.jobs.tune) ---------------------

BETAS = {"adam": {"beta1": beta_range(0.8, 0.99), "beta2": beta_range(0.99, 0.9999)},
         "adamw": {"beta1": beta_range(0.8, 0.99), "beta2": beta_range(0.99, 0.9999)},
         "momentum": {"beta": beta_range(0.8, 0.999)},
         "rmsprop": {"beta": beta_range(0.9, 0.9999)},
         "sgd": {}}


LEARNING_RATES = {"adam": (1e-4, 1e-1), "adamw": (1e-4, 1e-1), "rmsprop": (1e-4, 1e-1),
                  "momentum": (1e-3, 1.0), "sgd": (1e-3, 1.0)}


def default_space(optimizer="adam"):
    """The search space of ``python -m fastdl tune``: learning rate and L2 on a log scale (the
    learning rates a step of the optimizer's kind wants), the optimizer's betas on the 1 - beta
    log scale, the dropout rate linearly, batch norm's momentum (1 - its EWA's beta) on a log
    scale."""
    return {"lr": loguniform(*LEARNING_RATES[optimizer]), **BETAS[optimizer],
            "weight_decay": loguniform(1e-6, 1e-2), "dropout": uniform(0.0, 0.5),
            "batchnorm_momentum": loguniform(0.01, 0.5)}


def search_round(space, splits, n_models, epochs, optimizer="adam", seed=0, round_index=0,
                 device=None):
    """Sample ``n_models`` configurations and train them as one population on ``splits``;
    returns their records (the configuration, dev accuracy and loss of the last epoch, whether
    the model diverged and was frozen) and the seconds it took (:mod:`fastdl.training` builds
    and trains them)."""
    values = sample_space(space, n_models, seed=(seed, round_index))
    model_seeds = [seed * 1000 + round_index * n_models + k for k in range(n_models)]
    layer_names = ("dropout", "batchnorm_momentum")  # the layers' (the rest: the optimizer's)
    model = training.build_network(**{name: np.asarray(values[name], np.float64)
                                      for name in layer_names if name in values},
                                   seed=model_seeds, population=n_models, device=device)
    hyper = {name: v for name, v in values.items() if name not in layer_names}
    start = time.perf_counter()
    history = training.train_population(model, splits, hyper, epochs, optimizer, seed=seed)
    seconds = time.perf_counter() - start
    records = []
    for k in range(n_models):
        frozen = bool(history.frozen[k])
        record = {"round": round_index + 1, **{name: _plain(values[name][k]) for name in space}}
        record["dev_accuracy"] = math.nan if frozen else float(history.dev_accuracy[-1][k])
        record["dev_loss"] = math.nan if frozen else float(history.dev_loss[-1][k])
        record["diverged"] = frozen
        records.append(record)
    return records, seconds


# -- Optuna studies trained as populations (SPEC.md, "Search at scale") -------------------------
#
# A worker asks the study for K trials, trains them as one training.Population, reports each
# epoch's dev loss, asks the study's pruner about each model, and refills a freed slot with a
# newly asked trial at once. Optuna is imported here only, on first use (the ``tune`` extra).

HEARTBEAT_INTERVAL = 10.0  # seconds between a worker's heartbeats for its running trials
STALE_AFTER = 60.0  # a running trial with no heartbeat for this long is failed and retried


def optuna_distributions(space):
    """Optuna's distributions of ``space`` (fastdl's samplers), on the same scale: a name ->
    distribution dict for ``study.ask(fixed_distributions=...)``.

    ``loguniform(lo, hi)`` -> ``FloatDistribution(lo, hi, log=True)``; ``uniform`` -> linear
    ``FloatDistribution``; ``beta_range(lo, hi)`` named ``"beta1"`` -> the parameter
    ``one_minus_beta1``, ``FloatDistribution(1 - hi, 1 - lo, log=True)`` (1 - beta on a log
    scale, as the sampler draws it); ``choice(options)`` -> ``CategoricalDistribution``.
    :func:`hyper_from_params` maps a trial's params back."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    _check_space(space)
    distributions = {}
    for name, sampler in space.items():
        if isinstance(sampler, beta_range):
            distributions["one_minus_" + name] = FloatDistribution(1 - sampler.hi, 1 - sampler.lo,
                                                                   log=True)
        elif isinstance(sampler, uniform):
            distributions[name] = FloatDistribution(sampler.lo, sampler.hi,
                                                    log=isinstance(sampler, loguniform))
        else:
            distributions[name] = CategoricalDistribution(sampler.options)
    return distributions


def hyper_from_params(space, params):
    """The hyperparameters (``space``'s names) of a trial's ``params`` (the names of
    :func:`optuna_distributions`): ``beta = 1 - one_minus_beta``."""
    return {name: (1 - params["one_minus_" + name] if isinstance(sampler, beta_range)
                   else params[name]) for name, sampler in space.items()}


def check_study(study, space):
    """ValueError, before any training, when ``study`` cannot take trials of ``space``: a
    direction other than minimize (the objective is the dev loss), or trials already in it
    whose distributions differ from :func:`optuna_distributions` of ``space``."""
    import optuna

    if list(study.directions) != [optuna.study.StudyDirection.MINIMIZE]:
        directions = [d.name.lower() for d in study.directions]
        raise ValueError(f"study {study.study_name!r} has direction {directions}; fastdl's "
                         f"objective is the dev loss, which needs direction 'minimize'")
    wanted = optuna_distributions(space)
    for trial in study.get_trials(deepcopy=False):
        if trial.distributions and trial.distributions != wanted:
            theirs = {k: repr(v) for k, v in trial.distributions.items()}
            ours = {k: repr(v) for k, v in wanted.items()}
            raise ValueError(f"study {study.study_name!r} holds trials of another search space "
                             f"(trial {trial.number}: {theirs}); this search's is {ours}: use "
                             f"another --study name, or the same space")


class _Heartbeat:
    """Heartbeats of a worker's running trials, and SPEC.md's rule for stale ones.

    On an RDB storage with Optuna's heartbeat enabled, the worker records Optuna's heartbeat
    itself (ask-and-tell does not) and ``optuna.storages.fail_stale_trials`` applies the
    storage's grace period and stale-trial callback. On any other storage (the journal file
    has no heartbeat) fastdl keeps the same rule in a trial system attribute: a running trial
    whose last heartbeat (or start) is older than ``stale_after`` seconds is marked failed and
    its parameters enqueued again, as Optuna's ``RetryHeartbeatStaleTrialCallback`` does. A
    thread beats every ``interval`` seconds, so a long epoch does not look like a death."""

    KEY = "fastdl:heartbeat"

    def __init__(self, study, interval, stale_after):
        import threading

        from optuna.storages import RDBStorage

        self.study, self.storage = study, study._storage  # noqa: SLF001 (Optuna's callbacks do)
        self.optuna_rule = (isinstance(self.storage, RDBStorage)
                            and self.storage.get_heartbeat_interval() is not None)
        self.interval, self.stale_after = interval, stale_after
        self._trial_ids, self._lock = set(), threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_periodically, daemon=True,
                                        name="fastdl-heartbeat")
        self._thread.start()

    def add(self, trial_id):
        with self._lock:
            self._trial_ids.add(trial_id)
        self._record(trial_id)

    def remove(self, trial_id):
        with self._lock:
            self._trial_ids.discard(trial_id)

    def _record(self, trial_id):
        if self.optuna_rule:
            self.storage.record_heartbeat(trial_id)
        else:
            self.storage.set_trial_system_attr(trial_id, self.KEY, time.time())

    def _beat_periodically(self):
        while not self._stop.wait(self.interval):
            with self._lock:
                trial_ids = list(self._trial_ids)
            for trial_id in trial_ids:
                try:
                    self._record(trial_id)
                except Exception:  # a finished trial, or the storage away: next beat retries
                    pass

    def stop(self):
        self._stop.set()
        self._thread.join()

    def fail_stale_trials(self):
        """Mark stale running trials failed and enqueue their parameters again."""
        import optuna

        if self.optuna_rule:
            optuna.storages.fail_stale_trials(self.study)
            return
        now = time.time()
        running = self.study.get_trials(deepcopy=False,
                                        states=(optuna.trial.TrialState.RUNNING,))
        with self._lock:
            ours = set(self._trial_ids)
        for trial in running:
            if trial._trial_id in ours:  # noqa: SLF001
                continue
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            last = max(trial.system_attrs.get(self.KEY, 0.0), started)
            if now - last <= self.stale_after:
                continue
            try:
                failed = self.storage.set_trial_state_values(
                    trial._trial_id, state=optuna.trial.TrialState.FAIL)  # noqa: SLF001
            except optuna.exceptions.UpdateFinishedTrialError:
                failed = False  # another worker failed it first
            if failed:
                with warnings.catch_warnings():  # "experimental" since Optuna 2.8
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
                retry(self.study, self.storage.get_trial(trial._trial_id))  # noqa: SLF001


# the hyperparameters a population's model k can take from a trial (training.Population)
def _settable(optimizer):
    return training.OPTIMIZER_HYPER[optimizer] + ("dropout", "batchnorm_momentum")


class _Slot:
    """One model of a worker's population and the trial it trains."""

    def __init__(self, trial, values, seed):
        self.trial, self.values, self.seed = trial, values, seed
        self.lineage = []  # PBT copies: [population epoch, source trial number]


def optimize(study, space, n_trials, population=16, epochs=10, optimizer="adam", splits=None,
             seed=0, pbt=False, pbt_interval=5, batch_size=64, refill=True,
             heartbeat_interval=HEARTBEAT_INTERVAL, stale_after=STALE_AFTER, progress=None,
             device=None):
    """Run ``study`` (an ``optuna.Study``, direction minimize) until it holds ``n_trials``
    finished trials (COMPLETE or PRUNED), training K = ``population`` trials at once as one
    population of the demo network (:func:`fastdl.training.build_network`) on ``splits``
    (default: the digits). Returns the study.

    Each trial's hyperparameters come from ``space`` (fastdl's samplers; names among
    ``lr, weight_decay``, the optimizer's betas as :func:`fastdl.training.make_optimizer`
    names them, ``dropout``, ``batchnorm_momentum``) through :func:`optuna_distributions`, so
    any Optuna sampler works. Every epoch each trial reports its dev loss (``trial.report``,
    step = its epochs trained - 1) and asks the study's pruner; a pruned trial is told PRUNED
    and its slot refilled at once with a newly asked trial (that model reinitialized from the
    trial's seed, its optimizer state, statistics, dropout stream, age and schedule restarted;
    the others undisturbed). After ``epochs`` epochs a trial is told its dev loss; a model whose
    loss or gradients went non-finite is told at once with value inf. User attributes:
    ``dev_accuracy``, ``epochs``, ``seed`` (the model's, ``nn.spawn_seed(seed, number)``),
    ``diverged``, ``lineage`` and ``hyper`` (the hyperparameters at the end: with PBT they may
    differ from the trial's params).

    ``refill=False`` leaves a freed slot empty until every slot is free, then asks K trials
    at once (rounds: what refilling saves, measured). ``pbt=True``: every ``pbt_interval``
    epochs :func:`pbt` copies the best models over the worst (exploit) and perturbs the copies'
    hyperparameters (explore).

    Several workers (processes or machines) may run ``optimize`` on one study: a worker asks
    only while finished + running trials < ``n_trials``, beats a heartbeat for its running
    trials every ``heartbeat_interval`` seconds, and before asking fails the trials of dead
    workers (no heartbeat for ``stale_after`` seconds, or the RDB storage's own grace period)
    and enqueues their parameters again; with nothing left to ask and fewer than ``n_trials``
    finished it waits for the others (a few more trials than asked may finish when workers race
    for the last ones). ``progress(finished, n_trials, best_value)`` is called as trials end::

        study = optuna.create_study(sampler=optuna.samplers.TPESampler(constant_liar=True),
                                    pruner=optuna.pruners.MedianPruner())
        fastdl.tune.optimize(study, fastdl.tune.default_space("adam"), 64, population=16)
    """
    n_trials = _validate.integer(n_trials, "n_trials", minimum=1)
    population = _validate.integer(population, "population", minimum=1)
    epochs = _validate.integer(epochs, "epochs", minimum=1)
    pbt_interval = _validate.integer(pbt_interval, "pbt_interval", minimum=1)
    heartbeat_interval = _validate.number(heartbeat_interval, "heartbeat_interval",
                                          _validate.positive)
    stale_after = _validate.number(stale_after, "stale_after", _validate.positive)
    _validate.option(optimizer, "optimizer", tuple(training.OPTIMIZERS))
    _check_space(space)
    unknown = sorted(set(space) - set(_settable(optimizer)))
    if unknown:
        raise ValueError(f"space names hyperparameters a population cannot vary per model "
                         f"with {optimizer}: {unknown}; it takes {_settable(optimizer)}")
    check_study(study, space)
    if splits is None:
        splits = data.load_digits(seed)
    refill = _validate.flag(refill, "refill")
    worker = _Worker(study, space, n_trials, population, epochs, optimizer, splits, seed, pbt,
                     pbt_interval, batch_size, refill, heartbeat_interval, stale_after, progress,
                     device)
    try:
        worker.loop()
    finally:
        worker.heartbeat.stop()
    return study


class _Worker:
    """The loop of :func:`optimize` (one process's share of a study)."""

    def __init__(self, study, space, n_trials, population, epochs, optimizer, splits, seed,
                 pbt, pbt_interval, batch_size, refill, heartbeat_interval, stale_after,
                 progress, device):
        import optuna

        self.optuna, self.study, self.space = optuna, study, space
        self.distributions = optuna_distributions(space)
        self.n_trials, self.epochs, self.seed = n_trials, epochs, seed
        self.pbt, self.pbt_interval, self.progress = pbt, pbt_interval, progress
        self.refill = refill
        self.heartbeat = _Heartbeat(study, heartbeat_interval, stale_after)
        self.poll_seconds = min(1.0, heartbeat_interval)
        model = training.build_network(population=population, seed=list(range(population)),
                                       device=device)
        self.population = training.Population(model, splits, optimizer, batch_size=batch_size,
                                       seed=seed)
        self.slots = [None] * population
        self.rng = np.random.default_rng([seed, study._study_id])  # noqa: SLF001
        self.done = 0

    # -- the study's counts ------------------------------------------------------------------

    def _count(self, *states):
        return len(self.study.get_trials(deepcopy=False, states=states))

    def finished(self):
        state = self.optuna.trial.TrialState
        return self._count(state.COMPLETE, state.PRUNED)

    def _may_ask(self):
        state = self.optuna.trial.TrialState
        return self._count(state.COMPLETE, state.PRUNED, state.RUNNING) < self.n_trials

    # -- the loop ----------------------------------------------------------------------------

    def loop(self):
        self._fill()
        while True:
            active = [k for k, slot in enumerate(self.slots) if slot is not None]
            if not active:
                if self.finished() >= self.n_trials:
                    return
                time.sleep(self.poll_seconds)  # others' trials run, or go stale: wait
                self._fill()
                continue
            self.population.train_epoch()
            dev_loss, dev_accuracy = self.population.evaluate()
            for k in active:
                self._report(k, float(dev_loss[k]), float(dev_accuracy[k]))
            if self.pbt and self.population.epoch % self.pbt_interval == 0:
                self._exploit_and_explore(dev_loss)
            self._fill()

    def _fill(self):
        """Give every free slot a newly asked trial, while the study needs more."""
        free = [k for k, slot in enumerate(self.slots) if slot is None]
        if not free or (not self.refill and len(free) < len(self.slots)):
            return
        self.heartbeat.fail_stale_trials()
        for k in free:
            if not self._may_ask():
                return
            trial = self.study.ask(self.distributions)
            self.heartbeat.add(trial._trial_id)  # noqa: SLF001
            values = hyper_from_params(self.space, trial.params)
            slot = self.slots[k] = _Slot(trial, values, nn.spawn_seed(self.seed, trial.number))
            trial.set_user_attr("seed", slot.seed)
            self.population.restart(k, slot.seed, {name: float(v) for name, v in values.items()})

    def _report(self, k, dev_loss, dev_accuracy):
        """After an epoch: report model k's dev loss, then tell its trial when it has trained
        ``epochs`` epochs, diverged, or its pruner says so (its slot is then free)."""
        slot, state = self.slots[k], self.optuna.trial.TrialState
        trial, age = slot.trial, int(self.population.age[k])
        diverged = bool(self.population.frozen[k]) or not np.isfinite(dev_loss)
        value = math.inf if diverged else dev_loss
        trial.report(value, age - 1)
        if diverged or age >= self.epochs:
            outcome = dict(values=value)
        elif trial.should_prune():
            outcome = dict(state=state.PRUNED)
        else:
            return
        for key, attr in [("dev_accuracy", dev_accuracy), ("epochs", age),
                          ("diverged", diverged), ("lineage", slot.lineage),
                          ("hyper", {n: _plain(v) for n, v in slot.values.items()})]:
            trial.set_user_attr(key, attr)
        self.study.tell(trial, **outcome)
        self.heartbeat.remove(trial._trial_id)  # noqa: SLF001
        self.slots[k] = None
        self.done += 1
        if self.progress is not None:
            try:
                best = self.study.best_value
            except ValueError:  # no COMPLETE trial yet (all pruned so far)
                best = math.nan
            self.progress(self.finished(), self.n_trials, best)

    def _exploit_and_explore(self, dev_loss):
        active = [k for k, slot in enumerate(self.slots) if slot is not None]
        values = {name: np.array([self.slots[k].values[name] for k in active], object)
                  for name in self.space}
        copies = pbt(self.population, dev_loss[active], values, self.space, self.rng, models=active)
        for dst, src in copies:
            slot, source = self.slots[dst], self.slots[src]
            slot.values = {name: values[name][active.index(dst)] for name in self.space}
            slot.lineage = source.lineage + [[self.population.epoch, source.trial.number]]


def pbt(run, dev_loss, values, space, rng, models=None, factors=(0.8, 1.2),
        resample_probability=0.25):
    """Population-based training on a :class:`fastdl.training.Population` ``run``: exploit,
    then explore. Returns the copies made, [(dst, src), ...] (model indices of ``run``).

    ``models``: the models taking part (default all K), whose dev losses ``dev_loss`` and
    hyperparameters ``values`` ({name: array of len(models)} in ``space``'s names; updated in
    place) are given in that order. The q = min(ceil(n / 4), n // 2) models with the highest
    dev loss (NaN counts as highest) each copy everything of a model drawn from the q with
    the lowest (``run.copy``: parameters, optimizer state and step count, statistics, dropout
    stream, hyperparameters, age), then perturb the copy's hyperparameters: each continuous one
    with probability ``resample_probability`` resampled from its sampler, else multiplied by a
    factor drawn from ``factors`` on its own scale (the value for ``loguniform`` / ``uniform``,
    1 - beta for ``beta_range``) and clamped to its range; a ``choice`` moves to a neighbouring
    option. With ``factors=(1, 1)`` and ``resample_probability=0`` a copy continues bit for bit
    as its source. (Ray Tune's PBT uses the same quantile, factors and probability.)"""
    models = list(range(run.n_models)) if models is None else list(models)
    n = len(models)
    q = min(math.ceil(n / 4), n // 2)
    if q == 0:
        return []
    order = np.argsort(np.where(np.isnan(dev_loss), np.inf, dev_loss), kind="stable")
    best, worst = order[:q], order[n - q:]
    copies = []
    for i in worst:
        j = int(rng.choice(best))
        dst, src = models[i], models[j]
        run.copy(src, dst)
        for name, sampler in space.items():
            values[name][i] = _perturbed(sampler, values[name][j], rng, factors,
                                         resample_probability)
        changed = {name: float(values[name][i]) for name in space
                   if values[name][i] != values[name][j]}
        if changed:
            run.set_hyper(dst, changed)
        copies.append((dst, src))
    return copies


def _perturbed(sampler, value, rng, factors, resample_probability):
    """PBT's explore step for one hyperparameter (see :func:`pbt`)."""
    if isinstance(sampler, choice):
        i = sampler.options.index(value) + int(rng.choice([-1, 1]))
        return sampler.options[min(max(i, 0), len(sampler.options) - 1)]
    if rng.random() < resample_probability:
        return _plain(sampler.sample(rng, 1)[0])
    factor = float(rng.choice(factors))
    if factor == 1:
        return value  # exactly: no round trip through the sampler's scale
    # on the sampler's own scale: the value itself, or 1 - beta for beta_range
    scaled = (1 - value) * factor if isinstance(sampler, beta_range) else value * factor
    new = 1 - scaled if isinstance(sampler, beta_range) else scaled
    return float(min(max(new, sampler.lo), sampler.hi))


def study_records(study, space):
    """The finished trials of ``study`` (COMPLETE and PRUNED) as records for
    :func:`leaderboard`, :func:`write_csv` and :func:`scatter`: trial number, state, dev loss
    (the objective), dev accuracy, epochs, whether it diverged, its PBT generation (copies in
    its lineage) and lineage, and its hyperparameters (at the end of training)."""
    import optuna

    records = []
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for trial in study.get_trials(deepcopy=False, states=states):
        attrs = trial.user_attrs
        hyper = attrs.get("hyper") or hyper_from_params(space, trial.params)
        lineage = attrs.get("lineage", [])
        records.append({"trial": trial.number, "state": trial.state.name.lower(),
                        **{name: hyper[name] for name in space},
                        "dev_loss": trial.value, "dev_accuracy": attrs.get("dev_accuracy"),
                        "epochs": attrs.get("epochs"), "diverged": attrs.get("diverged"),
                        "generation": len(lineage),
                        "lineage": " ".join(f"{e}:{t}" for e, t in lineage)})
    return records
