"""Training many models at once ("Caviar"): K = 16 demo networks (64-256-128-10, batch 64,
10 epochs on the digits, random hyperparameters) as one fastdl population vs the same 16 one
after another with fastdl vs one after another in PyTorch CPU (cases in fastdl/bench.py).

    python -m pytest benchmarks/test_population_bench.py --benchmark-enable \\
        --benchmark-json=benchmarks/population.json
    python benchmarks/report.py benchmarks/population.json
"""

import pytest

from fastdl import bench


@pytest.mark.parametrize("implementation", bench.POPULATION_IMPLEMENTATIONS)
def test_population(benchmark, implementation):
    if implementation.startswith("torch"):
        pytest.importorskip("torch")
    # the normal test run (benchmarks disabled) only smoke-tests a small case
    n_models, epochs = (16, 10) if not benchmark.disabled else (2, 1)
    run = bench.make_population_run(implementation, n_models, epochs)
    run()  # compile and warm up outside the timing
    benchmark.group = "population: 16 demo networks, 10 epochs"
    benchmark.extra_info.update(case="population_16", implementation=implementation,
                                bytes_moved=0)
    benchmark.pedantic(run, rounds=3, iterations=1)
