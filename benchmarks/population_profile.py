"""Where a population epoch's time goes: fastdl's population of K demo networks (per layer, per
kernel, and the Python around the kernels) and the fastest PyTorch ensemble
(cases.TorchEnsemble "bmm" with one fused Adam, per kind of op), one epoch of 20 mini-batches
of 64 on the digits, the README's time model.

    python benchmarks/population_profile.py --models 16 64

fastdl: each unit of the Sequential (Linear, the fused BatchNorm-ReLU-Dropout), the loss and
the Adam step timed with perf_counter over 5 epochs (medians); 5 epochs under cProfile, in
turn with those, give each compiled kernel's own time (a numba dispatcher's call is one
profile entry, which cProfile does not slow); the epoch's time less the kernels' is Python and
NumPy on the host. PyTorch: torch.profiler's self times of its ops over 2 epochs,
grouped. Epochs during which other processes were busy are run again (population_rounds.py).
"""

import argparse
import collections
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch  # before fastdl's kernels, which set GOMP_SPINCOUNT: torch's OpenMP keeps its own

import fastdl as fd
from fastdl import data, nn, training

sys.path.insert(0, str(Path(__file__).parent))

from population_rounds import timed  # noqa: E402

import cases  # noqa: E402

STEPS_PER_EPOCH = 20  # 1258 training examples in batches of 64


def _setup(n_models):
    values = cases.population_search_space(n_models, 0)
    hyper = {k: np.asarray(v, np.float64) for k, v in values.items() if k != "dropout"}
    model = training.build_network(population=n_models, dropout=np.asarray(values["dropout"]),
                                   seed=list(range(n_models)), device="cpu")
    opt = training.make_optimizer("adam", model, hyper, population=True)
    return model, opt


def fastdl_profile(n_models, epochs=5):
    """({part: seconds per epoch}, {kernel: seconds per epoch}, host seconds per epoch,
    epoch seconds)."""
    (X, y), _, _ = data.load_digits(0)
    model, opt = _setup(n_models)
    loss_fn, grads, units = nn.SoftmaxCrossEntropy(population=n_models), model.grads(), \
        model._units()
    parts = collections.defaultdict(list)

    def epoch(seed, timers):
        with nn._kernel_threads(model, grads[0], 64), np.errstate(over="ignore",
                                                                   invalid="ignore"):
            for xb, yb in data.minibatches(X, y, 64, seed=seed):
                labels = np.ascontiguousarray(np.broadcast_to(yb, (n_models, len(yb))))
                h = xb
                for i, unit in enumerate(units):
                    start = time.perf_counter()
                    h = unit.forward(h)
                    timers[f"forward {i}: {_unit_name(unit)}"] += time.perf_counter() - start
                start = time.perf_counter()
                loss_fn.forward(h, labels)
                d = loss_fn.backward()
                timers["loss (softmax cross-entropy)"] += time.perf_counter() - start
                for i in range(len(units) - 1, -1, -1):
                    start = time.perf_counter()
                    d = units[i].backward(d, input_grad=False) if i == 0 \
                        else units[i].backward(d)
                    timers[f"backward {i}: {_unit_name(units[i])}"] += \
                        time.perf_counter() - start
                start = time.perf_counter()
                opt.step(grads)
                timers["Adam step"] += time.perf_counter() - start

    epoch(0, collections.defaultdict(float))  # warm up
    from fastdl.kernels import config

    # a numba kernel's call is one profile entry, under its Python function's code location
    registered = {(d.py_func.__code__.co_filename, d.py_func.__code__.co_firstlineno): name
                  for name, d in config.REGISTRY.items()}
    totals, timers, profiles = [], collections.defaultdict(float), []
    kernel_times = collections.defaultdict(list)

    def timed_epoch():
        timers.clear()  # a disturbed epoch runs again: count only the last
        epoch(1, timers)

    def profiled_epoch():
        profiles[:] = [cProfile.Profile()]
        profiles[0].enable()
        epoch(2, collections.defaultdict(float))
        profiles[0].disable()

    for _ in range(epochs):  # a timed epoch and a profiled one in turn
        totals.append(timed(timed_epoch)[0])
        for name, part in timers.items():
            parts[name].append(part)
        timed(profiled_epoch)
        kernels = collections.defaultdict(float)
        for (path, line, name), (_, _, own, _, _) in pstats.Stats(profiles[0]).stats.items():
            if (path, line) in registered:  # serial and parallel variants together
                kernels[registered[path, line].rsplit(".", 1)[0]] += own
            elif name == "<built-in method numpy.matmul>":
                kernels["BLAS (np.matmul)"] += own
        for name, own in kernels.items():
            kernel_times[name].append(own)
    kernels = {k: float(np.median(v)) for k, v in kernel_times.items()}
    epoch_seconds = float(np.median(totals))
    return ({k: float(np.median(v)) for k, v in parts.items()}, kernels,
            epoch_seconds - sum(kernels.values()), epoch_seconds)


