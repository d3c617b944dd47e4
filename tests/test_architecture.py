"""The rules that keep the code easy to change (docs/design.md), checked on the source.

* no import cycle anywhere in ``freezesched/``;
* dependencies point down the layers: schedules <- freezing <- profiling / integrations <-
  front ends (``__main__``, ``demo``, ``plot``), with ``_validation`` under everything;
* a package never reaches into another package's private modules;
* the runtime dependencies declared in ``pyproject.toml`` are exactly what the core imports.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "freezesched"

#: What each part may import from freezesched (besides itself and ``_validation``).
LAYERS = {
    "schedules": set(),
    "freezing": {"schedules"},
    "profiling": {"schedules", "freezing"},
    "integrations": {"schedules", "freezing"},
    "distributed": {"schedules", "freezing"},
    "plot": {"schedules"},
    "demo": {"schedules", "freezing", "profiling"},
    "__main__": {"schedules", "freezing", "profiling", "demo", "plot"},
    "__init__": {"schedules", "freezing"},
    "_validation": set(),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Every freezesched module ``path`` imports, at any depth of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("freezesched")]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: use absolute imports"
            base = node.module or ""
            if not base.startswith("freezesched"):
                continue
            for alias in node.names:  # `from freezesched.x import _y` may import a module
                candidate = f"{base}.{alias.name}"
                found.append(candidate if _is_module(candidate) else base)
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        graph[_module_name(path)] = {m for m in _imports(path) if _is_module(m)}
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if state.get(nxt) is None:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node)


def test_dependencies_point_down_the_layers():
    for module, imported in _graph().items():
        part = _part(module)
        allowed = LAYERS[part] | {part, "_validation"}
        for target in imported:
            assert _part(target) in allowed, f"{module} imports {target} (a {_part(target)})"


def test_no_package_reaches_into_another_packages_private_modules():
    for module, imported in _graph().items():
        for target in imported:
            parts = target.split(".")
            private = [p for p in parts[1:] if p.startswith("_") and p != "__init__"]
            if not private or target == "freezesched._validation":
                continue
            owner = ".".join(parts[: parts.index(private[0])])
            assert module == owner or module.startswith(owner + "."), (
                f"{module} imports the private {target}; import it from {owner}"
            )


def _core_third_party_imports() -> set[str]:
    optional = {"freezesched/integrations", "freezesched/plot.py"}
    found: set[str] = set()
    stdlib = set(sys.stdlib_module_names)
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(o) for o in optional):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top != "freezesched" and top != "__future__":
                    found.add(top)
    return found


def test_declared_runtime_dependencies_are_exactly_what_the_core_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {
        d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]
    }
    imported = {name.replace("_", "-") for name in _core_third_party_imports()}
    assert imported == declared


def test_one_torch_minimum_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (torch_dep,) = [d for d in project["dependencies"] if d.startswith("torch")]
    minimum = torch_dep.split(">=")[1]
    import freezesched

    assert minimum == freezesched.TORCH_MINIMUM
    # CI (.ci/run -> scripts/test.sh) runs the core tests on that minimum and the newest.
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_script = (ROOT / "scripts" / "test.sh").read_text(encoding="utf-8")
    assert "scripts/other_torch.sh min" in test_script
    assert "scripts/other_torch.sh newest" in test_script
    for doc in ("README.md", "docs/index.md"):
        assert f"torch >= {minimum}" in (ROOT / doc).read_text(encoding="utf-8"), doc
