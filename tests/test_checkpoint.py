"""Checkpoints (fastdl.checkpoint, training.train(checkpoint=)): a run killed in the middle of
training, or in the middle of writing a checkpoint, continues from the last whole checkpoint and
ends with the bits of a run never stopped (dropout, batch norm and early stopping active)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastdl import checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "ranks"))
from small_run import run  # noqa: E402

EPOCHS = 8

# A run that kills itself (SIGKILL: no cleanup) at a given point: in the progress report of an
# epoch (its checkpoint not written yet), or inside the write of a checkpoint.
KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {ranks!r})
from fastdl import checkpoint
from small_run import run

where, when, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)
progress = None
if where == "training":
    progress = lambda epoch, history: die() if epoch == when else None
else:  # the file of the checkpoint written, flushed, not yet renamed over the last one
    fsync, calls = os.fsync, []
    def fsync_then_die(fd):
        fsync(fd)
        calls.append(fd)
        if len(calls) == 2 * when + 1:  # two fsyncs a save: the file's, then the folder's
            die()
    checkpoint.os.fsync = fsync_then_die
run(64, checkpoint=path, progress=progress, epochs={epochs})
"""


def _final_state(model):
    return [*model.params(), *[s for layer in model.state_dict()["layers"]
                               for s in layer.values()]]


@pytest.mark.parametrize("where", ["training", "checkpoint write"])
def test_a_killed_run_continues_bit_for_bit(where, tmp_path):
    path = str(tmp_path / "checkpoint.npz")
    script = KILLED_RUN.format(ranks=str(HERE / "ranks"), epochs=EPOCHS)
    result = subprocess.run([sys.executable, "-c", script, where.split()[0], "3", path],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL
    saved = checkpoint.load(path)
    assert saved["epoch"] == 3  # epochs 0-2 done; the 4th never saved
    if where == "checkpoint write":  # the torn write left its temporary file, nothing else
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    history, model = run(64, checkpoint=path, epochs=EPOCHS)  # the same command again
    whole_history, whole = run(64, epochs=EPOCHS)
    for got, want in zip(_final_state(model), _final_state(whole)):
        np.testing.assert_array_equal(got, want)
    assert history.train_loss == whole_history.train_loss
    assert history.dev_loss == whole_history.dev_loss
    assert checkpoint.load(path)["epoch"] == len(whole_history.dev_loss)


def test_checkpoints_keep_arrays_and_structure_and_reject_other_files(tmp_path):
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": None, "t": (1, 2.5),
             "nested": [{"x": np.array([True, False])}, "text"]}
    path = checkpoint.save(str(tmp_path / "c.npz"), state)
    back = checkpoint.load(path)
    np.testing.assert_array_equal(back["a"], state["a"])
    assert back["a"].dtype == np.float32 and back["t"] == (1, 2.5) and back["n"] is None
    assert back["nested"][1] == "text" and back["nested"][0]["x"].dtype == np.bool_
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    (tmp_path / "bad.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a fastdl checkpoint"):
        checkpoint.load(str(tmp_path / "bad.npz"))
    with pytest.raises(TypeError, match="state\\['f'\\]: a checkpoint holds"):
        checkpoint.save(str(tmp_path / "x.npz"), {"f": object()})
