"""Optuna studies trained as populations (fastdl.tune.optimize and ``python -m fastdl tune
--trials``): the distributions, pruning with slot refill, PBT, several workers sharing a study
on the journal file and on a real PostgreSQL server, a worker killed mid-population, and the
errors raised before any training.

PostgreSQL: .ci/run starts a server and sets FASTDL_TEST_POSTGRES_URL; elsewhere the tests that
need it are skipped (under CI=true they fail instead).
"""

import csv
import math
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from fastdl import data, training, tune

from helpers import require

optuna = require("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)

POSTGRES = os.environ.get("FASTDL_TEST_POSTGRES_URL")


@pytest.fixture(scope="module")
def splits():
    (X, y), dev, test = data.load_digits(seed=0)
    return (X[:256], y[:256]), dev, test  # 4 mini-batches an epoch


@pytest.fixture
def postgres_url():
    if POSTGRES is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true: FASTDL_TEST_POSTGRES_URL is not set (.ci/run starts the "
                        "PostgreSQL server and sets it)")
        pytest.skip("no PostgreSQL server: set FASTDL_TEST_POSTGRES_URL (.ci/run does)")
    return POSTGRES


SPACE = tune.default_space("adam")


# -- distributions -------------------------------------------------------------------------------

def test_distributions_are_the_samplers_on_the_same_scale():
    space = {"lr": tune.loguniform(1e-4, 1e-1), "beta1": tune.beta_range(0.8, 0.99),
             "dropout": tune.uniform(0.0, 0.5), "width": tune.choice([64, 128])}
    d = tune.optuna_distributions(space)
    assert d["lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert d["one_minus_beta1"] == optuna.distributions.FloatDistribution(
        1 - 0.99, 1 - 0.8, log=True)
    assert d["dropout"] == optuna.distributions.FloatDistribution(0.0, 0.5)
    assert d["width"] == optuna.distributions.CategoricalDistribution([64, 128])
    hyper = tune.hyper_from_params(space, {"lr": 1e-3, "one_minus_beta1": 0.1, "dropout": 0.2,
                                           "width": 64})
    assert hyper == {"lr": 1e-3, "beta1": 0.9, "dropout": 0.2, "width": 64}
    # a random trial's values lie in fastdl's ranges
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = tune.hyper_from_params(space, study.ask(d).params)
        assert 1e-4 <= values["lr"] <= 1e-1 and 0.8 <= values["beta1"] <= 0.99


# -- one worker, in this process -----------------------------------------------------------------

def test_a_study_ends_with_n_finished_trials_told_their_dev_loss(splits):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(constant_liar=True, seed=0))
    seen = []
    tune.optimize(study, SPACE, 7, population=3, epochs=2, splits=splits,
                  progress=lambda finished, n, best: seen.append((finished, n)))
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 7 and seen[-1] == (7, 7)
    for trial in trials:
        assert trial.user_attrs["epochs"] == 2 and 0 < trial.user_attrs["dev_accuracy"] <= 1
        assert sorted(trial.intermediate_values) == [0, 1]
        assert trial.value == trial.intermediate_values[1]  # the last epoch's dev loss
        assert trial.user_attrs["seed"] == training.nn.spawn_seed(0, trial.number)
        assert trial.user_attrs["hyper"] == pytest.approx(
            tune.hyper_from_params(SPACE, trial.params))


