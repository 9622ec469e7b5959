"""Training many models at once ("Caviar"): K = 16 demo networks (64-256-128-10, batch 64,
10 epochs on the digits, random hyperparameters) as one fastdl population vs the same 16 one
after another with fastdl vs one after another in PyTorch CPU (cases in benchmarks/cases.py).

    python -m pytest benchmarks/test_population_bench.py --benchmark-enable \\
        --benchmark-json=benchmarks/population.json
    python benchmarks/report.py benchmarks/population.json
"""

import pytest

import cases


@pytest.mark.parametrize("implementation", cases.POPULATION_IMPLEMENTATIONS)
def test_population(benchmark, implementation):
    if implementation.startswith("torch"):
        pytest.importorskip("torch")
    # the normal test run (benchmarks disabled) only smoke-tests a small case
    n_models, epochs, n_examples = (16, 10, None) if not benchmark.disabled else (2, 1, 256)
    run = cases.make_population_run(implementation, n_models, epochs, n_examples=n_examples)
    run()  # compile and warm up outside the timing
    benchmark.group = "population: 16 demo networks, 10 epochs"
    benchmark.extra_info.update(case="population_16", implementation=implementation,
                                bytes_moved=0)
    benchmark.pedantic(run, rounds=3, iterations=1)
