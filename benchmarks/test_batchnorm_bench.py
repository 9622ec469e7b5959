"""Batch-norm benchmarks: forward + backward in training mode, float32, 2 threads; fastdl
(parallel and forced-serial kernels) vs the NumPy textbook version vs PyTorch CPU, one run
(cases in fastdl/bench.py).

    python -m pytest benchmarks/test_batchnorm_bench.py --benchmark-enable \\
        --benchmark-json=benchmarks/batchnorm.json
    python benchmarks/report.py benchmarks/batchnorm.json
"""

import pytest

from fastdl import bench


@pytest.mark.parametrize("implementation", bench.BATCHNORM_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", bench.BATCHNORM_CASES)
def test_batchnorm(benchmark, case, implementation):
    spec = bench.BATCHNORM_CASES[case]
    if implementation == "torch":
        pytest.importorskip("torch")
    step = bench.make_batchnorm_step(spec, implementation)
    if step is None:
        pytest.skip(f"{implementation} has no {spec.name} layout")
    step()  # compile outside the timing
    benchmark.group = f"batchnorm: {spec.name}"
    # forward: read x twice, write y; backward: read dy and x twice, write dx (8 passes)
    benchmark.extra_info.update(case=case, implementation=implementation,
                                bytes_moved=8 * 4 * spec.size)
    benchmark(step)
