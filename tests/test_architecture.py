"""The rooms of docs/architecture.md, checked on the source: no import cycles.

(That the library never imports Streamlit, TorchServe, ``serve/``, ``handlers/`` or ``ui/`` is
``tests/test_archive.py::test_the_library_never_imports_serving_or_ui_code``.)
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("deepminer", "serve", "handlers", "ui")

#: cycles through function-level imports that are known and owned elsewhere (each must still exist:
#: remove it here when it is gone)
KNOWN_LATE_CYCLES: list[set[str]] = []


def _modules(root: Path, rooms: tuple[str, ...]) -> dict[str, Path]:
    mods = {}
    for room in rooms:
        for py in (root / room).rglob("*.py"):
            parts = list(py.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = py
    return mods


def _type_checking(node: ast.AST) -> bool:
    t = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(t, "id", None) == "TYPE_CHECKING"
                                         or getattr(t, "attr", None) == "TYPE_CHECKING")


def _everywhere(tree: ast.AST) -> list[ast.AST]:
    """Every node, minus the bodies of ``if TYPE_CHECKING:`` blocks."""
    skip = {id(n) for block in ast.walk(tree) if _type_checking(block)
            for stmt in block.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if id(n) not in skip]


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run at import: the body, into if/try blocks, minus ``if TYPE_CHECKING:``."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            out += _top_level(node.orelse) if _type_checking(node) else _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level(node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody)
        else:
            out.append(node)
    return out


def import_graph(root: Path, rooms: tuple[str, ...] = ROOMS, *, late: bool = False) -> dict[str, set[str]]:
    """module -> the project modules it imports (module level; ``late``: also inside functions)."""
    mods = _modules(root, rooms)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, py in mods.items():
        tree = ast.parse(py.read_text(encoding="utf-8"))
        nodes = _everywhere(tree) if late else _top_level(tree.body)
        package = mod.split(".") if py.name == "__init__.py" else mod.split(".")[:-1]
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[mod] |= {r for n in names if (r := resolve(n)) and r != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "deepminer"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from deepminer.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import c\n")
    (pkg / "c.py").write_text("import deepminer.a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from deepminer import e\n")
    (pkg / "e.py").write_text("def f():\n    from deepminer import d\n")
    graph = import_graph(tmp_path, ("deepminer",))
    assert cycles(graph) == [{"deepminer.a", "deepminer.sub.b", "deepminer.c"}]
    assert cycles(import_graph(tmp_path, ("deepminer",), late=True)) == [
        {"deepminer.a", "deepminer.sub.b", "deepminer.c"}]  # d -> e only under TYPE_CHECKING
    (pkg / "d.py").write_text("from deepminer import e\n")
    assert {"deepminer.d", "deepminer.e"} in cycles(import_graph(tmp_path, ("deepminer",), late=True))


def test_no_import_cycle_among_the_rooms_at_module_level():
    graph = import_graph(ROOT)
    assert "deepminer.explain.service" in graph and graph["deepminer.explain.service"]
    assert cycles(graph) == []


def test_no_import_cycle_in_the_library_even_through_late_imports():
    found = cycles(import_graph(ROOT, ("deepminer",), late=True))
    for known in KNOWN_LATE_CYCLES:
        assert known in found, f"{sorted(known)} is gone: remove it from KNOWN_LATE_CYCLES"
    assert [c for c in found if c not in KNOWN_LATE_CYCLES] == []


def test_temp_then_rename_is_written_once():
    """Every atomic write goes through deepminer/atomic.py: no other module renames or makes temp files."""
    found = []
    for room in ROOMS + ("scripts",):
        for py in sorted((ROOT / room).rglob("*.py")):
            for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
                owner = getattr(getattr(node, "func", None), "value", None)
                name = getattr(owner, "id", "") or ""
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("replace", "rename", "mkstemp")
                        and (name in ("os", "tempfile") or name.startswith("tmp"))):  # os.replace, tmp.replace
                    found.append(f"{py.relative_to(ROOT)}:{node.lineno}")
    assert found and all(f.startswith("deepminer/atomic.py:") for f in found), found
