"""The package's import graph, read from the source with `ast` (no module is imported): no
import cycles, module-level or inside functions, and exactly one module imports deepspeed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "loretta"

# Cycles being removed by other work (objectives <-> transitive; convert.py is being replaced by
# loretta/checkpoint/). A cycle among only these modules is expected for now; any other fails.
KNOWN_CYCLES: list[set[str]] = []  # none: a new cycle fails test_no_import_cycles


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """Every loretta module that `path` imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from .. import z
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the submodule pkg.mod when it exists
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import loretta.data.shards.x` -> the module part
                t = t.rpartition(".")[0]
            if t.startswith("loretta") and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, name, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
    return sorted(out)


def describe(graph: dict[str, set[str]], comp: list[str]) -> str:
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
    return f"{comp}: " + ", ".join(edges)


def test_the_walker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    src = "def f():\n    from loretta.data import shards\n    from . import format\n"
    p = tmp_path / "x.py"
    p.write_text(src)
    known = {"loretta.data", "loretta.data.shards", "loretta.data.format", "loretta.data.x"}
    assert imported(p, "loretta.data.x", known) == {"loretta.data.shards", "loretta.data.format"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "loretta.data.shards" in graph and "loretta.data.sources" in graph
    bad = [c for c in cycles(graph) if not any(set(c) <= k for k in KNOWN_CYCLES)]
    assert not bad, "import cycles:\n" + "\n".join(describe(graph, c) for c in bad)


def test_the_data_package_has_no_cycle_with_anything() -> None:
    for comp in cycles(import_graph()):
        assert not any(m.startswith("loretta.data") for m in comp), comp


def test_known_cycles_are_gone() -> None:
    assert cycles(import_graph()) == []


def test_only_the_engine_imports_deepspeed() -> None:
    users = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""]
            if any(m == "deepspeed" or m.startswith("deepspeed.") for m in mods):
                users.append(name)
                break
    assert users == ["loretta.engine"]


def test_no_module_imports_another_modules_private_names() -> None:
    """Modules talk through public names: `from loretta.x import _helper` is a leaked boundary."""
    leaks = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            ours = isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("loretta")
            )
            if isinstance(node, ast.ImportFrom) and ours:
                private = [a.name for a in node.names if a.name.startswith("_")]
                private = [p for p in private if not p.startswith("__")]
                if private:
                    leaks.append(f"{name}: from {'.' * node.level}{node.module} import {private}")
    assert not leaks, "\n".join(leaks)
