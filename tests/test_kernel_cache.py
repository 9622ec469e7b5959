"""Compiled and cached kernels agree bit for bit, and every CPU kernel is covered.

numba issue 10617: a parallel kernel loaded from the on-disk cache can compute different bits
than the same kernel just compiled. One script runs every registered CPU kernel family
(``kernels.config.REGISTRY``) through the public API at sizes below and above
``PARALLEL_MIN_SIZE`` and saves the outputs; it runs in a cold process (a fresh
NUMBA_CACHE_DIR: compiles and writes the cache) and then a warm one (the same directory: loads),
and the outputs must be equal bitwise. The script also fails when a registered kernel was never
called, so that a new kernel cannot escape the comparison (a kernel module the script never
imports registers nothing: it runs a network too, and the last test names every module).

Softmax's kernels are left out here: their cold/warm test lives with them (tests/test_softmax.py).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SKIPPED_PREFIXES = ("softmax.",)  # tested with softmax's own kernels

SCRIPT = textwrap.dedent("""
    import sys

    import numpy as np

    import fastdl as fd
    from fastdl.kernels import config

    out, skipped = sys.argv[1], tuple(sys.argv[2].split(","))
    results = {}
    small, large = 1000, 4 * config.PARALLEL_MIN_SIZE  # the serial and the parallel kernels


    def rng(seed):
        return np.random.default_rng(seed)


    for n in (small, large):
        x = rng(1).standard_normal(n).astype(np.float32)
        y, mask = fd.dropout_forward(x, 0.3, seed=7)
        results[f"dropout_y_{n}"], results[f"dropout_mask_{n}"] = y, mask
        results[f"dropout_dx_{n}"] = fd.dropout_backward(x, mask, 0.3)

    # rows (N, C) and runs (N, C, H, W) layouts, each serial and parallel
    for shape in [(50, 8), (4096, 16), (2, 4, 5, 5), (8, 4, 32, 32)]:
        x = (rng(2).standard_normal(shape) * 3 + 5).astype(np.float32)
        c = shape[1]
        gamma, beta = np.full(c, 1.5, np.float32), np.full(c, 0.25, np.float32)
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        y, cache = fd.batch_norm_forward(x, gamma, beta, rm, rv, training=True)
        grads = fd.batch_norm_backward(rng(3).standard_normal(shape).astype(np.float32), cache)
        key = "x".join(map(str, shape))
        results[f"bn_y_{key}"], results[f"bn_rm_{key}"], results[f"bn_rv_{key}"] = y, rm, rv
        for i, g in enumerate(grads):
            results[f"bn_grad{i}_{key}"] = np.asarray(g)

    OPTIMIZERS = [
        ("sgd", fd.optim.SGD, dict(lr=0.05, momentum=0.9), dict(max_grad_norm=1.0)),
        ("sgd_plain", fd.optim.SGD, dict(lr=0.05), dict(ema_decay=0.9)),
        ("momentum", fd.optim.Momentum, dict(lr=0.05), dict(ema_decay=0.9)),
        ("rmsprop", fd.optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5), {}),
        ("adam", fd.optim.Adam, dict(lr=0.01, amsgrad=True), dict(skip_nonfinite=True)),
        ("adamw", fd.optim.AdamW, dict(lr=0.01), dict(max_grad_norm=0.5, ema_decay=0.99)),
    ]
    for name, cls, hyper, options in OPTIMIZERS:
        for n in (small, large):
            params = [rng(4).standard_normal(n).astype(np.float32)]
            opt = cls(params, **hyper, **options)
            for step in range(3):
                opt.step([rng(10 + step).standard_normal(n).astype(np.float32)])
            results[f"optim_{name}_{n}"] = params[0]
            state = opt.state_dict()
            for key, arrays in state["state"].items():
                results[f"optim_{name}_{n}_{key}"] = arrays[0]
            if state["ema"] is not None:
                results[f"optim_{name}_{n}_ema"] = state["ema"][0]

    # low-precision state: bfloat16 and 8-bit updates, and float32 state quantized on load
    for state_dtype in ("bfloat16", "int8"):
        for name, cls, hyper in [("adam", fd.optim.Adam, dict(lr=0.01)),
                                 ("sgd", fd.optim.SGD, dict(lr=0.05, momentum=0.9))]:
            for n in (small * 5, large):  # 8-bit from 4096 elements
                params = [rng(4).standard_normal(n).astype(np.float32)]
                opt = cls(params, **hyper, state_dtype=state_dtype, ema_decay=0.9)
                for step in range(3):
                    opt.step([rng(10 + step).standard_normal(n).astype(np.float32)])
                key = f"optim_{state_dtype}_{name}_{n}"
                results[key] = params[0]
                for buffer, arrays in opt.state_dict()["state"].items():
                    entry = arrays[0]
                    for part, value in (entry.items() if isinstance(entry, dict)
                                        else [("", entry)]):
                        results[f"{key}_{buffer}_{part}"] = value
    full = fd.optim.Adam([np.ones(large, np.float32)], ema_decay=0.9)  # kernels run above
    full.step([rng(20).standard_normal(large).astype(np.float32)])
    low = fd.optim.Adam([np.ones(large, np.float32)], state_dtype="int8", ema_decay=0.9)
    low.load_state_dict(full.state_dict())
    results["optim_int8_loaded_codes"] = low.state_dict()["state"]["exp_avg"][0]["codes"]

    # a population network (kernels/dense.py's products, kernels/block.py's fused batch norm -
    # ReLU - dropout) and one model (the products alone), small and large
    from fastdl import training

    for n_models, rows in [(2, 4), (8, 64), (None, 64)]:
        seeds = 3 if n_models is None else list(range(n_models))
        net = training.build_network(population=n_models, seed=seeds, device="cpu")
        X = rng(5).standard_normal((rows, 64)).astype(np.float32)
        logits = net.forward(X).copy()
        dx = net.backward(rng(6).standard_normal(logits.shape).astype(np.float32))
        results[f"net_{n_models}_logits"], results[f"net_{n_models}_dx"] = logits, dx.copy()
        for i, g in enumerate(net.grads()):
            results[f"net_{n_models}_grad{i}"] = g.copy()

    from fastdl.kernels.measure import triad

    a = np.zeros(large, np.float32)
    triad(a, np.ones(large, np.float32), np.arange(large, dtype=np.float32), np.float32(3.0))
    results["triad"] = a

    np.savez(out, **results)
    unused = [name for name, kernel in config.REGISTRY.items()
              if not kernel.signatures and not name.startswith(skipped)]
    if unused:
        sys.exit(f"registered kernels this script never ran: {unused}")
