"""Population runs (Caviar): model k of a population step equals a single-model run with model
k's hyperparameters, and one model's NaN never stops or rescales another."""

import numpy as np
import pytest

import fastdl as fd

from helpers import assert_close

K = 3
SHAPES = [(K, 33, 5), (K, 5)]


def single(cls, params_k, grads_k, hyper_k, options_k):
    opt = cls(params_k, **hyper_k, **options_k)
    infos = [opt.step(g) for g in grads_k]
    return opt, infos


def model_slice(value, k):
    if isinstance(value, tuple):
        return tuple(model_slice(v, k) for v in value)
    return value[k] if isinstance(value, np.ndarray) else value


POPULATION_CASES = [
    (fd.optim.Adam, dict(lr=np.array([1e-3, 1e-2, 3e-2]),
                         betas=(np.array([0.8, 0.9, 0.95]), 0.999),
                         weight_decay=np.array([0.0, 0.1, 0.01])), dict(max_grad_norm=1.0)),
    (fd.optim.AdamW, dict(lr=0.01, amsgrad=np.array([True, False, True])),
     dict(ema_decay=np.array([0.5, 0.9, 0.99]), grad_scale=np.array([1.0, 8.0, 64.0]))),
    (fd.optim.SGD, dict(lr=np.array([0.1, 0.01, 0.05]), momentum=np.array([0.0, 0.9, 0.5]),
                        nesterov=np.array([False, True, False])), {}),
    (fd.optim.Momentum, dict(beta=np.array([0.5, 0.9, 0.99])), dict(max_grad_norm=0.5)),
    (fd.optim.RMSprop, dict(alpha=np.array([0.9, 0.99, 0.5]),
                            centered=np.array([True, False, False]),
                            momentum=np.array([0.0, 0.0, 0.9])), {}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cls, hyper, options", POPULATION_CASES,
                         ids=[c[0].__name__ for c in POPULATION_CASES])
def test_model_k_equals_its_single_run(cls, hyper, options, dtype, rng):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(10)]
    population = [p.copy() for p in params]
    opt = cls(population, population=True, **hyper, **options)
    infos = [opt.step(g) for g in grads]
    for k in range(K):
        opt_k, infos_k = single(cls, [p[k].copy() for p in params],
                                [[g[k] for g in step] for step in grads],
                                {n: model_slice(v, k) for n, v in hyper.items()},
                                {n: model_slice(v, k) for n, v in options.items()})
        for got, want in zip(population, opt_k._params):
            assert_close(got[k], want, dtype, what=f"model {k}")
        if opt.ema_params is not None:
            for got, want in zip(opt.ema_params, opt_k.ema_params):
                assert_close(got[k], want, dtype, what=f"ema of model {k}")
        if "max_grad_norm" in options:
            for info, info_k in zip(infos, infos_k):
                assert info.grad_norm.shape == (K,)
                assert info.grad_norm[k] == pytest.approx(info_k.grad_norm, rel=1e-6)


# without clipping the step tests finiteness alone (kernels/optim.py's grad_nonfinite), with
# clipping it also takes the norm (grad_stats)
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nan_in_model_k_freezes_model_k_only(rng, max_grad_norm, bad):
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    population = [p.copy() for p in params]
    opt = fd.optim.Adam(population, population=True, skip_nonfinite=True,
                        max_grad_norm=max_grad_norm, lr=0.01)
    reference = [fd.optim.Adam([p[k].copy() for p in params], lr=0.01,
                               max_grad_norm=max_grad_norm) for k in range(K)]
    for t in range(6):
        grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        if t == 2:
            grads[1][1, 3] = bad  # model 1 diverges at step 3
        info = opt.step(grads)
        np.testing.assert_array_equal(info.found_inf, [False, t == 2, False])
        for k in range(K):
            if not (t == 2 and k == 1):
                reference[k].step([g[k] for g in grads])
    np.testing.assert_array_equal(opt.step_count, [6, 5, 6])
    for k in range(K):
        for got, want in zip(population, reference[k]._params):
            assert_close(got[k], want, np.float32, what=f"model {k}")


def test_large_population_uses_the_parallel_kernel(rng):
    shapes = [(4, 100, 50), (4, 50)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    opt = fd.optim.Adam([p.copy() for p in params], population=True,
                        lr=np.array([1e-3, 1e-2, 1e-1, 1.0]))
    assert opt._ops.parallel
    singles = [fd.optim.Adam([p[k].copy() for p in params], lr=lr)
               for k, lr in enumerate([1e-3, 1e-2, 1e-1, 1.0])]
    for _ in range(10):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.step(grads)
        for k, s in enumerate(singles):
            s.step([g[k] for g in grads])
    for k, s in enumerate(singles):
        for got, want in zip(opt._params, s._params):
            assert_close(got[k], want, np.float32)


def test_population_hyperparameters_need_population(rng):
    p = [np.zeros((K, 4), np.float32)]
    with pytest.raises(ValueError, match="population=True"):
        fd.optim.Adam(p, lr=np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        fd.optim.Adam(p, lr=np.array([0.1, 0.2]), population=True)
    with pytest.raises(ValueError, match="leading axis"):
        fd.optim.Adam([np.zeros((K, 4), np.float32), np.zeros((2, 4), np.float32)],
                      population=True)
