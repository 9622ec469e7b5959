"""The main job: ``python -m fastdl demo`` trains on the digits and reports; a few epochs of
:mod:`fastdl.training` reach the stated accuracy; the same seed gives the same numbers."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fastdl import data, training
from fastdl.jobs import demo


def test_a_few_epochs_on_the_digits_reach_the_accuracy_band():
    splits = data.load_digits(seed=0)
    model = training.build_network(seed=0)
    history = training.train(model, splits, epochs=4)
    assert len(history.train_loss) == 4
    assert history.train_loss[-1] < history.train_loss[0]
    X_test, y_test = splits[2]
    assert training.accuracy(model, X_test, y_test) >= 0.93
    # SPEC's schedule: lr0 / (1 + 0.05 epoch)
    np.testing.assert_allclose(history.lr, [2e-3 / (1 + 0.05 * e) for e in range(4)])


def test_same_seed_same_numbers():
    runs = []
    for _ in range(2):
        splits = data.load_digits(seed=3)
        history = training.train(training.build_network(seed=3), splits, epochs=2, seed=3)
        runs.append((history.train_loss, history.dev_loss))
    assert runs[0] == runs[1]


def test_splits_are_normalized_with_training_statistics():
    (X_train, y_train), (X_dev, _), (X_test, _) = data.load_digits(seed=0)
    assert X_train.dtype == np.float32 and y_train.dtype == np.int64
    assert len(y_train) + len(X_dev) + len(X_test) == 1797
    np.testing.assert_allclose(X_train.mean(axis=0), 0, atol=1e-5)
    assert abs(X_dev.mean()) > 1e-4  # other splits are not re-centred on their own


def test_evaluate_gives_loss_and_accuracy_and_restores_the_mode():
    (X_train, y_train), (X_dev, y_dev), _ = splits = data.load_digits(seed=0)
    model = training.build_network(seed=0)
    training.train(model, splits, epochs=2)
    assert model.training  # train leaves the model in training mode
    loss, accuracy = training.evaluate(model, X_dev, y_dev)
    assert model.training and isinstance(loss, float) and 0 < loss < 1
    assert accuracy == training.accuracy(model, X_dev, y_dev) >= 0.9
    model.eval()
    training.evaluate(model, X_dev, y_dev)
    assert not model.training


@pytest.mark.parametrize("call, error, match", [
    (lambda m, s: training.train(m, s, epochs=0), ValueError, "epochs"),
    (lambda m, s: training.train(m, s, epochs=1.5), TypeError, "epochs"),
    (lambda m, s: training.train(m, s, optimizer="adagrad"), ValueError, "optimizer"),
    (lambda m, s: training.train(m, s, hyper={"learning_rate": 1e-3}), ValueError,
     "learning_rate"),
    (lambda m, s: training.train(m, s, optimizer="sgd", hyper={"beta1": 0.9}), ValueError,
     "beta1"),
    (lambda m, s: training.train_population(m, s, {}), ValueError, "population=K"),
])
def test_bad_training_input(call, error, match):
    model = training.build_network(seed=0)
    with pytest.raises(error, match=match):
        call(model, data.load_digits(seed=0))


def test_diagnosis_reads_bias_and_variance():
    assert "high bias" in demo.diagnosis(0.20, 0.21)
    assert "high variance" in demo.diagnosis(0.0, 0.10)
    assert "low bias and low variance" in demo.diagnosis(0.005, 0.01)


def test_demo_command_runs_and_reports(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "fastdl", "demo", "--epochs", "3",
                             "--no-progress", "--out", str(out), "--compare", "--seed", "1"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FASTDL_DEVICE": "cpu"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("device: cpu")
    assert any(line.startswith("epoch 3/3: loss") for line in lines)
    assert any(line.startswith("train accuracy: ") and "dev accuracy: " in line
               for line in lines)
    assert any(line.startswith("diagnosis: avoidable bias") for line in lines)
    assert any(line.startswith("time: ") for line in lines)
    assert any(line.startswith("numpy textbook: ") for line in lines)
    assert lines[-1].startswith("test accuracy: 0.")
    assert float(lines[-1].split(": ")[1]) >= 0.9
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# Runs a short demo in a fresh process (other tests have run other kernels in this one) and
# prints the CPU kernels it ran: REGISTRY names with a compiled or cached signature.
KERNELS_SCRIPT = """
import sys
from fastdl.jobs import demo
from fastdl.kernels import config

