"""fastdl in the environments it meets: forked workers and read-only installations.

* A process that ran a parallel kernel (OpenMP threading layer) forks a worker that runs
  kernels (multiprocessing's default on Linux): GNU OpenMP kills a child that starts a parallel
  region, so fastdl's child runs the serial kernels (kernels/config.py, _after_fork_in_child),
  with the same results.
* An installation with no writable cache directory compiles in memory with one warning instead
  of failing with numba's "cannot cache function ...: no locator available".
* A shared machine: GNU OpenMP's threads spin briefly before they sleep (GOMP_SPINCOUNT).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FORK_SCRIPT = textwrap.dedent("""
    import multiprocessing
    import queue as queue_module
    import sys

    import numpy as np

    import fastdl as fd

    N = 200_000  # well above PARALLEL_MIN_SIZE: the parallel kernels


    def work(queue):
        from fastdl.kernels import config

        x = np.arange(N, dtype=np.float32)
        y, mask = fd.dropout_forward(x, 0.5, seed=3)
        params = [np.ones(N, np.float32)]
        fd.optim.Adam(params, lr=0.1).step([x])
        inherited.step([x])  # built and stepped (in parallel) by the parent before the fork
        queue.put((config.FORKED_AFTER_OPENMP, y, params[0], shared[0]))


    if __name__ == "__main__":
        import numba

        x = np.arange(N, dtype=np.float32)
        expected_y, _ = fd.dropout_forward(x, 0.5, seed=3)  # the parent runs a parallel kernel
        expected_p = [np.ones(N, np.float32)]
        fd.optim.Adam(expected_p, lr=0.1).step([x])
        shared = [np.ones(N, np.float32)]
        inherited = fd.optim.Adam(shared, lr=0.1)
        inherited.step([x])
        twice = [np.ones(N, np.float32)]
        reference = fd.optim.Adam(twice, lr=0.1)
        reference.step([x])
        reference.step([x])
        print("layer", numba.threading_layer(), flush=True)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=work, args=(queue,))
        child.start()
        while True:  # a killed child puts nothing: notice it instead of waiting
            try:
                forked, y, p, stepped = queue.get(timeout=1)
                break
            except queue_module.Empty:
                if child.exitcode is not None:
                    sys.exit(f"the child died: exitcode {child.exitcode}")
        child.join()
        print("exitcode", child.exitcode, "forked_after_openmp", forked, flush=True)
        np.testing.assert_array_equal(y, expected_y)
        np.testing.assert_allclose(p, expected_p[0], rtol=1e-6)
        np.testing.assert_allclose(stepped, twice[0], rtol=1e-6)
        print("same results")
""")


def test_forked_worker_runs_kernels_after_parent_ran_parallel_ones(tmp_path):
    script = tmp_path / "fork.py"
    script.write_text(FORK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "exitcode 0" in result.stdout  # not killed by a signal (-15 before the fix)
    if "layer omp" in result.stdout:
        assert "forked_after_openmp True" in result.stdout
    assert "same results" in result.stdout


READ_ONLY_SCRIPT = textwrap.dedent("""
    import os
    import warnings

    import numpy as np

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastdl as fd

        x = np.arange(40_000, dtype=np.float32).reshape(10_000, 4)
        y, mask = fd.dropout_forward(x, 0.25, seed=1)
        params = [np.ones(100, np.float32)]
        fd.optim.SGD(params, lr=0.5).step([np.full(100, 2.0, np.float32)])
        g = np.ones(4, np.float32)
        out, _ = fd.batch_norm_forward(x, g, 0 * g, None, None, training=True)
    print("uid", os.getuid())
    print("package", fd.__file__)
    print("writable", os.access(os.path.dirname(fd.__file__), os.W_OK))
    kept = np.allclose(y[mask], x[mask] / 0.75, rtol=1e-6)
    print("kept", bool(kept), "dropped", bool(np.all(y[~mask] == 0)))
    print("sgd", bool(np.all(params[0] == 0.0)))
    print("bn", bool(np.allclose(out.mean(axis=0), 0, atol=1e-3)))
    cache_warnings = [w for w in caught if "cache compiled kernels" in str(w.message)]
    print("warnings", len(cache_warnings))