""")


def _run(script, cache_dir, out):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, str(script), str(out), ",".join(SKIPPED_PREFIXES)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


def test_cold_and_warm_kernels_agree_bitwise(tmp_path):
    script = tmp_path / "run_all.py"
    script.write_text(SCRIPT)
    cache_dir = tmp_path / "numba_cache"
    cold = _run(script, cache_dir, tmp_path / "cold.npz")
    assert any(cache_dir.rglob("*.nbi")), "the cold run wrote no cache index"
    warm = _run(script, cache_dir, tmp_path / "warm.npz")
    assert sorted(cold.files) == sorted(warm.files)
    differ = [name for name in cold.files if cold[name].dtype != warm[name].dtype
              or cold[name].tobytes() != warm[name].tobytes()]
    assert not differ, f"cached kernels give other bits than compiled ones: {differ}"


def test_registry_names_every_cpu_kernel_module():
    """Every kernel module registers its kernels (the cache test relies on the registry)."""
    from fastdl.kernels import (  # noqa: F401
        batchnorm,
        block,
        config,
        dense,
        dropout,
        measure,
        optim,
        pointers,
    )

    families = {name.split(".")[0] for name in config.REGISTRY}
    assert {"batchnorm", "block", "dense", "dropout", "optim", "pointers", "measure"} <= families
    assert config.REGISTRY["dropout.forward_kernel.parallel"] is dropout.forward_parallel
