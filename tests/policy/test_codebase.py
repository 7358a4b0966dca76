"""Rules of the codebase a newcomer relies on (docs/layout.md), checked on the source itself:
modules and functions of a readable size, no import cycle, no private API of the libraries
(ray, mlflow, fsspec and the rest: they change without notice between releases)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("components/**/*.py"), *ROOT.glob("pipelines/**/*.py")])
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_no_module_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES
            if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_too_long():
    long = [f"{p.relative_to(ROOT)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for p in SOURCES for f in ast.walk(_tree(p))
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _own_names() -> set[str]:
    """Every name this project defines: functions, classes, attributes it assigns."""
    names = set()
    for p in SOURCES + sorted(ROOT.glob("tests/**/*.py")) + sorted(ROOT.glob("benchmarks/*.py")):
        for node in ast.walk(_tree(p)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def test_no_private_attribute_of_a_library_is_used():
    """An attribute `x._name` (not a dunder) that this project does not define itself is a
    library's private API; so is importing a private module or name from a library. Tests
    may import a library's own validator to hold the project's files to it (Ray's job
    excludes, its cluster-config checks, MLflow's password rule), never reach into an
    object's private attributes."""
    own = _own_names()
    found = []
    tests = sorted(ROOT.glob("tests/**/*.py"))
    for p in SOURCES + tests:
        for node in ast.walk(_tree(p)):
            where = f"{p.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute):
                a = node.attr
                if a.startswith("_") and not a.startswith("__") and a not in own:
                    found.append(f"{where} .{a}")
            elif (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                  and p not in tests):
                top = node.module.split(".")[0]
                if top in ("components", "pipelines", "tests", "__future__"):
                    continue
                private = [m for m in node.module.split(".") if m.startswith("_")]
                private += [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    found.append(f"{where} from {node.module} import {private}")
    assert not found, f"private library APIs: {found}"


def test_every_module_imports_alone_without_a_cycle():
    """Each module imported first, alone: a cycle that only works in one import order fails
    here (ImportError on a partly initialised module). One fresh interpreter forgets every
    project module before importing the next one, so each is executed from scratch with
    nothing of the project loaded (the libraries stay loaded: they cannot hide a cycle of
    ours, and re-importing torch 69 times cost 100 s)."""
    modules = [_module(p) for p in SOURCES if p.name != "__main__.py"]
    code = ("import importlib, sys, traceback\n"
            "for name in sys.argv[1:]:\n"
            "    for m in [k for k in sys.modules if k.split('.')[0] in ('components', "
            "'pipelines')]:\n"
            "        del sys.modules[m]\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except BaseException as e:\n"
            "        print(f'FAILED {name}: {type(e).__name__}: {e}')\n")
    r = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED ")]
    assert not failed, failed


def _top_level_imports(path: Path) -> set[str]:
    """The project modules a module imports at its top level (not inside functions)."""
    out = set()
    for node in _tree(path).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in ("components", "pipelines"):
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names
                       if a.name.split(".")[0] in ("components", "pipelines"))
    return out


def test_no_import_cycle_between_modules():
    """The graph of top-level imports between the project's modules has no cycle."""
    modules = {_module(p): p for p in SOURCES}
    graph = {m: {d for d in _top_level_imports(p) if d in modules and d != m}
             for m, p in modules.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_pure_modules_import_neither_ray_nor_mlflow():
    pure = ["components/augment.py", "components/training/loop.py",
            "components/training/metrics.py", "components/evaluation/paired.py",
            "components/data/split.py", "components/imaging.py",
            "components/evaluation/paired_tests.py", "components/tuning/budget.py",
            "components/durations.py", "components/evaluation/importance.py",
            "components/evaluation/parallel.py",
            *map(str, sorted(p.relative_to(ROOT) for p in ROOT.glob("components/models/*.py"))),
            *map(str, sorted(p.relative_to(ROOT) for p in ROOT.glob("components/data/*.py")))]
    bad = []
    for rel in pure:
        for node in ast.walk(_tree(ROOT / rel)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{rel}: {n}" for n in names if n.split(".")[0] in ("ray", "mlflow")]
    assert not bad, bad


def test_the_metric_names_trials_report_are_the_epoch_metrics_fields():
    """What the tuning code reads from a trial's reported result (`m["best_val_f1"]`,
    `m.get("epoch")`, the schedulers' and searchers' `metric=`) is a field of `EpochMetrics`,
    the one definition of an epoch's metrics: a renamed field fails here, not in a sweep."""
    import dataclasses
    import re

    from components.training.spec import EpochMetrics

    fields = {f.name for f in dataclasses.fields(EpochMetrics)}
    metric = re.compile(r"^(epoch|early_stopped|(train|val|best_val)_\w+|best_epoch|lr)$")
    read = set()
    for rel in ("components/tuning/driver.py", "components/tuning/callbacks.py"):
        for node in ast.walk(_tree(ROOT / rel)):
            keys = []
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                keys.append(node.slice.value)
            elif isinstance(node, ast.Call):
                if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and \
                        node.args and isinstance(node.args[0], ast.Constant):
                    keys.append(node.args[0].value)
                keys += [k.value.value for k in node.keywords if k.arg in ("metric", "time_attr")
                         and isinstance(k.value, ast.Constant)]
            read |= {k for k in keys if isinstance(k, str) and metric.match(k)}
    assert read, "the scan found no metric names: the test no longer reads the code"
    assert read <= fields, f"read but not reported: {sorted(read - fields)}"


def test_no_two_modules_share_a_file_name():
    """A file name says one thing across components/ and pipelines/ (`__init__.py` aside):
    two `errors.py` or two `record.py` made a reader open the wrong one."""
    by_name: dict[str, list[str]] = {}
    for p in SOURCES:
        if p.name != "__init__.py":
            by_name.setdefault(p.name, []).append(str(p.relative_to(ROOT)))
    shared = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not shared, f"modules that share a file name: {shared}"


def _import_graph():
    """docs/import_graph.py, the script that draws the graph docs/layout.md shows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "docs" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The lower rooms (docs/layout.md, the rules): what each may not import, even inside a function.
# `data/` once imported the image decoder from `serving/`, and `cluster.py` a helper of
# `tuning/`.
_ANY = "any module of this project"
BELOW = {
    "components/errors.py": _ANY,
    "components/imaging.py": _ANY,   # copied into every registered model
    "components/data/": {"components/serving/", "components/inference/"},
    "components/cluster.py": {"components/tuning/", "components/inference/"},
    "components/serving/": {"components/inference/", "components/registry/",
                            "components/champion_server.py"},
}


def test_imports_between_packages_go_one_way():
    """components/ never imports pipelines/; the lower rooms import none of those above them
    (`BELOW`); and between the packages and top-level modules of components/ imports go one
    way: no package imports one that imports it back, not even inside a function (the graph
    docs/layout.md draws)."""
    edges = _import_graph().graph(ROOT)
    upward = sorted(f"{low} -> {t}" for low, above in BELOW.items()
                    for t in edges.get(low, ()) if above == _ANY or t in above)
    assert not upward, f"lower rooms that import a room above them: {upward}"
    into_pipelines = sorted(n for n, targets in edges.items() if n.startswith("components/")
                            and any(t.startswith("pipelines/") for t in targets))
    assert not into_pipelines, f"components that import pipelines/: {into_pipelines}"
    inner = {n: {t for t in targets if t.startswith("components/")}
             for n, targets in edges.items() if n.startswith("components/")}
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = "open"
        for d in sorted(inner.get(n, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[n] = "done"

    for n in sorted(inner):
        if n not in state:
            visit(n, [n])
    assert not cycles, f"packages that import each other: {cycles}"


def test_the_layout_page_draws_the_import_graph_of_the_code():
    """docs/layout.md's import graph is the code's: a changed import between packages shows
    up on the page (regenerate it with `python docs/import_graph.py --write`)."""
    graph = _import_graph()
    page = (ROOT / "docs" / "layout.md").read_text()
    assert graph.BEGIN in page and graph.END in page, "docs/layout.md lost its graph markers"
    drawn = page.split(graph.BEGIN, 1)[1].split(graph.END, 1)[0].strip()
    assert drawn == graph.mermaid(graph.graph(ROOT)).strip(), (
        "docs/layout.md's import graph is not the code's: run python docs/import_graph.py --write")
