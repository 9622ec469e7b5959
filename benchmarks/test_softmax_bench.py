"""Softmax cross-entropy (loss + gradient, mean over index targets) and dropout (forward +
backward) benchmarks, float32, 2 threads: fastdl (parallel and forced-serial kernels) vs the
NumPy textbook version vs PyTorch CPU, one run (cases in benchmarks/cases.py).

    python -m pytest benchmarks/test_softmax_bench.py --benchmark-enable \\
        --benchmark-json=benchmarks/softmax.json
    python benchmarks/report.py benchmarks/softmax.json
"""

import pytest

import cases


def _run(benchmark, group, case, key, implementation, make_step, bytes_per_element):
    if implementation == "torch":
        pytest.importorskip("torch")
    step = make_step(case, implementation)
    step()  # compile outside the timing
    benchmark.group = f"{group}: {case.name}"
    benchmark.extra_info.update(case=key, implementation=implementation,
                                bytes_moved=bytes_per_element * case.size)
    benchmark(step)


@pytest.mark.parametrize("implementation", cases.SOFTMAX_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases.SOFTMAX_CASES)
def test_softmax_cross_entropy(benchmark, sized, case, implementation):
    # read the logits once, write the gradient once
    _run(benchmark, "cross-entropy", sized(cases.SOFTMAX_CASES[case]), case, implementation,
         cases.make_softmax_step, 8)


@pytest.mark.parametrize("implementation", cases.SOFTMAX_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases.DROPOUT_CASES)
def test_dropout(benchmark, sized, case, implementation):
    # forward: read x, write y and the mask; backward: read dy and the mask, write dx
    _run(benchmark, "dropout", sized(cases.DROPOUT_CASES[case]), case, implementation,
         cases.make_dropout_step, 18)
