"""The package's import graph: no cycles, and nothing imports upward through the layers.

The graph is read from the source with ``ast`` (every import, those inside functions too, since a deferred
import that points upward or closes a circle is still a tie between the modules), so the test needs no import
side effects. Layers, lowest first: core (errors, registries, shared solvers and shape facts) < model families
(``pcdeq.families``: pcDEQ, monDEQ, NODE; and the ``pcdeq`` facade that re-exports them) < training <
reproduction and benchmarks.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pcdeq"

CORE = {"pcdeq.errors", "pcdeq.activations", "pcdeq.dataset_specs", "pcdeq.results", "pcdeq.family", "pcdeq.perf",
        "pcdeq.disk"}
CORE_PACKAGES = ("pcdeq.solver",)  # every module under these is core
# each family's modules, by family; a family builds on the core only, never on another family
FAMILY_MODULES = {
    "pcdeq": ("pcdeq.families.pcdeq",),
    "mondeq": ("pcdeq.families.mondeq",),
    "node": ("pcdeq.families.node",),
}
# the reproduction layer and its two commands (python -m pcdeq.reproduce / pcdeq.aggregate)
REPRODUCTION = {"pcdeq.reproduction", "pcdeq.reproduce", "pcdeq.aggregate"}
LAYERS = ("core", "families", "training", "reproduction and benchmarks")


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _family_of(name: str) -> str | None:
    for family, prefixes in FAMILY_MODULES.items():
        if any(_within(name, p) for p in prefixes):
            return family
    return None


def layer_of(name: str) -> int:
    """The rank of a module's layer in LAYERS; a module the table does not know is an error to fix here."""
    if name in CORE or any(_within(name, p) for p in CORE_PACKAGES):
        return 0
    if name in ("pcdeq", "pcdeq.families") or _family_of(name) is not None:
        return 1
    if _within(name, "pcdeq.training"):
        return 2
    if name in REPRODUCTION or _within(name, "pcdeq.reproduction") or _within(name, "pcdeq.bench"):
        return 3
    raise AssertionError(f"module {name} has no layer: add it to the tables of tests/test_import_graph.py")


def import_graph() -> dict[str, set[str]]:
    """Each pcdeq module and the pcdeq modules it imports (``from pkg import submodule`` names the submodule)."""
    names = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if _within(a.name, "pcdeq")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if not _within(base, "pcdeq"):
                    continue
                for alias in node.names:
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base)
        deps.discard(name)
        graph[name] = {d for d in deps if d in names}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read() -> None:
    graph = import_graph()
    # a few known edges, so that a parser that finds nothing cannot pass the tests below
    assert "pcdeq.training.checkpoint" in graph["pcdeq.training.module"]
    assert "pcdeq.training.schema" in graph["pcdeq.training.config"]  # `from pcdeq.training import schema`
    assert "pcdeq.families.mondeq.splitting" in graph["pcdeq.families.mondeq.models"]  # a relative import


def test_find_cycle_finds_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles() -> None:
    assert find_cycle(import_graph()) is None


def test_nothing_imports_upward() -> None:
    upward = [f"{m} ({LAYERS[layer_of(m)]}) imports {d} ({LAYERS[layer_of(d)]})"
              for m, deps in sorted(import_graph().items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert upward == []


def test_families_do_not_import_each_other() -> None:
    crossing = [f"{m} imports {d}" for m, deps in sorted(import_graph().items()) for d in sorted(deps)
                if _family_of(m) and _family_of(d) and _family_of(m) != _family_of(d)]
    assert crossing == []
