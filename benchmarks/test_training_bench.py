"""One training epoch of a whole network: fastdl (fastdl.nn + fused Adam) vs the NumPy
textbook version vs PyTorch CPU (nn.Sequential, fused Adam), float32, one run (cases in
fastdl/bench.py).

    python -m pytest benchmarks/test_training_bench.py --benchmark-enable \\
        --benchmark-json=benchmarks/training.json
    python benchmarks/report.py benchmarks/training.json
"""

import pytest

from fastdl import bench


@pytest.mark.parametrize("implementation", bench.EPOCH_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", bench.EPOCH_CASES)
def test_epoch(benchmark, case, implementation):
    if implementation == "torch":
        pytest.importorskip("torch")
    spec = bench.EPOCH_CASES[case]
    epoch = bench.make_epoch_step(spec, implementation)
    epoch()  # compile and warm up outside the timing
    benchmark.group = f"epoch: {spec.name}"
    benchmark.extra_info.update(case=case, implementation=implementation, bytes_moved=0)
    benchmark.pedantic(epoch, rounds=5, iterations=1)
