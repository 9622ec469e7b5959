"""One training epoch of a whole network: fastdl (fastdl.nn + fused Adam) vs the NumPy
textbook version vs PyTorch CPU (nn.Sequential, fused Adam), float32, one run (cases in
benchmarks/cases.py).

    python -m pytest benchmarks/test_training_bench.py --benchmark-enable \\
        --benchmark-json=benchmarks/training.json
    python benchmarks/report.py benchmarks/training.json
"""

import pytest

import cases


@pytest.mark.parametrize("implementation", cases.EPOCH_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases.EPOCH_CASES)
def test_epoch(benchmark, sized, case, implementation):
    if implementation == "torch":
        pytest.importorskip("torch")
    spec = sized(cases.EPOCH_CASES[case])
    epoch = cases.make_epoch_step(spec, implementation)
    epoch()  # compile and warm up outside the timing
    benchmark.group = f"epoch: {spec.name}"
    benchmark.extra_info.update(case=case, implementation=implementation, bytes_moved=0)
    benchmark.pedantic(epoch, rounds=5, iterations=1)
