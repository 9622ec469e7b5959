"""fastdl.torch against torch in one run: modules through autograd (forward + backward in
training mode), Adam's ``optimizer.step()`` against ``torch.optim.Adam(fused=True)``, and whole
training steps of a patched model against the plain one. float32, the machine's threads.

    python -m pytest benchmarks/test_torch_bench.py --benchmark-enable \
        --benchmark-json=benchmarks/torch.json && python benchmarks/report.py benchmarks/torch.json
"""

import pytest

import cases
from helpers import require


@pytest.mark.parametrize("implementation", cases.TORCH_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases.TORCH_CASES)
def test_torch_adapter(benchmark, sized, case, implementation):
    require("torch")
    spec = sized(cases.TORCH_CASES[case])
    step = cases.make_torch_step(spec, implementation)
    step()  # compile and allocate outside the timing
    step()
    benchmark.group = f"fastdl.torch: {spec.name}"
    benchmark.extra_info.update(case=case, implementation=implementation,
                                bytes_moved=spec.bytes_per_element * spec.size)
    benchmark(step)
