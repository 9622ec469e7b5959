"""Data-parallel training (issue 16): benchmarks/data_parallel.py runs once at its smoke size,
alone and on ``mpiexec -n 2`` (the README's table comes from its full size, run by hand: the
commands are in its docstring)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import require

SCRIPT = str(Path(__file__).parent / "data_parallel.py")


def test_data_parallel_epoch_smoke():
    require("mpi4py")
    alone = subprocess.run([sys.executable, SCRIPT, "--smoke"], capture_output=True,
                           text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert json.loads(alone.stdout)["world"] == 1
    launcher = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) \
        or shutil.which("mpiexec")
    two = subprocess.run([launcher, "-n", "2", sys.executable, SCRIPT, "--smoke"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1",
                              "NUMBA_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    report = json.loads(two.stdout)  # rank 0 alone prints
    assert report["world"] == 2 and 0 < report["allreduce_share"] < 1
    assert report["allreduce_bytes_per_step"] >= report["gradient_bytes_per_step"]