def test_a_trial_equals_its_model_trained_alone(splits):
    """A trial told by optimize is the model its params and seed build, trained alone on the
    same batches (a slot refilled mid-run included: population 2, 4 trials)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    tune.optimize(study, SPACE, 4, population=2, epochs=2, splits=splits, seed=3)
    for trial in study.trials:
        hyper = tune.hyper_from_params(SPACE, trial.params)
        run = training.Population(training.build_network(population=1), splits, seed=3)
        run.epoch = 2 * (trial.number // 2)  # the population epoch the slot (re)started at
        run.restart(0, trial.user_attrs["seed"], hyper)
        for _ in range(2):
            run.train_epoch()
        dev_loss, _ = run.evaluate()
        np.testing.assert_allclose(trial.value, dev_loss[0], rtol=1e-4)


def test_pruned_slots_are_refilled_until_n_trials_finish(splits):
    # prunes every trial at its first report: each slot is refilled at once, every epoch
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    tune.optimize(study, SPACE, 9, population=3, epochs=5, splits=splits)
    pruned = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert len(pruned) == 9 and len(study.trials) == 9
    assert all(t.user_attrs["epochs"] == 1 and list(t.intermediate_values) == [0]
               for t in pruned)


def test_a_diverging_trial_is_told_inf_at_once(splits):
    space = dict(SPACE, lr=tune.loguniform(1e30, 1e31))  # overflows in the first epoch
    study = optuna.create_study()
    tune.optimize(study, space, 2, population=2, epochs=3, splits=splits)
    for trial in study.trials:
        assert trial.value == math.inf and trial.user_attrs["diverged"]
        assert trial.user_attrs["epochs"] == 1


def test_pbt_copies_the_best_over_the_worst_and_records_lineage(splits):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    tune.optimize(study, SPACE, 4, population=4, epochs=4, splits=splits, pbt=True,
                  pbt_interval=2)
    lineages = [t.user_attrs["lineage"] for t in study.trials]
    copied = [lineage for lineage in lineages if lineage]
    assert len(copied) == 1  # q = min(ceil(4 / 4), 4 // 2) = 1 copy at epoch 2
    epoch, source = copied[0][0]
    assert epoch == 2 and source in [t.number for t in study.trials]
    records = tune.study_records(study, SPACE)
    assert sorted(r["generation"] for r in records) == [0, 0, 0, 1]


def test_pbt_without_perturbation_continues_the_copy_bit_for_bit(splits):
    run = training.Population(training.build_network(population=4, seed=[1, 2, 3, 4]), splits)
    run.train_epoch()
    dev_loss, _ = run.evaluate()
    values = {name: np.array([float(sampler.sample(np.random.default_rng(k), 1)[0])
                              for k in range(4)], object) for name, sampler in SPACE.items()}
    for k in range(4):
        run.set_hyper(k, {name: float(v[k]) for name, v in values.items()})
    copies = tune.pbt(run, dev_loss, values, SPACE, np.random.default_rng(0),
                      factors=(1, 1), resample_probability=0)
    (dst, src), = copies
    assert dev_loss[src] == dev_loss.min() and dev_loss[dst] == dev_loss.max()
    assert all(values[name][dst] == values[name][src] for name in SPACE)
    for _ in range(2):
        losses = run.train_epoch()
        assert losses[dst] == losses[src]
    for p in run.model.params():
        np.testing.assert_array_equal(p[dst], p[src])


def test_pbt_perturbs_on_each_samplers_scale():
    rng = np.random.default_rng(0)
    beta = tune.beta_range(0.9, 0.999)
    moved = {tune._perturbed(beta, 0.99, rng, (0.8, 1.2), 0.0) for _ in range(50)}
    assert sorted(moved) == pytest.approx([1 - 0.01 * 1.2, 1 - 0.01 * 0.8])  # 1 - beta scaled
    lr = tune.loguniform(1e-3, 1e-1)
    assert tune._perturbed(lr, 0.095, rng, (1.2, 1.2), 0.0) == 0.1  # clamped to the range
    pick = tune.choice([16, 32, 64])
    assert {tune._perturbed(pick, 32, rng, (0.8, 1.2), 0.0) for _ in range(50)} == {16, 64}


def test_optunas_visualizations_work_on_the_study(splits, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    tune.optimize(study, SPACE, 6, population=3, epochs=2, splits=splits)
    for plot in (plots.plot_optimization_history, plots.plot_intermediate_values,
                 plots.plot_param_importances, plots.plot_slice):
        axes = plot(study)
        figure = np.ravel(axes)[0].figure
        figure.savefig(tmp_path / f"{plot.__name__}.png")
        matplotlib.pyplot.close(figure)


# -- errors before any training ------------------------------------------------------------------

def test_a_study_of_another_direction_or_space_is_an_error(splits):
    with pytest.raises(ValueError, match="direction \\['maximize'\\].*minimize"):
        tune.optimize(optuna.create_study(direction="maximize"), SPACE, 2, splits=splits)
    study = optuna.create_study()
    tune.optimize(study, SPACE, 1, population=1, epochs=1, splits=splits)
    other = dict(SPACE, lr=tune.loguniform(1e-5, 1e-1))
    with pytest.raises(ValueError, match="another search space"):
        tune.optimize(study, other, 2, population=1, epochs=1, splits=splits)
    with pytest.raises(ValueError, match="cannot vary per model with adam: \\['momentum'\\]"):
        tune.optimize(study, dict(SPACE, momentum=tune.uniform(0, 1)), 2, splits=splits)
    assert len(study.trials) == 1  # nothing asked


def _tune(*flags, timeout=300, **popen):
    command = [sys.executable, "-m", "fastdl", "tune", "--device", "cpu", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **popen)


def test_an_unreachable_storage_is_a_clear_error_before_training(tmp_path):
    start = time.perf_counter()
    result = _tune("--trials", "4", "--storage", "postgresql://nobody:x@127.0.0.1:9/none",
                   "--out", str(tmp_path))
    assert result.returncode == 2
    assert "cannot open the storage 'postgresql://nobody:x@127.0.0.1:9/none'" in result.stderr
    assert "training" not in result.stdout and time.perf_counter() - start < 60


def test_study_flags_without_trials_are_a_usage_error(tmp_path):
    result = _tune("--pbt", "--out", str(tmp_path))
    assert result.returncode == 2 and "--pbt belongs to an Optuna study" in result.stderr


# -- several workers, and a worker killed ---------------------------------------------------------

def _finished(storage, name):
    study = optuna.load_study(study_name=name, storage=storage)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study, study.get_trials(states=states)


def _journal(out):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(out / "journal.log")))


def _check_two_workers(storage_flag, storage, name, out):
    trials = 12
    result = _tune("--trials", str(trials), "--models", "3", "--epochs", "2", "--workers", "2",
                   "--pruner", "median", "--study", name, "--out", str(out), *storage_flag)
    assert result.returncode == 0, result.stderr[-3000:]
    study, finished = _finished(storage, name)
    # at most (W - 1) * K more when the workers race for the last ones
    assert trials <= len(finished) <= trials + 3
    assert "worker 0" in result.stderr and "worker 1" in result.stderr  # a bar each
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["trial"]) for r in rows} <= {t.number for t in finished}
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert result.stdout.strip().splitlines()[-1].startswith("trials: ")


def test_two_workers_share_a_journal_file(tmp_path):
    _check_two_workers((), _journal(tmp_path), "fastdl-tune", tmp_path)


def test_two_workers_share_a_postgresql_study(postgres_url, tmp_path):
    name = f"two-workers-{uuid.uuid4().hex[:8]}"
    _check_two_workers(("--storage", postgres_url), postgres_url, name, tmp_path)


def _check_killed_worker(storage_flag, storage, name, out):
    """A worker killed with SIGKILL in the middle of a population: a re-run of the same command
    fails its trials (heartbeat stale), retries their parameters and ends with N finished."""
    trials = 6
    flags = ["--trials", str(trials), "--models", "3", "--epochs", "40", "--study", name,
             "--out", str(out), "--heartbeat", "0.5", "--stale-after", "2", *storage_flag]
    victim = subprocess.Popen([sys.executable, "-m", "fastdl", "tune", "--device", "cpu",
                               *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # until its population has reported an epoch
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                continue
            running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            if len(running) == 3 and all(t.intermediate_values for t in running):
                break
        else:
            pytest.fail("the first worker never started training")
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    killed = {t.number: t.params for t in running}
    # the re-run: shorter trials, so that the test ends soon (the same space and study)
    flags[flags.index("40")] = "2"
    result = _tune("--device", "cpu", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    study, finished = _finished(storage, name)
    assert trials <= len(finished) <= trials + 2
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert sorted(t.number for t in failed) == sorted(killed)
    retried = {t.system_attrs.get("failed_trial"): t for t in finished
               if "failed_trial" in t.system_attrs}
    assert set(retried) == set(killed)  # each dead trial's parameters ran again
    for number, trial in retried.items():
        assert trial.params == killed[number]
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def test_a_killed_worker_is_retried_on_the_journal_file(tmp_path):
    _check_killed_worker([], _journal(tmp_path), "fastdl-tune", tmp_path)


def test_a_killed_worker_is_retried_on_postgresql(postgres_url, tmp_path):
    name = f"killed-{uuid.uuid4().hex[:8]}"
    _check_killed_worker(["--storage", postgres_url], postgres_url, name, tmp_path)


def test_trials_without_storage_run_on_the_embedded_journal_file(tmp_path):
    result = _tune("--trials", "2", "--models", "2", "--epochs", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    _, finished = _finished(_journal(tmp_path), "fastdl-tune")
    assert len(finished) == 2 and "journal.log" in result.stdout
