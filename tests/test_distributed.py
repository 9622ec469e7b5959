"""Data-parallel training over MPI (fastdl.distributed): the rows of each rank, the same bits
on every rank, and real ``mpiexec -n 2`` runs.

The MPI runs need mpi4py and an ``mpiexec`` (``pip install fastdl[mpi]``: mpi4py and MPICH);
.ci/run installs them, and under CI=true a missing one fails instead of skipping.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastdl import data, distributed

from helpers import require

HERE = Path(__file__).resolve().parent


def mpiexec(n, script, *args, timeout=300, extra=()):
    """Run ``tests/ranks/<script>`` (or, for ``script="-m"``, the module that follows) on
    ``n`` ranks; returns the CompletedProcess."""
    require("mpi4py")
    launcher = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) \
        or shutil.which("mpiexec")
    if launcher is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true: no mpiexec (.ci/run installs mpich)")
        pytest.skip("no mpiexec: pip install mpich")
    target = ["-m"] if script == "-m" else [str(HERE / "ranks" / script)]
    command = [launcher, *extra, "-n", str(n), sys.executable, *target, *map(str, args)]
    path = os.pathsep.join(filter(None, [str(HERE), str(HERE / "ranks"),
                                         os.environ.get("PYTHONPATH")]))
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": path})  # `import reference`


# -- without MPI ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_rows, world", [(64, 2), (10, 3), (2, 3), (0, 2), (7, 1)])
def test_rank_rows_split_a_batch_in_rank_order(n_rows, world):
    parts = [distributed.rank_rows(n_rows, r, world) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    sizes = [hi - lo for lo, hi in parts]
    assert max(sizes) - min(sizes) <= 1


def test_minibatches_of_the_ranks_make_up_the_global_batches():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((103, 3)), rng.integers(0, 5, 103)
    whole = list(data.minibatches(X, y, 16, seed=4))
    for world in (1, 2, 3):
        ranks = [list(data.minibatches(X, y, 16, seed=4, rank=r, world=world))
                 for r in range(world)]
        for b, (X_b, y_b) in enumerate(whole):
            np.testing.assert_array_equal(np.concatenate([ranks[r][b][0] for r in
                                                          range(world)]), X_b)
            np.testing.assert_array_equal(np.concatenate([ranks[r][b][1] for r in
                                                          range(world)]), y_b)


@pytest.mark.parametrize("call, error, match", [
    (lambda: distributed.rank_rows(8, 2, 2), ValueError, "rank must be in \\[0, 2\\)"),
    (lambda: distributed.rank_rows(-1, 0, 2), ValueError, "n_rows must be >= 0"),
    (lambda: distributed.rank_rows(8, 0, 0), ValueError, "world must be >= 1"),
    (lambda: list(data.minibatches(np.zeros((4, 2)), None, 2, rank=0)), ValueError,
     "rank and world go together"),
    (lambda: list(data.minibatches(np.zeros((4, 2)), None, 2, rank=1, world=1)), ValueError,
     "rank must be in"),
    (lambda: distributed.allreduce(np.zeros(3)), ValueError, "init\\(\\) has not been called"),
])
def test_bad_input(call, error, match, monkeypatch):
    monkeypatch.setattr(distributed, "_COMM", None)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # as if under mpiexec
    with pytest.raises(error, match=match):
        call()


def test_without_init_one_process_is_the_world():
    assert distributed.rank() == 0 and distributed.world_size() == 1
    grads = np.arange(4.0)
    assert distributed.allreduce(grads) is grads and list(grads) == [0, 1, 2, 3]
    assert distributed.global_denominator(5) == 5.0


# -- under mpiexec ---------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_collectives_give_every_rank_the_same_bits(world):
    result = mpiexec(world, "collectives.py")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines == [f"ok {world}"]  # rank 0 alone prints


@pytest.mark.parametrize("world, n_rows", [(2, 64), (2, 7), (3, 2)])
def test_synchronized_batch_norm_under_mpiexec(world, n_rows):
    """batch_norm_forward / backward(comm=) and nn.BatchNorm(sync=True) on each rank's rows
    equal one process's on the whole batch; running statistics the same bits on every rank
    (an uneven split, and a rank with no rows, included)."""
    result = mpiexec(world, "sync_batchnorm.py", n_rows)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines() == ["ok"]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torch_sync_batchnorm_under_ddp_trains_like_one_process(tmp_path):
    """fastdl.torch.SyncBatchNorm in a DistributedDataParallel model on 2 gloo processes
    (loopback, CPU, which PyTorch's own SyncBatchNorm refuses) ends where one process with
    torch.nn.BatchNorm1d ends on the whole batches."""
    torch = require("torch")
    sys.path.insert(0, str(HERE / "ranks"))
    try:
        from torch_model import STEPS, batches, model
    finally:
        sys.path.pop(0)
    port, out = _free_port(), tmp_path / "ranks.npz"
    path = os.pathsep.join(filter(None, [str(HERE / "ranks"), os.environ.get("PYTHONPATH")]))
    ranks = [subprocess.Popen([sys.executable, str(HERE / "ranks" / "torch_sync_batchnorm.py"),
                               str(r), "2", str(port), str(out)],
                              env={**os.environ, "PYTHONPATH": path},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in ranks:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for X, y in batches()[:STEPS]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    got = np.load(out)
    for key, value in net.state_dict().items():
        np.testing.assert_allclose(got[key], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("world, n_examples", [(2, 64), (2, 70), (3, 70)])
def test_data_parallel_training_equals_one_process_on_the_whole_batches(world, n_examples,
                                                                        tmp_path):
    """W ranks of fastdl.training.train (synchronized batch norm, dropout by global position,
    the gradient allreduce, Adam, early stopping) end with the parameters, running statistics
    and losses of one process on the whole batches (float64, 1e-9), an uneven last batch
    included (70 = 4 x 16 + 6)."""
    out = tmp_path / "ranks.npz"
    result = mpiexec(world, "train_small.py", n_examples, out)
    assert result.returncode == 0, result.stderr[-3000:]
    sys.path.insert(0, str(HERE / "ranks"))
    try:
        from small_run import run
    finally:
        sys.path.pop(0)
    history, model = run(n_examples)
    got = np.load(out)
    want = [*model.params(), *[s for layer in model.state_dict()["layers"]
                               for s in layer.values()]]
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[f"arr_{i}"], w, rtol=1e-9, atol=1e-11, err_msg=str(i))
    np.testing.assert_allclose(got["losses"], history.train_loss, rtol=1e-9)
    np.testing.assert_allclose(got["dev"], history.dev_loss, rtol=1e-9)


def _demo(n, *flags, extra=()):
    return mpiexec(n, "-m", "fastdl", "demo", "--data-parallel", "--no-progress", *flags,
                   extra=extra)


def _accuracies(stdout):
    lines = [line for line in stdout.splitlines() if "accuracy:" in line]
    values = [float(word) for line in lines for word in line.replace(":", " ").split()
              if word.replace(".", "").isdigit() and "." in word]
    return values  # train, dev, test


def test_the_demo_on_w_ranks_prints_the_single_process_accuracies(tmp_path):
    args = ("--epochs", "6", "--out", str(tmp_path))
    alone = subprocess.run([sys.executable, "-m", "fastdl", "demo", "--no-progress", *args],
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    one, two = _demo(1, *args), _demo(2, *args)
    for result in (one, two):
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("test accuracy") == 1  # rank 0 alone prints
    assert _accuracies(one.stdout) == _accuracies(alone.stdout)  # W = 1: identical
    # W = 2: float32 rounding in other orders; within a test example or two
    assert np.allclose(_accuracies(two.stdout), _accuracies(alone.stdout), atol=2 / 269 + 1e-9)


def _data_parallel_job(tmp_path, *extra):
    """A long data-parallel demo on 2 ranks: (the Popen, {rank: pid}) once it trains."""
    require("mpi4py")
    launcher = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) \
        or shutil.which("mpiexec")
    command = [launcher, *extra, "-n", "2", sys.executable, "-m", "fastdl", "demo",
               "--data-parallel", "--no-progress", "--epochs", "100000", "--patience",
               "100000", "--timeout", "4", "--out", str(tmp_path)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids, seen = None, []
    for line in job.stdout:
        seen.append(line)
        if line.startswith("data-parallel:"):
            pids = {int(rank): int(pid) for rank, pid in
                    re.findall(r"rank (\d+): \S+ pid (\d+)", line)}
        if line.startswith("epoch 2/"):
            break
    assert pids is not None and len(pids) == 2, "".join(seen)
    return job, pids, "".join(seen)


def test_a_killed_rank_ends_the_job_at_once_and_the_output_names_it(tmp_path):
    """MPICH's mpiexec ends the job when a rank's process dies; its message names the PID,
    which the demo's first lines map to the rank."""
    job, pids, head = _data_parallel_job(tmp_path)
    try:
        start = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=60)
        assert time.monotonic() - start < 30
    finally:
        job.kill()
    assert job.returncode != 0
    output = head + stdout + stderr
    assert f"PID {pids[1]}" in output and "rank 1: " in head, output[-2000:]


def test_a_stopped_rank_ends_the_job_after_the_timeout_naming_it(tmp_path):
    """A rank that stops answering (SIGSTOP) leaves the others waiting in a collective:
    fastdl's watchdog ends the job after --timeout, naming the rank."""
    job, pids, _ = _data_parallel_job(tmp_path)
    try:
        start = time.monotonic()
        os.kill(pids[1], signal.SIGSTOP)
        stdout, stderr = job.communicate(timeout=60)
        assert time.monotonic() - start < 30
    finally:
        try:
            os.kill(pids[1], signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.kill()
    assert job.returncode != 0
    assert "rank 1 (" in stderr and f"pid {pids[1]}) is stopped" in stderr, \
        (stdout + stderr)[-2000:]
