"""One model of a population: reset_model(k) and copy_model(src, dst) on layers and optimizers,
the training.Population run built on them (a slot refilled mid-run trains as a lone model
started then), shared labels for a population's loss, and per-model seeds."""

import numpy as np
import pytest

import fastdl as fd
from fastdl import data, nn, optim, training

from reference import ReferenceOptimizer


@pytest.fixture(scope="module")
def splits():
    (X, y), dev, test = data.load_digits(seed=0)
    return (X[:320], y[:320]), dev, test  # 5 mini-batches an epoch


def _snapshot(layer):
    return {name: np.array(getattr(layer, name)) for name in
            ("W", "b", "gamma", "beta", "running_mean", "running_var") if hasattr(layer, name)}


# -- layers --------------------------------------------------------------------------------------

def test_linear_reset_model_draws_a_lone_layers_weights_and_leaves_the_others(rng):
    layer = nn.Linear(5, 3, population=3, seed=[1, 2, 3])
    layer.b[:] = 7
    before = _snapshot(layer)
    layer.reset_model(1, seed=42)
    np.testing.assert_array_equal(layer.W[1], nn.Linear(5, 3, seed=42).W)
    np.testing.assert_array_equal(layer.b[1], 0)
    for k in (0, 2):
        np.testing.assert_array_equal(layer.W[k], before["W"][k])
        np.testing.assert_array_equal(layer.b[k], before["b"][k])
    layer.W[2] += 1
    layer.reset_model(2)  # its own seed
    np.testing.assert_array_equal(layer.W[2], nn.Linear(5, 3, seed=3).W)
    layer.copy_model(1, 0)
    np.testing.assert_array_equal(layer.W[0], layer.W[1])
    assert layer.seeds == [42, 42, 3]


def test_batchnorm_reset_and_copy_model(rng):
    layer = nn.BatchNorm(4, population=2, momentum=[0.1, 0.3])
    layer.forward(rng.standard_normal((2, 8, 4)).astype(np.float32))
    layer.gamma[:] = 2
    trained = _snapshot(layer)
    layer.reset_model(0)
    fresh = _snapshot(nn.BatchNorm(4))
    for name, values in fresh.items():
        np.testing.assert_array_equal(getattr(layer, name)[0], values)
        np.testing.assert_array_equal(getattr(layer, name)[1], trained[name][1])
    layer.copy_model(1, 0)
    for name in fresh:
        np.testing.assert_array_equal(getattr(layer, name)[0], trained[name][1])
    assert list(layer.momentum) == [0.3, 0.3]


def test_batchnorm_per_model_momentum_matches_lone_layers(rng):
    x = rng.standard_normal((2, 16, 3))
    layer = nn.BatchNorm(3, population=2, momentum=np.array([0.1, 0.5]), dtype=np.float64)
    layer.forward(x)
    for k, momentum in enumerate([0.1, 0.5]):
        alone = nn.BatchNorm(3, momentum=momentum, dtype=np.float64)
        alone.forward(x[k])
        np.testing.assert_allclose(layer.running_var[k], alone.running_var, rtol=1e-12)
        np.testing.assert_allclose(layer.running_mean[k], alone.running_mean, rtol=1e-12)


def test_dropout_reset_restarts_a_models_stream_and_copy_shares_it():
    x = np.ones((3, 1000), np.float32)
    layer = nn.Dropout([0.5, 0.2, 0.7], seed=[4, 5, 6], population=3)
    for _ in range(3):
        layer.forward(x)
    layer.reset_model(1, seed=77)
    masks = layer.forward(x) != 0
    alone = nn.Dropout(0.2, seed=77)
    np.testing.assert_array_equal(masks[1], alone.forward(x[1]) != 0)  # its first mask
    assert list(layer.calls) == [4, 1, 4]
    layer.copy_model(2, 0)
    masks = layer.forward(x) != 0
    np.testing.assert_array_equal(masks[0], masks[2])
    assert list(layer.p) == [0.7, 0.2, 0.7]


