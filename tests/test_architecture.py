"""The layout's rules, checked on the source: no import cycle, small modules, one registry.

The import graph counts every static import: at module level, inside functions and under
``TYPE_CHECKING``. Importing ``a.b.c`` also runs the ``__init__`` of the packages above it, so
those count as imported too, except the importing module's own parent packages (which are
already being initialised when it runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cryosam"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or module.attribute) starts with."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the cryosam modules it imports (statically, anywhere in its source)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".")
                    anchor = anchor if is_pkg else anchor[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for target in targets:
                found = _resolve(target, modules) if target.startswith("cryosam") else None
                if found is None or found == module:
                    continue
                graph[module].add(found)
                own_parents = {module.rsplit(".", i)[0] for i in range(module.count(".") + 1)}
                parts = found.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent not in own_parents and parent in modules:
                        graph[module].add(parent)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 30
    assert find_cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_graph_sees_function_and_type_checking_imports() -> None:
    graph = import_graph()
    # inside a function: the CLI command imports the pipeline lazily
    assert "cryosam.pipeline" in graph["cryosam.commands.segment"]
    # through a package __init__: importing cryosam.encoders.base runs cryosam.encoders
    assert "cryosam.encoders" in graph["cryosam.features.extract"]


def test_the_root_package_imports_nothing_of_its_own() -> None:
    """``import cryosam`` stays cheap and can never close a cycle."""
    assert import_graph()["cryosam"] == set()


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_small(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split it"


def test_backend_classes_are_named_only_in_the_registry() -> None:
    """Adding a backend is its module plus one registry entry: no other production module
    names a backend implementation class."""
    names = ("Dinov2Encoder", "FilterBankEncoder", "SamSegmenter", "ThresholdSegmenter")
    allowed = {"backends.py", "dinov2.py", "filterbank.py", "sam.py", "threshold.py"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in allowed or "benchmarks" in path.parts or path.name == "testing.py":
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.name}: {n}" for n in names if n in text]
    assert offenders == []
