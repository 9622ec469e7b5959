"""Hyperparameter search and population training: samplers on the right scale, coarse to fine,
records, and K models trained as one population equal to K separate runs."""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fastdl import data, nn, training, tune


def test_loguniform_samples_every_decade_alike():
    values = tune.loguniform(1e-4, 1e-1).sample(np.random.default_rng(0), 30_000)
    assert values.min() >= 1e-4 and values.max() <= 1e-1
    decades = np.histogram(np.log10(values), bins=[-4, -3, -2, -1])[0] / len(values)
    np.testing.assert_allclose(decades, 1 / 3, atol=0.015)


def test_beta_range_samples_one_minus_beta_on_a_log_scale():
    values = tune.beta_range(0.9, 0.999).sample(np.random.default_rng(1), 30_000)
    assert values.min() >= 0.9 and values.max() <= 0.999
    # as many between 0.9 and 0.99 as between 0.99 and 0.999
    np.testing.assert_allclose(np.mean(values < 0.99), 0.5, atol=0.015)


def test_uniform_and_choice():
    rng = np.random.default_rng(2)
    values = tune.uniform(0.0, 0.5).sample(rng, 20_000)
    np.testing.assert_allclose(np.mean(values < 0.25), 0.5, atol=0.015)
    picks = tune.choice(["adam", "sgd"]).sample(rng, 1000)
    assert set(picks) == {"adam", "sgd"}


def test_random_search_is_seeded_and_records_plain_values():
    space = {"lr": tune.loguniform(1e-4, 1e-1), "beta": tune.beta_range(0.8, 0.99),
             "kind": tune.choice(["a", "b"])}
    first = tune.random_search(space, 5, seed=3)
    assert first == tune.random_search(space, 5, seed=3)
    assert first != tune.random_search(space, 5, seed=4)
    assert len(first) == 5 and all(set(r) == {"lr", "beta", "kind"} for r in first)
    assert all(isinstance(r["lr"], float) for r in first)


def test_coarse_to_fine_narrows_around_the_best():
    space = {"lr": tune.loguniform(1e-5, 1.0), "beta": tune.beta_range(0.5, 0.9999),
             "dropout": tune.uniform(0.0, 0.5)}
    results = tune.random_search(space, 40, seed=0)
    for r in results:  # the best are near lr 1e-3, beta 0.99, dropout 0.1
        r["dev_accuracy"] = -abs(math.log10(r["lr"]) + 3) - abs(math.log10(1 - r["beta"]) + 2) \
            - abs(r["dropout"] - 0.1)
    finer = tune.coarse_to_fine(space, results, keep=0.25)
    top = tune.best(results, keep=10)
    for name in space:
        assert finer[name].lo <= min(r[name] for r in top)
        assert finer[name].hi >= max(r[name] for r in top)
        assert finer[name].lo >= space[name].lo and finer[name].hi <= space[name].hi
    assert finer["lr"].hi / finer["lr"].lo < space["lr"].hi / space["lr"].lo
    assert type(finer["beta"]) is tune.beta_range


