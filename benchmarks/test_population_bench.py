"""Training many models at once ("Caviar"): K demo networks (64-256-128-10, batch 64, 10 epochs
on the digits, random hyperparameters per model: lr, betas, L2, dropout), K = 16 and 64, as
one fastdl population against PyTorch ensembles of the same K models (cases.TorchEnsemble:
torch.func vmap, and a hand-batched bmm model, each with a per-model Adam and with one fused
Adam), and (K = 16) against the K models one after another with fastdl and with PyTorch.

    python -m pytest benchmarks/test_population_bench.py --benchmark-enable \\
        --benchmark-json=benchmarks/population.json
    python benchmarks/report.py benchmarks/population.json

The normal test run (benchmarks disabled) smoke-tests each case on a small one, and checks
that the PyTorch ensembles compute fastdl's network and train.
"""

import numpy as np
import pytest

import cases

POPULATION_SIZES = (16, 64)
# one after another is timed at K = 16 only: at 64 it takes minutes and says nothing new
CASES = [(implementation, n_models) for n_models in POPULATION_SIZES
         for implementation in cases.POPULATION_IMPLEMENTATIONS
         if n_models == 16 or not implementation.endswith("sequential")]


@pytest.mark.parametrize("implementation, n_models", CASES)
def test_population(benchmark, implementation, n_models):
    if implementation.startswith("torch"):
        pytest.importorskip("torch")
    # the normal test run (benchmarks disabled) only smoke-tests a small case
    run_models, epochs, n_examples = ((n_models, 10, None) if not benchmark.disabled
                                      else (n_models // 8, 1, 256))
    run = cases.make_population_run(implementation, run_models, epochs, n_examples=n_examples)
    run()  # compile and warm up outside the timing
    benchmark.group = f"population: {n_models} demo networks, 10 epochs"
    benchmark.extra_info.update(case=f"population_{n_models}", implementation=implementation,
                                bytes_moved=0)
    benchmark.pedantic(run, rounds=3, iterations=1)


# -- the PyTorch ensembles are the same network, and train ----------------------------------------


def _batch():
    from fastdl import data

    (X, y), _, _ = data.load_digits(0)
    return X[:64], y[:64]


@pytest.mark.parametrize("kind", cases.TORCH_ENSEMBLES)
def test_torch_ensemble_computes_fastdl_networks_losses_and_gradients(kind):
    """Without dropout (its masks differ), from fastdl's initial weights: the K models'
    losses, gradients and batch-norm statistics as fastdl's population on one batch."""
    torch = pytest.importorskip("torch")
    from fastdl import nn, training

    rates, seeds = np.zeros(3), [4, 5, 6]
    ensemble = cases.TorchEnsemble(kind, rates, seeds)
    model = training.build_network(population=3, dropout=rates, seed=seeds, device="cpu")
    X, y = _batch()
    losses = ensemble.losses(torch.from_numpy(X), torch.from_numpy(y))
    losses.sum().backward()
    loss_fn = nn.SoftmaxCrossEntropy(population=3)
    want = loss_fn.forward(model.forward(X), np.ascontiguousarray(np.broadcast_to(y, (3, 64))))
    model.backward(loss_fn.backward(), input_grad=False)
    np.testing.assert_allclose(losses.detach().numpy(), want, rtol=1e-5)
    grads = {"W0": model.layers[0].dW, "gamma0": model.layers[1].dgamma,
             "beta0": model.layers[1].dbeta, "W1": model.layers[4].dW,
             "gamma1": model.layers[5].dgamma, "beta1": model.layers[5].dbeta,
             "W2": model.layers[8].dW, "b2": model.layers[8].db}
    mine = ({name: p.grad for name, p in ensemble.params.items()} if kind == "bmm" else
            dict(zip(grads, (ensemble.params[name].grad for name in (
                "linears.0.weight", "norms.0.weight", "norms.0.bias", "linears.1.weight",
                "norms.1.weight", "norms.1.bias", "out.weight", "out.bias")))))
    for name, want_grad in grads.items():
        np.testing.assert_allclose(mine[name].numpy(), want_grad, rtol=2e-3, atol=2e-5,
                                   err_msg=name)
    means = [ensemble.buffers["mean0"], ensemble.buffers["var1"]] if kind == "bmm" else \
        [ensemble.buffers["norms.0.running_mean"], ensemble.buffers["norms.1.running_var"]]
    np.testing.assert_allclose(means[0].numpy(), model.layers[1].running_mean, rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(means[1].numpy(), model.layers[5].running_var, rtol=1e-4)


HYPER = {"lr": np.array([2e-3, 5e-3, 1e-3]), "beta1": np.array([0.9, 0.85, 0.95]),
         "beta2": np.array([0.999, 0.99, 0.995]), "weight_decay": np.array([1e-4, 0.0, 1e-3])}


@pytest.mark.parametrize("implementation", [i for i in cases.POPULATION_IMPLEMENTATIONS
                                            if i.startswith(("torch-vmap", "torch-bmm"))])
def test_torch_ensemble_trains_as_fastdl(implementation):
    """3 epochs of 3 models: the loss goes down for every model and the dev accuracy is that
    of fastdl's population, within a few points (the dropout masks differ; "fused-adam" uses
    the median hyperparameters for all)."""
    pytest.importorskip("torch")
    from fastdl import data, training

    splits = data.load_digits(0)
    rates, seeds = np.array([0.0, 0.1, 0.2]), [1, 2, 3]
    kind = implementation.split("-")[1]
    adam = "groups-fused" if implementation.endswith("per-model-adam") else None
    history = cases.TorchEnsemble(kind, rates, seeds).train(splits, HYPER, 3, 0, adam)
    model = training.build_network(population=3, dropout=rates, seed=seeds, device="cpu")
    want = training.train_population(model, splits, HYPER, 3, seed=0)
    assert np.all(history.train_loss[-1] < history.train_loss[0])
    assert np.all(history.dev_loss[-1] < history.dev_loss[0])
    assert np.all(history.dev_accuracy[-1] > 0.9)
    np.testing.assert_allclose(history.dev_accuracy[-1], want.dev_accuracy[-1], atol=0.05)


@pytest.mark.parametrize("per_model_adam", cases.PER_MODEL_ADAM)
def test_per_model_adams_take_each_models_hyperparameters(per_model_adam):
    """Every per-model Adam of the PyTorch ensembles steps model k as torch.optim.Adam with
    model k's hyperparameters alone would (5 steps, fixed gradients)."""
    torch = pytest.importorskip("torch")
    ensemble = cases.TorchEnsemble("bmm", np.zeros(3), [1, 2, 3])
    start = {name: p.detach().clone() for name, p in ensemble.params.items()}
    step, set_lr = ensemble.optimizer(HYPER, per_model_adam)
    set_lr(HYPER["lr"] / 2)
    rng = np.random.default_rng(0)
    grads = {name: torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32))
             for name, p in ensemble.params.items()}
    for _ in range(5):
        for name, p in ensemble.params.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(grads[name])  # in place: the per-model views hold p.grad's memory
        step()
    for k in range(3):
        alone = {name: torch.nn.Parameter(start[name][k].clone()) for name in start}
        opt = torch.optim.Adam([{"params": [alone[n] for n in alone if alone[n].ndim == 2],
                                 "weight_decay": float(HYPER["weight_decay"][k])},
                                {"params": [alone[n] for n in alone if alone[n].ndim != 2],
                                 "weight_decay": 0.0}],
                               lr=float(HYPER["lr"][k] / 2),
                               betas=(float(HYPER["beta1"][k]), float(HYPER["beta2"][k])))
        for _ in range(5):
            for name, p in alone.items():
                p.grad = grads[name][k].clone()
            opt.step()
        for name, p in ensemble.params.items():
            np.testing.assert_allclose(p.detach()[k].numpy(), alone[name].detach().numpy(),
                                       rtol=1e-4, atol=1e-6, err_msg=f"{name}[{k}]")
