"""Low-precision optimizer state: an Adam step (lr 1e-3, float32 params) with ``state_dtype``
float32, bfloat16 and int8, on one tensor of 1e7 and of 1e8 elements and on 200 separate
tensors of 1e3-1e4; at 1e7 also bitsandbytes' CPU 8-bit Adam and PyTorch's ``fused=True``
Adam. Cases and variants in benchmarks/state_dtype.py, whose alternating rounds give the
README's table:

    python benchmarks/state_dtype.py                          # the README table
    python -m pytest benchmarks/test_state_dtype_bench.py --benchmark-enable \\
        --benchmark-json=benchmarks/state_dtype.json           # the same cases, pytest-benchmark

In the normal test run benchmarks are disabled: each case runs once at its smoke size (the
1e8 case at 1e5 elements), and the script once at its smoke sizes. Under CI=true bitsandbytes
and PyTorch must be installed (helpers.require).
"""

import pytest
import state_dtype  # benchmarks/state_dtype.py (conftest puts this folder on the path)

from helpers import require

# bitsandbytes' import: torch.jit.script_method
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

PAIRS = [(case, variant) for case, spec in state_dtype.CASES.items()
         for variant in spec.variants]

# state bytes per parameter on one tensor (int8: 2 codes + 2 absmax per 256, codes padded to
# whole blocks; bitsandbytes does not pad)
STATE_BYTES = {"fastdl-float32": (8, 8), "fastdl-bfloat16": (4, 4), "fastdl-int8": (2.03, 2.1),
               "bnb-adam8bit": (2.03, 2.1), "torch-fused": (8, 8)}


@pytest.mark.parametrize("case, variant", PAIRS)
def test_state_dtype(benchmark, sized, case, variant):
    if variant in state_dtype.BASELINES:
        require(state_dtype.BASELINES[variant])
    spec = sized(state_dtype.CASES[case])
    built = state_dtype.make_step(spec, variant)
    built.step()  # compile and allocate the state outside the timing
    per_param = built.state_per_param()
    if len(spec.shapes) == 1:
        low, high = STATE_BYTES[variant]
        assert low <= per_param <= high, f"{variant}: {per_param} state bytes per param"
    benchmark.group = f"state_dtype: Adam, {spec.name}"
    benchmark.extra_info.update(case=case, implementation=variant,
                                bytes_moved=built.bytes_per_element() * spec.size,
                                state_bytes_per_param=per_param)
    benchmark(built.step)


def test_state_dtype_script(capsys):
    """The script's table at its smoke sizes (its full run is by hand: the README's table)."""
    for module in set(state_dtype.BASELINES.values()):
        require(module)
    assert state_dtype.main(["--smoke", "--rounds", "2", "--budget", "0"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| one tensor")
            or line.startswith("| 200 separate")]
    assert len(rows) == len(PAIRS), out
    assert "| bitsandbytes `Adam8bit` |" in out and "| 8.000 | 28.00 |" in out