def test_best_puts_nan_last_and_leaderboard_and_csv(tmp_path):
    results = [{"lr": 0.1, "dev_accuracy": math.nan}, {"lr": 0.01, "dev_accuracy": 0.9},
               {"lr": 0.001, "dev_accuracy": 0.95}]
    assert [r["lr"] for r in tune.best(results)] == [0.001, 0.01, 0.1]
    board = tune.leaderboard(results).splitlines()
    assert "dev_accuracy" in board[0] and board[2].split()[1] == "0.001"
    path = tune.write_csv(results, tmp_path / "r.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in rows] == [0.1, 0.01, 0.001]


@pytest.mark.parametrize("call, error", [
    (lambda: tune.loguniform(0.0, 1.0), ValueError),
    (lambda: tune.loguniform(1.0, 0.1), ValueError),
    (lambda: tune.beta_range(0.9, 1.0), ValueError),
    (lambda: tune.uniform("a", 1), TypeError),
    (lambda: tune.choice([]), ValueError),
    (lambda: tune.random_search({"lr": 0.1}, 3), TypeError),
    (lambda: tune.random_search({"lr": tune.uniform(0, 1)}, 0), ValueError),
])
def test_bad_input(call, error):
    with pytest.raises(error):
        call()


# -- populations --------------------------------------------------------------------------------

HYPER = dict(lr=np.array([1e-3, 3e-3, 1e-2]), beta1=np.array([0.9, 0.8, 0.95]),
             beta2=np.array([0.999, 0.99, 0.9999]), weight_decay=np.array([1e-4, 1e-3, 0.0]))
DROPOUT = np.array([0.1, 0.3, 0.0])
SEEDS = [5, 6, 7]


@pytest.fixture(scope="module")
def splits():
    return data.load_digits(seed=0)


def test_population_model_k_equals_a_separate_run_of_model_k(splits):
    population = training.build_network(population=3, dropout=DROPOUT, seed=SEEDS)
    snapshots = []  # the parameters after each epoch: train() keeps its best epoch's

    def snapshot(epoch, history):
        snapshots.append([p.copy() for p in population.params()])

    history = training.train_population(population, splits, HYPER, epochs=2, seed=1,
                                        progress=snapshot)
    assert not history.frozen.any()
    for k in range(3):
        alone = training.build_network(dropout=float(DROPOUT[k]), seed=SEEDS[k])
        separate = training.train(alone, splits, epochs=2, seed=1, patience=100,
                              hyper={name: float(v[k]) for name, v in HYPER.items()})
        np.testing.assert_allclose([h[k] for h in history.train_loss], separate.train_loss,
                                   rtol=1e-4)
        np.testing.assert_allclose([h[k] for h in history.dev_loss], separate.dev_loss,
                                   rtol=1e-4)
        best_epoch = int(np.argmin(separate.dev_loss))
        for p_population, p_alone in zip(snapshots[best_epoch], alone.params()):
            np.testing.assert_allclose(p_population[k], p_alone, rtol=1e-4, atol=1e-5)


def test_a_diverging_model_is_frozen_and_the_others_train_on(splits):
    hyper = {k: v[:2].copy() for k, v in HYPER.items()}
    hyper["lr"][1] = 1e38  # overflows at once
    population = training.build_network(population=2, dropout=DROPOUT[:2], seed=SEEDS[:2])
    history = training.train_population(population, splits, hyper, epochs=2, seed=1)
    assert history.frozen.tolist() == [False, True]
    alone = training.build_network(dropout=float(DROPOUT[0]), seed=SEEDS[0])
    separate = training.train(alone, splits, epochs=2, seed=1, patience=100,
                          hyper={name: float(v[0]) for name, v in HYPER.items()})
    np.testing.assert_allclose([h[0] for h in history.dev_loss], separate.dev_loss, rtol=1e-4)


def test_train_population_takes_k_from_the_model(splits):
    model = training.build_network(population=3, dropout=DROPOUT, seed=SEEDS)
    assert training.model_count(model) == 3
    assert training.model_count(training.build_network()) is None
    # one number for a hyperparameter is every model's; K comes from the model, not from lr
    history = training.train_population(model, splits, {"lr": 2e-3}, epochs=1, population=3)
    assert history.dev_loss[0].shape == (3,) and history.lr[0].shape == (3,)
    loss, accuracy = training.evaluate(model, *splits[1])
    assert loss.shape == accuracy.shape == (3,)
    np.testing.assert_allclose(loss, history.dev_loss[0], rtol=1e-6)
    with pytest.raises(ValueError, match="population must be the model's number of models 3"):
        training.train_population(model, splits, {}, epochs=1, population=2)
    with pytest.raises(ValueError, match="use train_population"):
        training.train(model, splits, epochs=1)


def test_population_layers_take_a_shared_batch_or_one_per_model(rng):
    layer = nn.Linear(4, 3, population=2, seed=[1, 2], dtype=np.float64)
    x = rng.standard_normal((5, 4))
    y_shared = layer.forward(x).copy()
    y_each = layer.forward(np.ascontiguousarray(np.broadcast_to(x, (2, 5, 4)))).copy()
    np.testing.assert_array_equal(y_shared, y_each)
    for k, seed in enumerate([1, 2]):
        alone = nn.Linear(4, 3, seed=seed, dtype=np.float64)
        np.testing.assert_allclose(y_shared[k], alone.forward(x), rtol=1e-12)
    with pytest.raises(ValueError, match="one batch per model"):
        layer.forward(np.zeros((3, 5, 4)))


def test_tune_command_runs_two_rounds_and_reports(tmp_path):
    out = tmp_path / "tune"
    result = subprocess.run([sys.executable, "-m", "fastdl", "tune", "--models", "4",
                             "--rounds", "2", "--epochs", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FASTDL_DEVICE": "cpu"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("device: cpu")
    assert sum(line.startswith("round ") for line in lines) == 2
    assert any("leaderboard" in line for line in lines)
    assert lines[-1].startswith("best: dev accuracy 0.")
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["round"] for r in rows} == {"1", "2"}
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"
