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

import numpy as np

from . import _validate, training


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


def scatter(results, x, y, metric="dev_accuracy", path="search.png", space=None):
    """The notes' picture of random search: each result at (x, y), coloured by ``metric``;
    axes on a log scale for loguniform hyperparameters (when ``space`` is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    values = np.array([r.get(metric, np.nan) for r in results], np.float64)
    points = ax.scatter([r[x] for r in results], [r[y] for r in results], c=values,
                        cmap="viridis", edgecolors="k", linewidths=0.5)
    fig.colorbar(points, label=metric)
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
    log scale, the dropout rate linearly."""
    return {"lr": loguniform(*LEARNING_RATES[optimizer]), **BETAS[optimizer],
            "weight_decay": loguniform(1e-6, 1e-2), "dropout": uniform(0.0, 0.5)}


def search_round(space, splits, n_models, epochs, optimizer="adam", seed=0, round_index=0,
                 device=None):
    """Sample ``n_models`` configurations and train them as one population on ``splits``;
    returns their records (the configuration, dev accuracy and loss of the last epoch, whether
    the model diverged and was frozen) and the seconds it took (:mod:`fastdl.training` builds
    and trains them)."""
    values = sample_space(space, n_models, seed=(seed, round_index))
    model_seeds = [seed * 1000 + round_index * n_models + k for k in range(n_models)]
    model = training.build_network(dropout=np.asarray(values["dropout"], np.float64),
                                   seed=model_seeds, population=n_models, device=device)
    hyper = {name: v for name, v in values.items() if name != "dropout"}
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
