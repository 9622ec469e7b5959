import numpy as np
import pytest

from helpers import fail_hidden_skips


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    fail_hidden_skips(item, call, (yield))
