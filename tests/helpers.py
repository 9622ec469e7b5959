"""Comparison helpers shared by the CPU and CUDA test suites."""

import numpy as np

# SPEC.md's tolerances: optimizers after >= 10 steps.
OPTIM_TOLERANCE = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}


def assert_close(got, want, dtype, tolerance=None, what=""):
    """Elementwise |got - want| <= atol + rtol * |want|, with the failing element reported."""
    tol = (tolerance or OPTIM_TOLERANCE)[np.dtype(dtype).type]
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, err_msg=what, **tol)

# SPEC.md's tolerances: softmax and cross-entropy.
SOFTMAX_TOLERANCE = {np.float32: dict(rtol=3e-4, atol=1e-6),
                     np.float64: dict(rtol=1e-9, atol=1e-11)}


def require(module):
    """``import module``, or skip the test file when it is missing, except under CI=true,
    where the required parts (torch, optuna, PostgreSQL's driver, mpi4py) are installed by
    .ci/run and a missing one must fail the run, never hide behind a skip."""
    import importlib
    import os

    import pytest

    if os.environ.get("CI", "").lower() == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def fail_hidden_skips(item, call, outcome):
    """The body of a ``pytest_runtest_makereport`` hook wrapper: under CI=true, a test skipped
    because a module could not be imported (``pytest.importorskip``) fails instead."""
    import os

    report = outcome.get_result()
    if (os.environ.get("CI", "").lower() == "true" and report.skipped
            and "could not import" in str(report.longrepr)):
        report.outcome = "failed"
        report.longrepr = f"CI=true: a required module is missing: {report.longrepr}"


class ThreadRanks:
    """W "ranks" as threads of this process, for testing code written against
    ``fastdl.distributed``'s communicator without MPI: ``run(fn)`` calls ``fn(comm)`` on W
    threads, each with a communicator whose ``allreduce`` sums (in place, in rank order, the
    same bits everywhere) what the W threads pass at the same point; returns the W results."""

    def __init__(self, size):
        import threading

        self.size = size
        self._barrier = threading.Barrier(size)
        self._slots = [None] * size

    def run(self, fn):
        import threading

        results, errors = [None] * self.size, []

        def target(rank):
            try:
                results[rank] = fn(_ThreadComm(self, rank))
            except BaseException as error:  # noqa: BLE001 (re-raised below)
                errors.append(error)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class _ThreadComm:
    def __init__(self, ranks, rank):
        self._ranks, self.rank, self.size = ranks, rank, ranks.size

    def allreduce(self, array):
        ranks = self._ranks
        ranks._slots[self.rank] = array.copy()
        ranks._barrier.wait()
        total = ranks._slots[0].copy()
        for other in ranks._slots[1:]:
            total += other
        ranks._barrier.wait()  # everyone has read the slots before they are reused
        array[...] = total
        return array
