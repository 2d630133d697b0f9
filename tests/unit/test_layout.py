"""The package keeps the shape docs/architecture.md describes: small rooms, one-way imports.

Read from the source with ``ast``, so a change that grows a class past its room, a function
past a screen, or an import back up the dataflow fails here first.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "trioherd"
MAX_CLASS_LINES = 350
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 700


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by its dotted name under ``trioherd`` (``_config``,
    ``primary.handoff``, ``primary`` for a subpackage's ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1] or ("__init__",)
        modules[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return modules


def _package_of(name: str) -> list[str]:
    """The package a module is in, as parts under ``trioherd`` ([] for the top)."""
    parts = name.split(".")
    is_package = (PACKAGE.joinpath(*parts) / "__init__.py").exists()
    return parts if is_package and name != "__init__" else parts[:-1]


def _spans(tree: ast.Module, kinds: tuple[type[ast.AST], ...]) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            end = node.end_lineno or node.lineno
            yield f"{node.name} (line {node.lineno})", end - node.lineno + 1


def test_no_class_over_350_lines_no_function_over_60_and_no_module_over_700() -> None:
    """Rooms with headroom: one near its limit is split by job, not squeezed."""
    too_long = []
    for name, tree in _modules().items():
        for what, lines in _spans(tree, (ast.ClassDef,)):
            if lines > MAX_CLASS_LINES:
                too_long.append(f"{name}.py: class {what}: {lines} lines")
        for what, lines in _spans(tree, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if lines > MAX_FUNCTION_LINES:
                too_long.append(f"{name}.py: {what}: {lines} lines")
        end = max((getattr(node, "end_lineno", 0) or 0 for node in tree.body), default=0)
        if end > MAX_MODULE_LINES:
            too_long.append(f"{name}.py: {end} lines")
    assert too_long == []


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in it (lazy and
    TYPE_CHECKING imports too), by dotted name."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = _package_of(name)[: len(_package_of(name)) - node.level + 1]
        elif (node.module or "").startswith("trioherd."):
            base = []
        else:
            continue
        module = (node.module or "").removeprefix("trioherd.") if not node.level else node.module
        target = [*base, *(module.split(".") if module else [])]
        for alias in node.names:  # from . import x: x may be a module
            candidate = ".".join([*target, alias.name])
            if candidate in known:
                found.add(candidate)
        if ".".join(target) in known:
            found.add(".".join(target))
    return found


def test_no_import_cycles_among_the_package_modules() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, tree, known) for name, tree in modules.items()}
    graph.pop("__init__")  # the package front imports everything and nothing imports it
    for edges in graph.values():
        edges.discard("__init__")
        edges -= {"primary", "worker", "aio", "protocols", "apps"}  # fronts: docstrings
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
    ("worker.main", "os._exit"),
    ("worker.mold", "os._exit"),
    ("worker.base", "os._exit"),
    # socket._accept returns the raw fd without building a socket object per connection
    ("_listeners", "sock._accept"),
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


SIDES = {"worker": ("worker", "aio", "protocols", "apps"), "primary": ("primary",)}


def test_the_package_has_its_rooms_and_the_worker_side_never_imports_the_primary() -> None:
    """At least three subpackages, and nothing a worker runs (``worker``, ``protocols``,
    ``apps``) imports the primary's side: a worker process never loads it."""
    modules = _modules()
    subpackages = {name for name in modules if "." not in name and _package_of(name) == [name]}
    assert len(subpackages - {"__init__"}) >= 3, subpackages
    known = set(modules)
    wrong = []
    for name, tree in modules.items():
        if name.split(".")[0] in SIDES["worker"]:
            wrong += [
                f"{name} imports {target}"
                for target in _imports(name, tree, known)
                if target.split(".")[0] in SIDES["primary"]
            ]
    assert wrong == []


# the protocol cores: what every runtime (Trio, asyncio) reuses as it is
CORES = (
    "protocols.h1core",
    "protocols.h1driver",
    "protocols.sockinfo",
    "protocols.shared",
    "protocols.framing",
    "protocols.ws_session",
    "protocols.ws_incoming",
    "protocols.h2core",
    "protocols.h2events",
    "protocols.h2scan",
)
RUNTIMES = ("trio", "asyncio", "anyio", "trio_asyncio")


def _runtime_imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found & set(RUNTIMES)


def test_the_protocol_cores_import_no_runtime() -> None:
    """The sans-IO cores, and every module of the package they import, directly or not,
    import no event loop library: a runtime extends a core, a core never picks one."""
    modules = _modules()
    known = set(modules)
    wrong = []
    for core in CORES:
        seen, todo = set(), [core]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            runtimes = _runtime_imports(modules[name])
            if runtimes:
                wrong.append(f"{core} -> {name} imports {sorted(runtimes)}")
            todo += _imports(name, modules[name], known) - {"__init__"}
    assert wrong == []
