"""Optimizer benchmarks: fastdl vs the NumPy textbook version vs PyTorch ``fused=True``, in one
run, float32, 2 threads, default options on both sides (cases in fastdl/jobs/bench.py, shared
with ``python -m fastdl bench``).

    python -m pytest benchmarks --benchmark-enable --benchmark-json=benchmarks/latest.json
    python benchmarks/report.py benchmarks/latest.json     # the README table

In the normal test run benchmarks are disabled: each case runs once at its small smoke size.
"""

import numpy as np
import pytest

from fastdl.jobs import bench


@pytest.mark.parametrize("implementation", bench.IMPLEMENTATIONS)
@pytest.mark.parametrize("case", bench.OPTIM_CASES)
def test_optim(benchmark, sized, case, implementation):
    if implementation == "torch":
        pytest.importorskip("torch")
    spec = sized(bench.OPTIM_CASES[case])
    step = bench.make_optim_step(spec, implementation)
    step()  # compile outside the timing
    benchmark.group = f"optim: {spec.name}"
    benchmark.extra_info.update(case=case, implementation=implementation,
                                bytes_moved=spec.bytes_per_element * spec.size)
    benchmark(step)


def test_memory_bandwidth(benchmark):
    """STREAM triad on all cores: the yardstick for the GB/s column, measured in the same run."""
    from fastdl.kernels.measure import triad

    n = 10_000 if benchmark.disabled else 10_000_000
    a, b, c = (np.ones(n, np.float32) for _ in range(3))
    triad(a, b, c, np.float32(3.0))
    benchmark.group = "machine: memory bandwidth"
    benchmark.extra_info.update(case="triad", implementation="numba", bytes_moved=12 * n)
    benchmark(triad, a, b, c, np.float32(3.0))
    np.testing.assert_array_equal(a[:3], 4.0)
