"""The layers point one way: benchmarks -> optimize -> calib, no import cycle, no hidden function-local import.

The graph is read from the source (an AST walk, every ``import`` wherever it stands, ``if TYPE_CHECKING:`` blocks
left out since they never run), so a function-local import counts like a module-level one.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("optimize", "calib", "benchmarks")
OURS = (*PACKAGES, "cli")
# what each layer may not import: calib is a library for the stages; the stages never reach into the scripts
FORBIDDEN = {"calib": ("optimize", "benchmarks", "cli"), "optimize": ("benchmarks", "cli"), "benchmarks": ("cli",)}
# modules that are copied onto a device and run there without edgeopt: they import none of it
STANDALONE = {"optimize.bundle.runner"}
# function-local imports of our modules buy start-up time only in cli.py (its stages load on demand, --help stays
# torch-free); anywhere else they hide an arrow
LAZY_ALLOWED = {"cli"}


def _modules() -> dict[str, Path]:
    found = {"cli": ROOT / "cli.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _target(name: str, is_package: bool, node: ast.ImportFrom, alias: str) -> str | None:
    if node.level:
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    for candidate in (f"{module}.{alias}", module):
        while candidate and candidate not in MODULES and "." in candidate:
            candidate = candidate.rsplit(".", 1)[0]
        if candidate in MODULES:
            return candidate
    return None


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import in ``path``."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] in OURS:
                        target = alias.name
                        while target not in MODULES and "." in target:
                            target = target.rsplit(".", 1)[0]
                        found.append((target, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level or (child.module or "").split(".")[0] in OURS:
                    for alias in child.names:
                        target = _target(name, path.name == "__init__.py", child, alias.name)
                        if target is not None and target != name:
                            found.append((target, child.lineno, in_function))
            visit(child, local)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_walk_sees_the_known_arrows():
    """The walk itself works: it finds arrows that are there (a walk that finds nothing would pass every rule)."""
    edges = _edges(GRAPH)
    assert "calib.qdq" in edges["optimize.calibrate"]
    assert "optimize.benchmark.report" in edges["optimize.pipeline"]
    assert "optimize.benchmark.measure" in edges["optimize.benchmark.gates"]  # a relative import
    assert any(target.startswith("optimize.") for target in edges["benchmarks.cpu_runtimes"])
    assert any(local for _, _, local in GRAPH["cli"])  # cli.py's lazy stage imports are seen as local


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_point_one_way(layer):
    wrong = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
             for name, found in GRAPH.items() if name.split(".")[0] == layer
             for target, line, _ in found if target.split(".")[0] in FORBIDDEN[layer]]
    assert not wrong, f"{layer}/ may not import {', '.join(FORBIDDEN[layer])}:\n" + "\n".join(wrong)


def test_standalone_modules_import_nothing_of_ours():
    for name in STANDALONE:
        assert not GRAPH[name], f"{name} runs on a device without edgeopt but imports {GRAPH[name]}"


def test_no_function_local_imports_of_our_modules():
    hidden = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {target} inside a function"
              for name, found in GRAPH.items() if name not in LAZY_ALLOWED
              for target, line, local in found if local]
    assert not hidden, "import at module level (an arrow in plain sight):\n" + "\n".join(hidden)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively; a component of more than one module is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def enter(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)

    for root in sorted(edges):
        if root in index:
            continue
        enter(root)
        work = [(root, iter(sorted(edges.get(root, ()))))]
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    enter(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while not component or component[-1] != node:
                        component.append(stack.pop())
                        on_stack.discard(component[-1])
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


def _edges(graph: dict[str, list[tuple[str, int, bool]]]) -> dict[str, set[str]]:
    return {name: {target for target, _, _ in found} for name, found in graph.items()}


def test_no_import_cycle():
    assert not _cycles(_edges(GRAPH)), f"import cycles: {_cycles(_edges(GRAPH))}"


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The check above is not vacuous: the same walk over two modules importing each other reports them."""
    (tmp_path / "optimize").mkdir()
    (tmp_path / "optimize" / "a.py").write_text("from . import b\n")
    (tmp_path / "optimize" / "b.py").write_text("def f():\n    from .a import x\n")
    saved = dict(MODULES)
    try:
        MODULES.clear()
        MODULES.update({"optimize.a": tmp_path / "optimize" / "a.py", "optimize.b": tmp_path / "optimize" / "b.py"})
        graph = {name: _imports(name, path) for name, path in MODULES.items()}
    finally:
        MODULES.clear()
        MODULES.update(saved)
    assert graph["optimize.a"] == [("optimize.b", 1, False)]
    assert graph["optimize.b"] == [("optimize.a", 2, True)]
    assert _cycles(_edges(graph)) == [["optimize.a", "optimize.b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
