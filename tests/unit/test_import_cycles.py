"""No import cycles in src/torpor (the brief: break import circles rather than live with them).

Every module's imports are read with `ast`, not by importing it, so the test needs nothing
installed and sees imports that a given run would not execute. Each import is one of three kinds:

- module level: runs when the module is imported (including under ``try``/``if`` at the top);
- lazy: inside a function or method body, runs when that code runs;
- typing: under ``if TYPE_CHECKING:``, never runs.

A cycle among module-level imports fails the test. A lazy import that closes a cycle fails it
too: it is the same dependency loop, only deferred to run time, and the house plan (each floor
uses only the floors below it) has no room for it. (So the brief counted them: of the three
circles STYLE.md names, agent <-> doctor and the coordination one were closed only by lazy
imports, and gc <-> pool, cut in b9ded68, by ``_gc`` importing ``_pool`` in a function.)
Typing-only imports are ignored.

An import names its target as precisely as the source says: ``from .a import b`` is an edge to
``a.b`` when ``a/b.py`` exists (a submodule) and to ``a`` otherwise (a name defined in ``a``).
Importing ``a.b`` also runs ``a/__init__.py``: that implicit edge to ``a`` is counted too, except
from a module inside ``a`` (its own package is being imported already; a package ``__init__``
that re-exports its children would otherwise put every child in a cycle with itself).

Imports by computed name (``importlib.import_module``: the CLI's command table, the pool
registry, ``torpor.__getattr__``) are not seen.

The lazy cycles left are listed in :data:`KNOWN_LAZY_CYCLES`, each with the cut proposed for
it; the test fails on any other, and on a listed one that is gone (delete its entry).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "torpor"

MODULE, LAZY, TYPING = "module", "lazy", "typing"

# Cycles closed by a lazy import that are left to the owners of their modules (the cut proposed
# for each is the reason); none today. Module-level cycles have no such list.
KNOWN_LAZY_CYCLES: dict[frozenset[str], str] = {}


@dataclass(frozen=True)
class Edge:
    """One import: `source` imports `target` at `line`, of `kind` module/lazy/typing."""

    source: str
    target: str
    line: int
    kind: str


def _modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of the package, by dotted name; generated protobuf code is left out."""
    found: dict[str, Path] = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        if path.name.endswith("_pb2.py"):
            continue
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Each import statement of a module with its kind, walking into every block."""
    out: list[tuple[ast.Import | ast.ImportFrom, str]] = []

    def walk(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                out.append((child, kind))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                walk(child, TYPING if kind == TYPING else LAZY)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    walk_stmt(stmt, TYPING)
                for stmt in child.orelse:
                    walk_stmt(stmt, kind)
            else:
                walk(child, kind)

    def walk_stmt(stmt: ast.stmt, kind: str) -> None:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            out.append((stmt, kind))
        else:
            walk(stmt, kind)

    walk(tree, MODULE)
    return out


def _edges(modules: dict[str, Path]) -> list[Edge]:
    edges: list[Edge] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, kind in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".")
                    drop = node.level - 1 if is_package else node.level
                    base = base[: len(base) - drop] if drop else base
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                for alias in node.names:
                    sub = f"{stem}.{alias.name}"
                    targets.append(sub if sub in modules else stem)
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target.startswith(PACKAGE) or target == name:
                    continue
                edges.append(Edge(name, target, node.lineno, kind))
                own = name.split(".")
                parts = target.split(".")
                for depth in range(1, len(parts)):
                    if own[:depth] != parts[:depth]:
                        parent = ".".join(parts[:depth])
                        edges.append(Edge(name, parent, node.lineno, kind))
    return sorted(set(edges), key=lambda e: (e.source, e.line, e.target))


def _cycles(edges: list[Edge], kinds: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.kind in kinds:
            graph.setdefault(edge.source, set()).add(edge.target)
            graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _describe(cycles: list[list[str]], edges: list[Edge], kinds: set[str]) -> str:
    lines = []
    for component in cycles:
        members = set(component)
        lines.append("cycle: " + ", ".join(component))
        for edge in edges:
            if edge.kind in kinds and edge.source in members and edge.target in members:
                lines.append(f"  {edge.source}:{edge.line} -> {edge.target} ({edge.kind})")
    return "\n".join(lines)


@functools.cache
def _package_edges() -> tuple[Edge, ...]:
    return tuple(_edges(_modules()))


def test_the_scanner_sees_the_package() -> None:
    edges = _package_edges()
    assert "torpor._errors" in _modules()
    assert any(e.source == "torpor._coord._runtime" and e.kind == MODULE for e in edges)


def test_the_scanner_finds_a_cycle_and_tells_its_kinds(tmp_path: Path) -> None:
    pkg = tmp_path / PACKAGE
    (pkg / "_sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_sub" / "__init__.py").write_text("from ._b import B as B\n")
    (pkg / "_a.py").write_text("from ._sub import _b\n")
    (pkg / "_sub" / "_b.py").write_text("B = 1\ndef f():\n    from .. import _c\n")
    (pkg / "_sub" / "_d.py").write_text("from ._b import B\n")
    (pkg / "_c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._a import x\n"
        "from ._sub._b import B\n"
    )
    edges = _edges(_modules(tmp_path))
    kinds = {(e.source, e.target): e.kind for e in edges}
    assert kinds[("torpor._a", "torpor._sub._b")] == MODULE
    assert kinds[("torpor._a", "torpor._sub")] == MODULE  # importing _sub._b runs _sub first
    assert kinds[("torpor._sub._b", "torpor._c")] == LAZY
    assert kinds[("torpor._c", "torpor._a")] == TYPING
    assert kinds[("torpor._sub", "torpor._sub._b")] == MODULE
    assert kinds[("torpor._sub._d", "torpor._sub._b")] == MODULE
    assert ("torpor._sub._d", "torpor._sub") not in kinds  # its own package: not counted
    assert _cycles(edges, {MODULE}) == []
    assert _cycles(edges, {MODULE, LAZY}) == [["torpor._c", "torpor._sub", "torpor._sub._b"]]


def test_no_cycle_among_module_level_imports() -> None:
    edges = list(_package_edges())
    cycles = _cycles(edges, {MODULE})
    assert cycles == [], _describe(cycles, edges, {MODULE})


def test_no_cycle_closed_by_a_lazy_import_but_the_known_ones() -> None:
    edges = list(_package_edges())
    cycles = _cycles(edges, {MODULE, LAZY})
    new = [c for c in cycles if frozenset(c) not in KNOWN_LAZY_CYCLES]
    assert new == [], _describe(new, edges, {MODULE, LAZY})
    gone = set(KNOWN_LAZY_CYCLES) - {frozenset(c) for c in cycles}
    assert gone == set(), f"no longer cycles (delete their KNOWN_LAZY_CYCLES entries): {gone}"


def test_the_doctor_asks_after_the_agent_without_importing_it(tmp_path: Path) -> None:
    # The cut of the agent <-> doctor circle: the agent's files are read by _agent_status,
    # outside the agent package (whose __init__ imports the master, which preloads the doctor).
    probe = (
        "import json, sys, torpor._doctor as d; c = d._agent_capability(); "
        "print(json.dumps([c.ok, 'torpor._agent' in sys.modules]))"
    )
    env = {**os.environ, "TORPOR_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [False, False]  # no agent here, and none imported
