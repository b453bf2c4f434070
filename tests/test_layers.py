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
    {"cli", "cli_overrides"},
    {"loop"},
    {"sweep", "runreport", "bench"},
    {"runners"},
    {"scale"},
    {"generate", "evaluation", "train", "standins", "memplan", "budgets", "budget_checks", "budget_prompts",
     "budget_windows", "controls"},
    {"lifecycle"},
    {"search", "rewards"},
    {"backends", "engine", "viz"},
    {"prompts", "data", "rundir", "loggers", "console", "wandb_runs", "progress", "verify", "modelinfo"},
    {"model_paths"},
    {"mini"},
    {"io", "resources", "schema", "schema_eval", "schema_fields", "schema_groups", "schema_scorers", "schema_train",
     "schema_models", "overrides", "__init__"},
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
    graph: dict[str, dict[str, list[str]]] = {}
    for (a, b), where in import_graph().items():
        graph.setdefault(a, {})[b] = where
    cycles = find_cycles(graph)  # the same checker as inside a package (below)
    assert not cycles, "import cycle: " + "; ".join(" -> ".join(f"sphere.{x}" for x in c) for c in cycles)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The graph includes function-level imports (the kind that hid the generate <-> scale cycle)."""
    edges = import_graph()

    def indented(where: str) -> bool:
        path, line = where.rsplit(":", 1)
        return (PKG.parent / path).read_text(encoding="utf-8").splitlines()[int(line) - 1].startswith(" ")

    assert any(indented(w) for where in edges.values() for w in where)  # e.g. the ones that defer torch
    assert ("runners", "scale") in edges  # sphere/runners.py: the runner seam calls the Ray drivers
    # the paired statistics come from below the report (sphere.evaluation.paired), not from the loop
    assert ("runreport", "evaluation") in edges and ("runreport", "loop") not in edges


def test_the_round_loop_has_one_runner_seam():
    """The round loop asks the runner seam (sphere/runners.py) for its model work and never picks a runner
    itself: no branch on runner names and no call into the Ray drivers from sphere/loop/."""
    src = "\n".join(p.read_text(encoding="utf-8") for p in (PKG / "loop").glob("*.py") if p.name != "plan.py")
    for word in ("use_ray", "runner_name", "sphere.scale", "ray_runner", '== "ray"', "Models("):
        assert word not in src, f"sphere/loop/ (outside plan.py's refusals) mentions {word!r}"
    where = import_graph().get(("loop", "scale"), [])
    assert all(w.startswith("sphere/loop/plan.py:") for w in where), where  # the dry run's placement only


# Cycles inside one package (sphere.search, sphere.standins, ...): the graph of modules, each `from pkg import
# mod` read as an import of the submodule. Every import statement counts, those inside functions included (a
# function-level import that closes a loop is still a cycle, only deferred), except the ones under
# `if TYPE_CHECKING:`, which never run: an annotation may name a module that imports this one (the search
# policies name the driver that calls them).
KNOWN_CYCLES: dict[str, str] = {
    # package -> why it is allowed for now; remove the entry with the fix
}


def _modules() -> dict[str, tuple[Path, list[str], bool]]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (p, parts, is_pkg)
    return out


def _runtime_imports(tree: ast.AST):
    """The import statements of ``tree`` that can run (not under ``if TYPE_CHECKING:``)."""
    for n in ast.iter_child_nodes(tree):
        if isinstance(n, ast.If) and ast.unparse(n.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for s in n.orelse:
                if isinstance(s, (ast.Import, ast.ImportFrom)):
                    yield s
                yield from _runtime_imports(s)
            continue
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            yield n
        yield from _runtime_imports(n)


def module_graph() -> dict[str, dict[str, list[str]]]:
    """module -> {module of the same top-level package it imports: the lines where it does}."""
    mods = _modules()
    graph: dict[str, dict[str, list[str]]] = {}
    for mod, (p, parts, is_pkg) in mods.items():
        for n in _runtime_imports(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, ast.ImportFrom):
                if n.level:
                    head = parts[: len(parts) - n.level + (1 if is_pkg else 0)]
                    base = ".".join(head + ([n.module] if n.module else []))
                else:
                    base = n.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in n.names]
            else:
                targets = [a.name for a in n.names]
            for t in targets:
                if t in mods and t != mod and _unit(t) == _unit(mod) and t.count(".") and mod.count("."):
                    where = f"{p.relative_to(PKG.parent)}:{n.lineno}"
                    graph.setdefault(mod, {}).setdefault(t, []).append(where)
    return graph


def find_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module, as a closed path."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cyc = stack[stack.index(v):] + [v]
                if frozenset(cyc) not in seen:
                    seen.add(frozenset(cyc))
                    found.append(cyc)
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


def test_no_import_cycle_inside_a_package():
    graph = module_graph()
    bad = []
    for cyc in find_cycles(graph):
        if _unit(cyc[0]) in KNOWN_CYCLES:
            continue
        hops = [f"{a} -> {b} ({', '.join(graph[a][b][:2])})" for a, b in zip(cyc, cyc[1:], strict=False)]
        bad.append("  " + "\n  ".join(hops))
    assert not bad, "import cycles inside a package:\n" + "\n\n".join(bad)


def test_the_cycle_checker_finds_a_planted_cycle():
    """A loop of three modules, one import of it inside a function: found, and named in order."""
    graph = module_graph()
    planted = {**graph, "sphere.x.a": {"sphere.x.b": ["a.py:1"]}, "sphere.x.b": {"sphere.x.c": ["b.py:9"]},
               "sphere.x.c": {"sphere.x.a": ["c.py:40"]}}
    assert ["sphere.x.a", "sphere.x.b", "sphere.x.c", "sphere.x.a"] in find_cycles(planted)
    assert ("sphere.standins.reward_model" in graph)  # the graph sees package-mates: reward_model imports some


def test_the_cycle_checker_skips_type_checking_imports():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n"
                     "    import b\ndef f():\n    import c\n")
    assert [n.names[0].name for n in _runtime_imports(tree)][1:] == ["b", "c"]