def test_stateless_layers_take_any_model_index_and_lone_layers_only_zero():
    nn.ReLU().reset_model(5)
    nn.SoftmaxCrossEntropy().copy_model(0, 3)
    with pytest.raises(ValueError, match="k must be a model index in \\[0, 1\\)"):
        nn.Linear(2, 2, seed=0).reset_model(1)
    with pytest.raises(ValueError, match="model index in \\[0, 2\\)"):
        nn.BatchNorm(2, population=2).copy_model(0, 2)
    with pytest.raises(TypeError, match="k must be an int"):
        nn.Dropout(0.1, seed=0, population=2).reset_model("0")


def test_consecutive_layer_seeds_share_no_models_seed():
    first = nn.Linear(8, 8, seed=0, population=4)
    second = nn.Linear(8, 8, seed=1, population=4)
    assert not set(first.seeds) & set(second.seeds)
    assert not any(np.array_equal(a, b) for a in first.W for b in second.W)
    np.testing.assert_array_equal(first.W[2], nn.Linear(8, 8, seed=nn.spawn_seed(0, 2)).W)


# -- the loss of a population --------------------------------------------------------------------

def test_population_loss_takes_the_shared_batchs_labels(rng):
    logits = rng.standard_normal((3, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 6)
    shared = nn.SoftmaxCrossEntropy(population=3)
    each = nn.SoftmaxCrossEntropy(population=3)
    np.testing.assert_array_equal(shared.forward(logits, labels),
                                  each.forward(logits, np.stack([labels] * 3)))
    np.testing.assert_array_equal(shared.backward(), each.backward())
    with pytest.raises(ValueError, match="leading axis of population=3"):
        shared.forward(logits[:2], labels)


# -- optimizers ----------------------------------------------------------------------------------

def _adam_population(n_models, rng, **options):
    params = optim.flat_params([(n_models, 4, 3), (n_models, 3)], np.float64)
    for p in params:
        p[...] = rng.standard_normal(p.shape)
    return params, optim.Adam(params, population=True, **options)


def test_optimizer_reset_model_starts_that_model_as_a_new_optimizer(rng):
    params, opt = _adam_population(3, rng, lr=np.array([1e-2, 2e-2, 3e-2]), ema_decay=0.9)
    grads = [rng.standard_normal(p.shape) for p in params]
    for _ in range(3):
        opt.step(grads)
    before = [p.copy() for p in params]
    state = {name: [v.copy() for v in opt._ops.views(buf)] for name, buf in opt._state.items()}
    opt.reset_model(1)
    assert list(opt.step_count) == [3, 0, 3]
    for p, e in zip(params, opt.ema_params):
        np.testing.assert_array_equal(e[1], p[1])
    opt.step(grads)
    # model 1: a fresh Adam's first step (the reference optimizer), lr 2e-2
    want = [p0[1].copy() for p0 in before]
    ReferenceOptimizer("adam", want, lr=2e-2).step([g[1] for g in grads])
    for p, w in zip(params, want):
        np.testing.assert_allclose(p[1], w, rtol=1e-12)
    # the others: their fourth step, with their own state
    for name, views in state.items():
        for view, old in zip(opt._ops.views(opt._state[name]), views):
            assert not np.array_equal(view[0], old[0])  # stepped on from where it was
    assert list(opt.step_count) == [4, 1, 4]


def test_optimizer_copy_model_makes_the_copy_step_as_its_source(rng):
    params, opt = _adam_population(3, rng, lr=np.array([1e-2, 2e-2, 3e-2]),
                                   betas=(np.array([0.9, 0.8, 0.7]), 0.999))
    grads = [rng.standard_normal(p.shape) for p in params]
    opt.step(grads)
    user_lr = opt.param_groups[0]["lr"]
    for p in params:
        p[2] = p[0]
    opt.copy_model(0, 2)
    assert list(user_lr) == [1e-2, 2e-2, 3e-2]  # the caller's array is left alone
    assert list(opt.param_groups[0]["lr"]) == [1e-2, 2e-2, 1e-2]
    assert list(opt.param_groups[0]["betas"][0]) == [0.9, 0.8, 0.9]
    same = [g.copy() for g in grads]
    for g in same:
        g[2] = g[0]
    for _ in range(3):
        opt.step(same)
    for p in params:
        np.testing.assert_array_equal(p[2], p[0])


# -- a population run ----------------------------------------------------------------------------

HYPER = {"lr": np.array([2e-3, 5e-3, 1e-3]), "beta1": np.array([0.9, 0.8, 0.95]),
         "weight_decay": np.array([1e-4, 1e-3, 0.0])}


def _population(seed_offset=0):
    model = training.build_network(population=3, dropout=[0.1, 0.2, 0.0],
                                   seed=[5 + seed_offset, 6, 7])
    return model


def _lone_run(splits, seed, dropout, hyper, first_epoch, epochs, batch_seed):
    """A lone demo network trained by hand with the public API on the population's batches
    from ``first_epoch`` on, its schedule counted from 0 (the reference of a refilled slot)."""
    model = training.build_network(dropout=dropout, seed=seed)
    opt = training.make_optimizer("adam", model, hyper)
    loss_fn, (X, y) = nn.SoftmaxCrossEntropy(), splits[0]
    losses = []
    for age in range(epochs):
        opt.lr = hyper["lr"] / (1 + training.LR_DECAY_RATE * age)
        total = 0.0
        with fd.cpu_threads(1):
            for xb, yb in data.minibatches(X, y, 64, seed=batch_seed * 1000 + first_epoch + age):
                loss = loss_fn.forward(model.forward(xb), yb)
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step(model.grads())
                total += float(loss) * len(yb)
        losses.append(total / len(y))
    return model, losses


def test_a_refilled_slot_trains_as_a_lone_model_started_then(splits):
    run = training.Population(_population(), splits, "adam", HYPER, seed=1)
    undisturbed = training.Population(_population(), splits, "adam", HYPER, seed=1)
    for _ in range(2):
        run.train_epoch()
        undisturbed.train_epoch()
    new = {"lr": 4e-3, "beta1": 0.85, "weight_decay": 1e-5, "dropout": 0.3}
    run.restart(1, seed=123, hyper=new)
    losses = [run.train_epoch() for _ in range(2)]
    for _ in range(2):
        undisturbed.train_epoch()
    lone, lone_losses = _lone_run(splits, 123, 0.3, {k: v for k, v in new.items()
                                                     if k != "dropout"}, 2, 2, batch_seed=1)
    np.testing.assert_allclose([loss[1] for loss in losses], lone_losses, rtol=1e-5)
    for p_run, p_lone in zip(run.model.params(), lone.params()):
        np.testing.assert_allclose(p_run[1], p_lone, rtol=1e-4, atol=1e-6)
    for layer_run, layer_lone in zip(run.model.layers, lone.layers):
        if isinstance(layer_run, nn.BatchNorm):
            np.testing.assert_allclose(layer_run.running_var[1], layer_lone.running_var,
                                       rtol=1e-5)
    # the other slots did not notice
    for p_run, p_other in zip(run.model.params(), undisturbed.model.params()):
        np.testing.assert_array_equal(p_run[[0, 2]], p_other[[0, 2]])
    assert list(run.age) == [4, 2, 4]


def test_a_copy_continues_bit_for_bit_as_its_source(splits):
    run = training.Population(_population(), splits, "adam", HYPER, seed=1)
    run.train_epoch()
    run.copy(0, 2)
    for _ in range(2):
        losses = run.train_epoch()
        assert losses[2] == losses[0]
    for p in run.model.params():
        np.testing.assert_array_equal(p[2], p[0])
    dev_loss, _ = run.evaluate()
    assert dev_loss[2] == dev_loss[0]


def test_set_hyper_checks_names_and_values(splits):
    run = training.Population(_population(), splits, "adam", HYPER, seed=1)
    with pytest.raises(ValueError, match="unknown \\['beta'\\]"):
        run.set_hyper(0, {"beta": 0.9})
    with pytest.raises(TypeError, match="hyper\\['lr'\\]"):
        run.set_hyper(0, {"lr": "fast"})
    run.set_hyper(2, {"beta2": 0.99, "batchnorm_momentum": 0.2, "dropout": 0.4})
    assert run.opt.param_groups[1]["betas"][1][2] == 0.99
    assert [layer.momentum[2] for layer in run.model.layers
            if isinstance(layer, nn.BatchNorm)] == [0.2, 0.2]
    assert [layer.p[2] for layer in run.model.layers if isinstance(layer, nn.Dropout)] \
        == [0.4, 0.4]
