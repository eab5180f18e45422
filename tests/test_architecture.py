"""The layout's rules (docs/architecture.md): every module imports, none is part of an import cycle,
none is over 600 lines, and module-level state is locked or per context."""

from __future__ import annotations

import ast
import contextvars
import importlib
import pathlib
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "jgc" / "_src"
MAX_LINES = 600


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import in a module, at any depth (a function's lazy import counts), except those
    under `if TYPE_CHECKING:`, which never run."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """module -> the jgc._src modules it imports."""
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                # `from pkg import mod` imports the submodule; `from mod import name` the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                           for a in node.names]
            edges.update(t for t in targets if t in MODULES and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_jgc_src():
    graph = import_graph()
    assert graph["jgc._src.surfaces.check"], "the parser found no imports"
    assert cycles(graph) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


@pytest.mark.parametrize("folder", ["jgc", "tests"])
def test_no_file_is_over_600_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_subpackages_import_nothing_on_their_own():
    """A subpackage's __init__ is a docstring: `import jgc` imports the on-disk cache's module
    from evaluators/ without importing JAX, and no __init__ can close a cycle."""
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name != "jgc._src":
            assert list(_imports(ast.parse(path.read_text()))) == [], name


def test_the_structured_work_counter_is_per_context():
    """The structured pass counts a leaf's work in a ContextVar: two threads planning at once
    each see their own counter (a module-level stack mixed them up)."""
    from jgc._src.evaluators.structured import slab

    assert isinstance(slab._WORK, contextvars.ContextVar)
    barrier = threading.Barrier(2)
    seen = {}

    def plan(name, amount):
        with slab.counting(slab.Work()) as work:
            barrier.wait()
            slab._count(structured=amount)
            barrier.wait()
            seen[name] = work.structured

    threads = [threading.Thread(target=plan, args=(n, a)) for n, a in (("a", 1.0), ("b", 5.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": 1.0, "b": 5.0}
    assert slab._WORK.get() is None


def test_the_suite_runs_on_two_cpu_devices():
    """conftest.py forces two CPU devices, so that sharding over jax.devices() is exercised."""
    import jax

    assert jax.device_count() == 2
