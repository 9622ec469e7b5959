"""Batch-norm benchmarks: forward + backward in training mode, float32, 2 threads; fastdl
(parallel and forced-serial kernels) vs the NumPy textbook version vs PyTorch CPU, one run
(cases in benchmarks/cases.py).

    python -m pytest benchmarks/test_batchnorm_bench.py --benchmark-enable \\
        --benchmark-json=benchmarks/batchnorm.json
    python benchmarks/report.py benchmarks/batchnorm.json
"""

import pytest

import cases


@pytest.mark.parametrize("implementation", cases.BATCHNORM_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases.BATCHNORM_CASES)
def test_batchnorm(benchmark, sized, case, implementation):
    spec = sized(cases.BATCHNORM_CASES[case])
    if implementation == "torch":
        pytest.importorskip("torch")
    step = cases.make_batchnorm_step(spec, implementation)
    if step is None:
        pytest.skip(f"{implementation} has no {spec.name} layout")
    step()  # compile outside the timing
    benchmark.group = f"batchnorm: {spec.name}"
    # forward: read x twice, write y; backward: read dy and x twice, write dx (8 passes)
    benchmark.extra_info.update(case=case, implementation=implementation,
                                bytes_moved=8 * 4 * spec.size)
    benchmark(step)
