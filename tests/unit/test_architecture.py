"""The house by stage: import directions between the packages, and no import cycle.

Rules (docs/architecture.md): ``store`` imports neither ``capture`` nor ``train``; ``train`` never
imports ``capture``; no stage imports the orchestration (``cli``) or ``testing``; the shared modules
import no stage. Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "logitcache"
SHARED = {"errors", "faults", "targets", "choices", "jobfile", "models"}
STAGES = {"capture", "store", "train"}
# room -> rooms it must not import
FORBIDDEN = {
    "store": {"capture", "train", "cli", "testing"},
    "train": {"capture", "cli", "testing"},
    "capture": {"train", "cli", "testing"},
    **{shared: STAGES | {"cli", "testing"} for shared in SHARED},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every ``logitcache.*`` module ``path`` imports (relative imports resolved, lazy ones included)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "logitcache"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "logitcache":
                target = node.module
            else:
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import rans` imports a module
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: {m for m in imports_of(path, root) if m in modules and m != name} for name, path in modules.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "logitcache"


def direction_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} imports {dst} ({room(src)} must not import {room(dst)})"
                  for src, dsts in graph.items() for dst in dsts if room(dst) in FORBIDDEN.get(room(src), ()))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package ``__init__`` that re-exports its children, and children importing a sibling through
    the package, is not a cycle between rooms; drop edges from a package to its own submodules."""
    return {src: {d for d in dsts if not d.startswith(src + ".")} for src, dsts in graph.items()}


def test_stages_import_only_downstream():
    assert direction_violations(import_graph()) == []


def test_no_import_cycles():
    assert cycles(without_package_inits(import_graph())) == []


def test_every_module_belongs_to_a_room():
    rooms = {room(m) for m in import_graph()} - {"logitcache"}
    assert rooms <= STAGES | SHARED | {"cli", "testing"}, rooms - (STAGES | SHARED | {"cli", "testing"})


@pytest.mark.parametrize("planted, expected", [
    ({"logitcache.store.reader": {"logitcache.capture.plan"}}, "store must not import capture"),
    ({"logitcache.train.dataset": {"logitcache.capture.corpus"}}, "train must not import capture"),
    ({"logitcache.capture.plan": {"logitcache.cli"}}, "capture must not import cli"),
    ({"logitcache.errors": {"logitcache.store.fs"}}, "errors must not import store"),
])
def test_a_planted_wrong_direction_is_caught(planted, expected):
    graph = import_graph()
    for src, dsts in planted.items():
        graph[src] = graph[src] | dsts
    assert any(expected in v for v in direction_violations(graph))


def test_a_planted_cycle_is_caught():
    graph = import_graph()
    assert "logitcache.store.fs" in graph["logitcache.store.reader"]
    graph["logitcache.store.fs"] = graph["logitcache.store.fs"] | {"logitcache.store.reader"}
    assert any({"logitcache.store.fs", "logitcache.store.reader"} <= set(c) for c in cycles(without_package_inits(graph)))


def test_a_planted_import_in_a_real_file_is_caught(tmp_path):
    """End to end through the AST: a copy of the tree with one lazy wrong-way import fails."""
    import shutil

    copy = tmp_path / "logitcache"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    reader = copy / "store" / "reader.py"
    reader.write_text(reader.read_text() + "\n\ndef _planted():\n    from ..capture.plan import Plan  # noqa\n")
    assert any("logitcache.store.reader imports logitcache.capture.plan" in v
               for v in direction_violations(import_graph(copy)))