demo.run(["--epochs", "1", "--no-progress", "--out", sys.argv[1], "--optimizer", sys.argv[2]])
print(" ".join(sorted(name for name, kernel in config.REGISTRY.items() if kernel.signatures)))
"""


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_compile_notice_names_the_kernels_the_demo_runs(tmp_path, optimizer):
    result = subprocess.run([sys.executable, "-c", KERNELS_SCRIPT, str(tmp_path), optimizer],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FASTDL_DEVICE": "cpu"})
    assert result.returncode == 0, result.stderr
    ran = set(result.stdout.strip().splitlines()[-1].split())
    # the update kernel is made (and registered) on first use: the notice cannot ask for it
    updates = {name for name in ran if name.startswith("optim.update.")}
    assert len(updates) == 1
    assert ran - updates == set(demo.demo_kernels(optimizer))


# A cold demo in a fresh process and cache: the kernels compiled while it trains (numba's
# compile events inside training.train), after the two compile workloads ran ahead of it.
COMPILE_AHEAD_SCRIPT = """
import sys
from numba.core import event
from fastdl import training
from fastdl.jobs import demo

during_training, compiled = [False], []

class Recorder(event.Listener):
    def on_start(self, ev):
        if during_training[0]:
            compiled.append(ev.data["dispatcher"].py_func.__qualname__)
    def on_end(self, ev):
        pass

event.register("numba:compile", Recorder())
train = training.train

def recorded_train(*args, **kwargs):
    during_training[0] = True
    return train(*args, **kwargs)

training.train = recorded_train
demo.run(["--epochs", "1", "--no-progress", "--out", sys.argv[1], "--optimizer", sys.argv[2]])
print("compiled while training:", " ".join(compiled) or "nothing")
"""


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_a_cold_demo_compiles_its_kernels_ahead_on_two_processes(tmp_path, optimizer):
    result = subprocess.run([sys.executable, "-c", COMPILE_AHEAD_SCRIPT, str(tmp_path),
                             optimizer], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FASTDL_DEVICE": "cpu",
                                 "NUMBA_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "compiling fastdl's kernels for this machine, once" in result.stdout
    assert "compiled in " in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "compiled while training: nothing"


def test_unknown_command_is_an_error():
    result = subprocess.run([sys.executable, "-m", "fastdl", "train"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "unknown command" in result.stderr


def test_demo_with_8bit_state_checkpoints_and_continues(tmp_path):
    """``--state-dtype int8``: the header says so, and a checkpoint (8-bit codes and absmax in
    the npz) lets a longer run continue from it."""
    def demo_run(epochs):
        return subprocess.run([sys.executable, "-m", "fastdl", "demo", "--epochs", str(epochs),
                               "--no-progress", "--out", str(tmp_path / "out"), "--state-dtype",
                               "int8", "--checkpoint", str(tmp_path / "ckpt")],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "FASTDL_DEVICE": "cpu"})

    first = demo_run(2)
    assert first.returncode == 0, first.stderr
    assert "adam (int8 state)" in first.stdout
    saved = np.load(tmp_path / "ckpt" / "checkpoint.npz")
    assert any(saved[k].dtype == np.uint8 for k in saved.files)
    second = demo_run(3)
    assert second.returncode == 0, second.stderr
    assert "continuing from" in second.stdout
    assert "epoch 3/3: loss" in second.stdout and "epoch 1/3" not in second.stdout
