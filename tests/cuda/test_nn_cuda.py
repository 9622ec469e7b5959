"""The training toolkit on device arrays: fastdl's matmul kernel and the dense-layer kernels
against NumPy, and a small network trained on the GPU path matching the CPU path step for step
(simulator-sized)."""

import numpy as np
import pytest

import fastdl as fd
from fastdl import nn
from fastdl.device import is_device_array
from fastdl.kernels import cudalib

cuda = cudalib.cuda
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("transpose_a, transpose_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_matmul_kernel_matches_numpy(transpose_a, transpose_b, dtype):
    from fastdl import _dense

    rng = np.random.default_rng(0)
    m, k, n = 7, 11, 6  # not multiples of the tile
    a = rng.standard_normal((k, m) if transpose_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(dtype)
    out = cuda.device_array((m, n), dtype)
    cudalib.LAUNCHES.clear()
    _dense.ops("cuda").matmul(cuda.to_device(a), cuda.to_device(b), out, bool(transpose_a),
                              bool(transpose_b))
    assert cudalib.LAUNCHES["matmul_cuda"] == 1
    want = (a.T if transpose_a else a) @ (b.T if transpose_b else b)
    np.testing.assert_allclose(out.copy_to_host(), want, **TOL[dtype])


def network(device, feature_axis):
    channel_axis = 1 if feature_axis == -1 else 0
    return nn.Sequential(
        nn.Linear(5, 6, bias=False, feature_axis=feature_axis, seed=1, device=device),
        nn.BatchNorm(6, channel_axis=channel_axis, device=device), nn.ReLU(),
        nn.Dropout(0.25, seed=7),
        nn.Linear(6, 4, feature_axis=feature_axis, seed=2, init="xavier", device=device),
        nn.Tanh(),
        nn.Linear(4, 3, feature_axis=feature_axis, seed=3, device=device))


@pytest.mark.parametrize("feature_axis", [-1, 0])
def test_network_on_the_gpu_matches_the_cpu_step_for_step(feature_axis):
    rng = np.random.default_rng(1)
    cpu, gpu = network("cpu", feature_axis), network("cuda", feature_axis)
    assert all(is_device_array(p) for p in gpu.params())
    optimizers = [fd.optim.Adam(m.param_groups(weight_decay=0.01), lr=0.05) for m in (cpu, gpu)]
    losses = [nn.SoftmaxCrossEntropy(axis=feature_axis) for _ in range(2)]
    cudalib.LAUNCHES.clear()
    for step in range(3):
        x = rng.standard_normal((8, 5) if feature_axis == -1 else (5, 8)).astype(np.float32)
        labels = rng.integers(0, 3, 8)
        results = []
        for model, opt, loss_fn, to in [(cpu, optimizers[0], losses[0], np.asarray),
                                        (gpu, optimizers[1], losses[1], cuda.to_device)]:
            loss = loss_fn.forward(model.forward(to(x)), to(labels))
            dx = model.backward(loss_fn.backward())
            opt.step(model.grads())
            results.append((fd.to_host(loss), fd.to_host(dx)))
        np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
        np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
        for p_gpu, p_cpu in zip(gpu.params(), cpu.params()):
            np.testing.assert_allclose(p_gpu.copy_to_host(), p_cpu, rtol=1e-4, atol=1e-6,
                                       err_msg=f"step {step}")
    for name in ("matmul_cuda", "activation_cuda", "activation_backward_cuda",
                 "dropout_forward_cuda", "adam_update_cuda"):
        assert cudalib.LAUNCHES[name] > 0, name  # the GPU kernels ran
    gpu.eval()
    cpu.eval()
    x = rng.standard_normal((8, 5) if feature_axis == -1 else (5, 8)).astype(np.float32)
    np.testing.assert_allclose(gpu.forward(cuda.to_device(x)).copy_to_host(), cpu.forward(x),
                               rtol=1e-4, atol=1e-6)


def test_loss_layer_backward_scales_on_the_device():
    z = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 1])
    layer = nn.SoftmaxCrossEntropy()
    layer.forward(cuda.to_device(z), cuda.to_device(labels))
    got = layer.backward(2.0).copy_to_host()
    _, want = fd.softmax_cross_entropy(z, labels)
    np.testing.assert_allclose(got, 2 * want, rtol=1e-6)


def test_input_on_the_wrong_device_is_an_error():
    layer = nn.Linear(3, 2, device="cuda")
    with pytest.raises(TypeError, match="on cpu but the layer's parameters are on cuda"):
        layer.forward(np.zeros((2, 3), np.float32))


def test_batched_matmul_with_a_shared_operand():
    from fastdl import _dense

    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 7)).astype(np.float32)  # shared by the 3 models
    W = rng.standard_normal((3, 4, 7)).astype(np.float32)
    out = cuda.device_array((3, 5, 4), np.float32)
    _dense.ops("cuda").matmul(cuda.to_device(x), cuda.to_device(W), out, False, True)
    np.testing.assert_allclose(out.copy_to_host(), x @ W.transpose(0, 2, 1), **TOL[np.float32])


def test_population_network_on_the_gpu_matches_the_cpu():
    from fastdl import training

    rng = np.random.default_rng(4)
    X = rng.standard_normal((6, 5)).astype(np.float32)
    labels = np.ascontiguousarray(np.broadcast_to(rng.integers(0, 3, 6), (2, 6)))
    runs = []
    for device, to in [("cpu", np.asarray), ("cuda", cuda.to_device)]:
        model = training.build_network(5, (6,), 3, dropout=np.array([0.0, 0.3]),
                                       seed=[1, 2], device=device, population=2)
        opt = training.make_optimizer("adam", model, dict(lr=np.array([0.01, 0.05])),
                                      population=True)
        loss_fn = nn.SoftmaxCrossEntropy(population=2)
        for _ in range(2):
            loss = loss_fn.forward(model.forward(to(X)), to(labels))
            model.backward(loss_fn.backward())
            opt.step(model.grads())
        runs.append((fd.to_host(loss), [fd.to_host(p) for p in model.params()]))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5)
    for p_gpu, p_cpu in zip(runs[1][1], runs[0][1]):
        np.testing.assert_allclose(p_gpu, p_cpu, rtol=1e-4, atol=1e-6)
