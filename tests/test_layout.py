"""The layout of the package: the jobs sit above the library, and no modules import each other
in a circle.

Every module of ``fastdl/`` (``fastdl.jobs`` included) and of ``kernels/`` (installed as
``fastdl.kernels``) is parsed, and each import it makes, at the top or inside a function,
becomes an edge of a graph among these modules. ``import a.b.c`` and ``from a.b.c import f``
import ``a.b.c`` (the parent packages' ``__init__`` files run too, but a package importing its
own submodules is the normal layout, not a circle); ``from a.b import c`` imports the module
``a.b.c`` when there is one, else the package ``a.b``.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fastdl": ROOT / "fastdl", "fastdl.kernels": ROOT / "kernels"}
JOBS = "fastdl.jobs"


def _is_job(module):
    return module == JOBS or module.startswith(JOBS + ".")


def _modules():
    """Module name -> (source path, is a package's ``__init__``)."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _imported(module, is_package, tree, known):
    """The names of the modules (within fastdl or not) that ``tree`` imports, resolved."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # relative: counted from the module's package (a package's __init__ is its own)
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                names.add(submodule if submodule in known else base)
    return names


def import_graph():
    """Module -> the set of fastdl modules it imports, and the fastdl names that resolve to
    no module (module, name)."""
    modules = _modules()
    graph, missing = {}, []
    for module, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = _imported(module, is_package, tree, modules)
        for name in sorted(targets):
            if (name == "fastdl" or name.startswith("fastdl.")) and name not in modules:
                missing.append((module, name))
        graph[module] = {name for name in targets if name in modules and name != module}
    return graph, missing


def find_cycle(graph):
    """A list of modules ``[a, b, ..., a]`` that import each other in a circle, or None."""
    state = {}  # module -> "open" (on the current path) or "done"
    path = []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_package():
    graph, _ = import_graph()
    for module in ("fastdl", "fastdl.training", "fastdl.tune", "fastdl.jobs.demo",
                   "fastdl.jobs.bench", "fastdl.kernels.optim", "fastdl.__main__"):
        assert module in graph
    assert {"fastdl.training", "fastdl.tune", "fastdl.nn"} <= graph["fastdl"]
    assert {"fastdl.jobs.demo", "fastdl.jobs.tune", "fastdl.jobs.bench"} <= \
        graph["fastdl.__main__"]
    assert "fastdl.training" in graph["fastdl.tune"]  # `from . import training`
    assert "fastdl.tune" in graph["fastdl.jobs.tune"]  # `from .. import tune`


def test_find_cycle_reports_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_modules_import_each_other_in_a_circle():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_library_module_imports_the_jobs():
    graph, _ = import_graph()
    library = [module for module in graph if not _is_job(module) and module != "fastdl.__main__"]
    offenders = sorted(f"{module} imports {target}" for module in library
                       for target in graph[module] if _is_job(target))
    assert not offenders, "; ".join(offenders)


def test_every_fastdl_import_names_a_module_that_exists():
    _, missing = import_graph()
    assert not missing, "; ".join(f"{module} imports {name}" for module, name in missing)


def test_import_fastdl_imports_none_of_the_extras():
    """``import fastdl`` (and its submodules but fastdl.torch) never imports an optional
    dependency: torch, optuna, mpi4py, psycopg."""
    import subprocess
    import sys

    code = ("import sys, fastdl, fastdl.optim, fastdl.nn, fastdl.training, fastdl.tune; "
            "print(sorted(m for m in ('torch', 'optuna', 'mpi4py', 'psycopg') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
