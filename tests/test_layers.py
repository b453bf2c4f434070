"""Issue #18: imports go downward only. The import graph is built from every import statement in the package,
those inside functions included (127 of them once hid a cycle), and checked against the layers that
docs/ARCHITECTURE.md draws: an import may stay in its layer or go down, never up, and the graph of top-level
packages has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sphere"

# top (0) to bottom; a module may import from its own layer or any layer below
LAYERS: list[set[str]] = [
    {"cli"},
    {"pipeline", "sweep", "runreport", "bench"},
    {"runners"},
    {"scale"},
    {"generate", "evaluation", "train", "testing", "memplan", "budgets", "controls"},
    {"lifecycle"},
    {"search", "rewards"},
    {"backends", "engine", "viz"},
    {"prompts", "data", "rundir", "loggers", "progress", "verify", "modelinfo"},
    {"models"},
    {"mini"},
    {"io", "resources", "schema", "overrides", "__init__"},
]


def _unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the files and lines where it happens."""
    edges: dict[tuple[str, str], list[str]] = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mod = ".".join(parts)
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(n, ast.ImportFrom):
                if n.level:
                    base = parts[: len(parts) - n.level + (1 if is_pkg else 0)]
                    targets = [".".join(base + ([n.module] if n.module else []))]
                else:
                    targets = [n.module or ""]
            elif isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            for t in targets:
                if t == "sphere" or t.startswith("sphere."):
                    a, b = _unit(mod), _unit(t)
                    if a != b:
                        edges.setdefault((a, b), []).append(f"{p.relative_to(PKG.parent)}:{n.lineno}")
    return edges


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"sphere.{unit} is in no layer of tests/test_layers.py: place it (and in ARCHITECTURE.md)")


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    for u in units:
        _layer(u)


def test_imports_go_downward_only():
    upward = [f"sphere.{a} -> sphere.{b} ({', '.join(where[:3])})" for (a, b), where in import_graph().items()
              if _layer(b) < _layer(a)]
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for a, b in import_graph():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cyc = stack[stack.index(v):] + [v]
                raise AssertionError("import cycle: " + " -> ".join(f"sphere.{x}" for x in cyc))
            if v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The graph includes function-level imports (the kind that hid the generate <-> scale cycle)."""
    edges = import_graph()
    assert ("runners", "scale") in edges  # sphere/runners.py imports scale only inside functions
