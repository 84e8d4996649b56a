"""The architecture stays as the README draws it: no import cycle among the project's modules (imports
inside functions included), Prefect only under `flows/`, and nothing outside `tests/` importing it.

Read from the source with `ast`, so a lazy import that would close a cycle is caught before it runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "storage", "evals", "flows")


def _modules(folders: tuple[str, ...]) -> dict[str, Path]:
    found = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path) -> list[str]:
    """Every module name an import statement anywhere in the file names (relative ones resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules(PACKAGES)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in _imported(module, path):
            while name and name not in modules:  # `from a.b import c`: c may be a name, not a module
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(f"{name}."):
                targets.add(name)
        graph[module] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_graph_sees_imports_inside_functions() -> None:
    graph = _graph()
    assert "evals.arithmetic" in graph["evals.graders"]  # a module-level import
    assert "pipeline.train.recipe" in graph["pipeline.demo_world.planted"]  # one inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_projects_modules() -> None:
    assert _cycle(_graph()) is None


def test_prefect_is_imported_under_flows_only_and_tests_by_nothing_else() -> None:
    offenders = []
    for module, path in _modules(("pipeline", "storage", "evals", "scripts", "bench", "flows")).items():
        for name in _imported(module, path):
            top = name.split(".")[0]
            if top == "tests" or (top == "prefect" and not module.startswith("flows")):
                offenders.append(f"{module} imports {name}")
    assert offenders == []
