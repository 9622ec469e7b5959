"""The benchmark suite's shared pieces: ``cases`` (this folder, which is not a package) on the
import path, and the ``sized`` fixture.

In the normal test run (``--benchmark-disable``, pyproject's default) each benchmark runs once
at its case's small smoke size, as a check that it works; ``--benchmark-enable`` times the
full sizes the README's tables report.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import cases`, under any --import-mode
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # `import helpers`

from helpers import fail_hidden_skips  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    fail_hidden_skips(item, call, (yield))


@pytest.fixture
def sized(benchmark):
    """``sized(case)``: ``case`` itself when benchmarks are timed, else ``case.smoke()``."""
    return lambda case: case.smoke() if benchmark.disabled else case
