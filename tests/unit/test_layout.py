"""The package keeps the shape docs/architecture.md describes: small rooms, one-way imports.

Read from the source with ``ast``, so a change that grows a class past its room, a function
past a screen, or an import back up the dataflow fails here first.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "trioherd"
MAX_CLASS_LINES = 450
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    return {
        path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))
    }


def _spans(tree: ast.Module, kinds: tuple[type[ast.AST], ...]) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            end = node.end_lineno or node.lineno
            yield f"{node.name} (line {node.lineno})", end - node.lineno + 1


def test_no_class_over_450_lines_and_no_function_over_60() -> None:
    too_long = []
    for name, tree in _modules().items():
        for what, lines in _spans(tree, (ast.ClassDef,)):
            if lines > MAX_CLASS_LINES:
                too_long.append(f"{name}.py: class {what}: {lines} lines")
        for what, lines in _spans(tree, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if lines > MAX_FUNCTION_LINES:
                too_long.append(f"{name}.py: {what}: {lines} lines")
    assert too_long == []


def _imports(tree: ast.Module) -> set[str]:
    """Sibling modules imported anywhere in the module, lazy and TYPE_CHECKING ones too."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trioherd."):
            found.add((node.module or "").split(".")[1])
    return found


def test_no_import_cycles_among_the_package_modules() -> None:
    modules = _modules()
    graph = {name: _imports(tree) & modules.keys() for name, tree in modules.items()}
    graph.pop("__init__")  # the package front imports everything and nothing imports it
    for edges in graph.values():
        edges.discard("__init__")
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, nxt]))
                elif nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []


def test_no_public_class_name_is_defined_twice() -> None:
    seen: dict[str, str] = {}
    twice = []
    for name, tree in _modules().items():
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                if node.name in seen:
                    twice.append(f"{node.name}: {seen[node.name]}.py and {name}.py")
                seen[node.name] = name
    assert twice == []


def test_no_private_name_is_imported_from_a_sibling_module() -> None:
    """A module's ``_name`` is its own: what a sibling needs is given a public name."""
    found = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module:
                found += [
                    f"{name}.py:{node.lineno}: from .{node.module} import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                ]
    assert found == []


# x._name reaches into objects that are not our own, each forced by a dependency
REACHES_ALLOWED = {
    # os._exit is the documented way to end a process without clean-up
    ("_worker", "os._exit"),
    # socket._accept returns the raw fd without building a socket object per connection
    ("_listeners", "sock._accept"),
    # trio's flag set by https_compatible=True: unset so that aclose() sends close_notify
    # (guarded by hasattr; without it unwrap() does)
    ("_http", "stream._https_compatible"),
}


def test_no_reach_into_another_objects_private_names() -> None:
    """``x._name`` only on ``self``, ``cls`` or ``super()``; the dependencies' reaches
    that cannot be avoided are listed above with their reasons."""
    found = set()
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__"):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and ast.unparse(owner.func) == "super":
                continue
            found.add((name, ast.unparse(node)))
    assert found - REACHES_ALLOWED == set()
    assert REACHES_ALLOWED - found == set()  # an entry nothing needs any more goes