def _unit_name(unit):
    if isinstance(unit, nn.Linear):
        return f"Linear {unit.n_in}->{unit.n_out}"
    return "BatchNorm-ReLU-Dropout (fused)"


TORCH_GROUPS = {
    "matrix products": ("aten::bmm", "aten::mm", "aten::baddbmm", "aten::addmm"),
    "random numbers (dropout masks)": ("aten::uniform_",),
    "batch norm": ("aten::native_batch_norm", "aten::native_batch_norm_backward"),
    "Adam (fused)": ("aten::_fused_adam_",),
    "loss": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss2d_forward",
             "aten::nll_loss2d_backward"),
}


def torch_profile(n_models, epochs=2):
    """({group: seconds per epoch}, epoch seconds) of the "bmm" ensemble with one fused Adam
    (train steps only, as fastdl's)."""
    from torch.profiler import ProfilerActivity, profile

    (X, y), _, _ = data.load_digits(0)
    values = cases.population_search_space(n_models, 0)
    hyper = {k: np.asarray(v, np.float64) for k, v in values.items() if k != "dropout"}
    ensemble = cases.TorchEnsemble("bmm", np.asarray(values["dropout"]),
                                   list(range(n_models)))
    step, _ = ensemble.optimizer(hyper, None)
    params = list(ensemble.params.values())
    for p in params:
        p.grad = torch.zeros_like(p)

    def epoch(seed):
        for xb, yb in data.minibatches(X, y, 64, seed=seed):
            for p in params:
                p.grad.zero_()
            ensemble.losses(torch.from_numpy(xb), torch.from_numpy(yb)).sum().backward()
            step()

    epoch(0)
    totals = [timed(lambda: epoch(1))[0] for _ in range(5)]
    best, profiles = None, []

    def profiled():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for e in range(epochs):
                epoch(10 + e)
        profiles[:] = [prof]

    for _ in range(3):  # the quietest of three profiles
        timed(profiled)
        groups = collections.defaultdict(float)
        for event in profiles[0].key_averages():
            own = event.self_cpu_time_total / 1e6 / epochs
            group = next((g for g, names in TORCH_GROUPS.items() if event.key in names),
                         "other ops (elementwise, copies, fills)")
            if event.key.startswith(("autograd::", "Optimizer.", "torch::autograd")):
                group = "autograd engine and optimizer (host)"
            groups[group] += own
        if best is None or sum(groups.values()) < sum(best.values()):
            best = dict(groups)
    return best, float(np.median(totals))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args(argv)
    for n_models in args.models:
        parts, kernels, host, epoch = fastdl_profile(n_models)
        print(f"\nfastdl population, K = {n_models}: {epoch * 1e3:.1f} ms per epoch of "
              f"{STEPS_PER_EPOCH} steps (median of 5; train steps only)")
        for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {name:44s} {seconds * 1e3:7.1f} ms  {seconds / epoch:6.1%}")
        print("  by kernel (own time under cProfile, median of 5 epochs):")
        for name, seconds in sorted(kernels.items(), key=lambda kv: -kv[1]):
            if seconds / epoch >= 0.005:
                print(f"    kernel {name:40s} {seconds * 1e3:7.1f} ms  {seconds / epoch:6.1%}")
        print(f"    {'the rest: Python and NumPy on the host':47s} {host * 1e3:7.1f} ms  "
              f"{host / epoch:6.1%}")
        groups, torch_epoch = torch_profile(n_models)
        counted = sum(groups.values())
        print(f"\nPyTorch bmm ensemble, one fused Adam, K = {n_models}: {torch_epoch * 1e3:.1f} "
              f"ms per epoch (median of 5); op self times under torch.profiler "
              f"({counted * 1e3:.1f} ms per epoch):")
        for name, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {name:44s} {seconds * 1e3:7.1f} ms  {seconds / counted:6.1%}")
    print(f"\n{fd.__name__} on {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