""")


def _drop_privileges():
    """A command prefix that runs as nobody (root writes through read-only bits)."""
    if os.geteuid() != 0:
        return []
    tool = shutil.which("setpriv")
    if tool is None:
        pytest.skip("setpriv (util-linux) is missing: cannot drop root's privileges")
    return [tool, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture
def world_readable_dir():
    """A fresh directory under the system temp dir that other users can enter (pytest's
    tmp_path sits under a 700 directory of root's)."""
    path = tempfile.mkdtemp(prefix="fastdl-read-only-")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    subprocess.run(["chmod", "-R", "u+w", path], check=True)
    shutil.rmtree(path)


def test_read_only_installation_compiles_in_memory_with_one_warning(world_readable_dir):
    tmp_path = world_readable_dir
    site = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "fastdl"), site / "fastdl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "kernels"), site / "fastdl" / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "run.py").write_text(READ_ONLY_SCRIPT)
    subprocess.run(["chmod", "-R", "a-w,a+rX", str(site), str(home), str(tmp_path / "run.py")],
                   check=True)
    prefix = _drop_privileges()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")}
    env.update(PYTHONPATH=str(site), HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    try:
        result = subprocess.run([*prefix, sys.executable, str(tmp_path / "run.py")], env=env,
                                cwd=str(home), capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(tmp_path)], check=True)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    out = result.stdout
    assert f"package {site / 'fastdl' / '__init__.py'}" in out
    assert "writable False" in out
    assert "kept True dropped True" in out and "sgd True" in out and "bn True" in out
    assert "warnings 1" in out
    assert not any(site.rglob("*.nbi"))


def test_cache_is_on_where_a_cache_directory_is_writable():
    from fastdl.kernels import config

    assert config.CACHE and config.CPU_OPTIONS["cache"]
    assert np.isfinite(config.PARALLEL_MIN_SIZE)


NOTICE_SCRIPT = textwrap.dedent("""
    import numpy as np

    from fastdl.jobs import common, demo

    common.compile_notice(demo.DEMO_KERNELS, demo.COMPILE_SECONDS)  # cold: says so
    import fastdl as fd

    fd.dropout_forward(np.ones(10, np.float32), 0.5, seed=0)
    fd.dropout_forward(np.ones(20_000, np.float32), 0.5, seed=0)
    names = ["dropout.forward_kernel.serial", "dropout.forward_kernel.parallel"]
    print("before-warm")
    common.compile_notice(names, 1)  # now cached: silent
    print("end")
""")


def test_first_run_says_it_compiles_and_a_warm_run_does_not(tmp_path):
    script = tmp_path / "notice.py"
    script.write_text(NOTICE_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cold, warm = result.stdout.split("before-warm")
    assert "compiling fastdl's kernels for this machine, once: about" in cold
    assert "compiling" not in warm and "end" in warm


def test_demo_kernels_are_registered_names():
    from fastdl.jobs import common, demo
    from fastdl.kernels import config

    common.compile_notice((), 1)  # imports the kernel modules, which register their kernels
    assert set(demo.DEMO_KERNELS) <= set(config.REGISTRY)


@pytest.mark.parametrize("given, kept", [(None, "10000"), ("250", "250")])
def test_gnu_openmp_spins_briefly_unless_the_user_says(given, kept):
    """kernels/config.py shortens GNU OpenMP's spin (GOMP_SPINCOUNT) before numba's OpenMP
    layer starts: with the default, a population trained 36x slower beside one busy process;
    a value already set is the user's."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    code = "import os, fastdl.kernels.config; print(os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == kept
