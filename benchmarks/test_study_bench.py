"""Optuna studies (issue 15): 64 trials of the demo network, 10 epochs each, time to finish the
study. fastdl's populations (1 worker x 16 models) against Optuna's ordinary use,
``study.optimize`` with one model per trial, in fastdl and in PyTorch; 2 workers x 8 against
1 worker x 16 (whole ``python -m fastdl tune`` commands); with a median pruner, pruned slots
refilled at once against rounds of 16 (trials finished per second).

    python -m pytest benchmarks/test_study_bench.py --benchmark-enable \\
        --benchmark-json=benchmarks/study.json
    python benchmarks/report.py benchmarks/study.json
"""

import shutil
import subprocess

import pytest

import cases
from helpers import require

require("optuna")


@pytest.mark.parametrize("implementation", cases.STUDY_IMPLEMENTATIONS)
def test_study(benchmark, sized, implementation):
    if implementation.endswith("torch-per-trial"):
        require("torch")
    case = sized(cases.STUDY_CASES["study_64"])
    run = cases.make_study_run(case, implementation)
    benchmark.group = f"study: {case.name}"
    benchmark.extra_info.update(case="study_64", implementation=implementation,
                                bytes_moved=0, n_trials=case.n_trials)
    study = benchmark.pedantic(run, rounds=1 if benchmark.disabled else 2, iterations=1,
                               warmup_rounds=0 if benchmark.disabled else 1)
    assert len(study.trials) >= case.n_trials


@pytest.mark.parametrize("key", ["study_64_median_refill", "study_64_median_rounds"])
def test_study_with_a_pruner(benchmark, sized, key):
    case = sized(cases.STUDY_CASES[key])
    run = cases.make_study_run(case, "fastdl-population")
    benchmark.group = "study: 64 trials, median pruner"
    benchmark.extra_info.update(case=key, implementation="fastdl-population", bytes_moved=0,
                                n_trials=case.n_trials)
    study = benchmark.pedantic(run, rounds=1 if benchmark.disabled else 2, iterations=1,
                               warmup_rounds=0 if benchmark.disabled else 1)
    assert len(study.trials) >= case.n_trials


@pytest.mark.parametrize("workers, models", [(1, 16), (2, 8)])
def test_study_workers(benchmark, sized, tmp_path, workers, models):
    case = sized(cases.STUDY_CASES["study_64"])
    models = models if not benchmark.disabled else 2
    out = tmp_path / "study"

    def run():
        shutil.rmtree(out, ignore_errors=True)
        result = subprocess.run(cases.tune_command(case, workers, models, out),
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-2000:]

    benchmark.group = "study: workers (whole python -m fastdl tune commands)"
    benchmark.extra_info.update(case="study_workers", implementation=f"{workers}x{models}",
                                bytes_moved=0, n_trials=case.n_trials)
    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 2, iterations=1,
                       warmup_rounds=0 if benchmark.disabled else 1)
