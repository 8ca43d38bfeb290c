"""The package's shape: dependencies point one way along the pipeline, no import cycle of any kind
(imports inside functions and under ``TYPE_CHECKING`` count), no module is long, and the code
passes the linter and the type checker (ruff and mypy, configured in pyproject.toml)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "spindle"
MAX_LINES = 500

# what each part of the pipeline may import (besides itself and the shared utilities)
UTILITIES = {"spindle", "spindle.io", "spindle.validation"}
ALLOWED = {
    "declare": set(),
    "plan": {"declare"},
    "layers": {"declare", "plan"},
    "costs": {"declare", "plan", "layers"},
    "planner": {"declare", "plan", "layers", "costs"},
    "runtime": {"declare", "plan", "layers"},  # the plan and the layers, never the planner
    "tools": {"declare", "plan", "layers", "costs", "planner", "runtime"},
    "train": {"tools"},  # python -m spindle.train, the torchrun entry
    "__main__": {"tools"},  # the spindle command
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every spindle module ``module`` imports, wherever the import statement is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("spindle") and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: _imports(m, f, modules) for m, f in modules.items()}
    # importing a submodule runs its package's __init__: not a dependency on the package's job
    return {m: {t for t in deps if not (modules[t].name == "__init__.py" and m.startswith(t + "."))}
            for m, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_there_is_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_dependencies_point_one_way_along_the_pipeline() -> None:
    wrong = []
    for module, deps in _graph().items():
        if module in UTILITIES:
            assert not deps - UTILITIES, f"{module} imports {sorted(deps - UTILITIES)}"
            continue
        part = _part(module)
        for dep in deps - UTILITIES:
            if _part(dep) != part and _part(dep) not in ALLOWED[part]:
                wrong.append(f"{module} -> {dep}")
    assert wrong == []


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_long(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT.parent)}: {lines} lines"


def test_the_linter_passes() -> None:
    repo = ROOT.parent
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "spindle", "tests",
                           "benchmarks"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_the_type_checker_passes(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path), "spindle"],
                          cwd=ROOT.parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
