"""The import layers of ``scheduler/`` and ``drivers/``: the rules are written once, here.

Every module belongs to a room (the first package below ``scheduler``, or ``drivers``); rooms are
ranked and a module imports only from its own rank or below. ``drivers`` is stricter: it imports only
``scheduler.errors`` and ``scheduler.model``. No module imports inside a function unless a comment
on that line names the start-up cost it saves (or the warning policy it must follow), and no two modules import each other, directly or
through a package whose ``__init__`` imports its submodules.

``ALLOWED_*`` list what is still wrong; they only shrink. An entry that no longer occurs fails the
test too, so the lists stay exact. ARCHITECTURE.md shows the same ranks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Rank of each room: a module imports modules of its own rank or lower.
RANKS: dict[str, int] = {
    "scheduler.errors": 0,
    "scheduler.logs": 0,
    "scheduler.faults": 0,
    "scheduler.model": 1,
    "scheduler.config": 2,
    "drivers": 2,
    "scheduler.store": 3,
    "scheduler.engine": 4,
    "scheduler.actions": 5,
    "scheduler.backup": 5,
    "scheduler.restore": 5,
    "scheduler.hosts": 5,
    "scheduler.api": 6,
    "scheduler.daemon": 7,
    "scheduler.cli": 8,
    "scheduler.entry": 9,
    "scheduler.__main__": 10,
}
# What drivers may import from scheduler (the rank rule alone would also allow logs and faults).
DRIVERS_MAY_IMPORT = ("scheduler.errors", "scheduler.model")
# A comment on a late import must name one of these reasons: a start-up cost it saves (measured, in the
# comment), or the warning policy that must be in place before a library is imported.
EXCUSES = ("start-up", "warning policy")

# Edges that break the ranks today: (importer, imported).
ALLOWED_UPWARD: set[tuple[str, str]] = set()
# Imports inside functions today: (module, imported).
ALLOWED_LATE: set[tuple[str, str]] = set()
# Import cycles today, each as the set of its modules.
ALLOWED_CYCLES: set[frozenset[str]] = set()


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    late: bool
    line: int
    excused: bool  # a late import whose comment names the start-up cost it saves


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [*REPO.glob("scheduler/**/*.py"), *REPO.glob("drivers/**/*.py")]
    return {module_name(path): path for path in files if "__pycache__" not in path.parts}


def room_of(module: str) -> str:
    if module == "scheduler":  # the empty package itself
        return "scheduler.errors"
    for room in sorted(RANKS, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    raise AssertionError(f"{module} is in no room: give it a rank in RANKS")


def _targets(node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    if node.level or not node.module:
        raise AssertionError(f"relative import of {node.module!r} on line {node.lineno}: write it absolute")
    for alias in node.names:
        submodule = f"{node.module}.{alias.name}"
        yield submodule if submodule in modules else node.module


def _under_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
    return False


def edges_of(module: str, path: Path, modules: dict[str, Path]) -> Iterator[Edge]:
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        late = _under_function(node, parents)
        excused = late and any(reason in lines[node.lineno - 1] for reason in EXCUSES)
        for target in _targets(node, modules):
            if target.split(".")[0] in ("scheduler", "drivers") and target != module:
                yield Edge(module, target, late, node.lineno, excused)


def all_edges() -> list[Edge]:
    modules = project_modules()
    return [edge for module, path in sorted(modules.items()) for edge in edges_of(module, path, modules)]


def runtime_graph(edges: list[Edge]) -> dict[str, set[str]]:
    """Who imports whom when the code runs: importing ``a.b.c`` also runs the ``__init__`` of ``a.b``."""
    modules = project_modules()
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for edge in edges:
        parts = edge.imported.split(".")
        graph[edge.importer] |= {".".join(parts[:end]) for end in range(1, len(parts) + 1)} & modules.keys()
    return graph


def _follows(graph: dict[str, set[str]], module: str) -> set[str]:
    # A submodule "importing" its own package (it runs first, and is in sys.modules while it runs) closes no
    # cycle; a package importing its submodules does run them, so that edge counts.
    return {t for t in graph.get(module, ()) if not (t == module or module.startswith(t + "."))}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in _follows(graph, todo.pop()) - seen:
            seen.add(target)
            todo.append(target)
    return seen


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The import cycles: sets of more than one module that all reach each other."""
    reach = {module: _reachable(graph, module) for module in graph}
    return {
        frozenset({module} | {other for other in reach[module] if module in reach[other]})
        for module in graph
        if module in reach[module]
    }


def upward(edge: Edge) -> bool:
    source, target = room_of(edge.importer), room_of(edge.imported)
    if source == "drivers" and target != "drivers":
        return not any(edge.imported == allowed or edge.imported.startswith(allowed + ".") for allowed in DRIVERS_MAY_IMPORT)
    return RANKS[target] > RANKS[source]


def _exact(found: set, allowed: set, what: str) -> None:
    def shown(items: set) -> list[str]:
        return sorted(str(sorted(item) if isinstance(item, frozenset) else item) for item in items)

    assert not found - allowed, f"new {what}(s), not allowed: {shown(found - allowed)}"
    assert not allowed - found, f"fixed {what}(s): remove them from the allowlist: {shown(allowed - found)}"


def test_every_module_has_a_room() -> None:
    for module in project_modules():
        room_of(module)


def test_no_module_imports_above_its_layer() -> None:
    found = {(edge.importer, edge.imported) for edge in all_edges() if upward(edge)}
    _exact(found, ALLOWED_UPWARD, "upward import")


def test_no_import_inside_a_function() -> None:
    found = {(edge.importer, edge.imported) for edge in all_edges() if edge.late and not edge.excused}
    _exact(found, ALLOWED_LATE, "late import")


def test_no_import_cycle() -> None:
    _exact(cycles(runtime_graph(all_edges())), ALLOWED_CYCLES, "cycle")


def test_the_rules_catch_what_they_forbid() -> None:
    """The checker itself: an upward edge, a driver reaching into the engine, and a two-module cycle."""
    assert upward(Edge("scheduler.model.template", "scheduler.store.state", False, 1, False))
    assert upward(Edge("drivers.tm.qcow2", "scheduler.engine.journal", False, 1, False))
    assert upward(Edge("drivers.tm.qcow2", "scheduler.faults", False, 1, False))
    assert not upward(Edge("drivers.tm.qcow2", "scheduler.model.objects.datastore", False, 1, False))
    assert not upward(Edge("scheduler.api.vms", "scheduler.backup.run", False, 1, False))
    graph = {"a.x": {"a.y"}, "a.y": {"a.x"}, "a.z": {"a.x"}}
    assert cycles(graph) == {frozenset({"a.x", "a.y"})}
    # through a package whose __init__ imports its submodules: b.run -> a (runs a/__init__) -> a.x -> b.run
    graph = {"a": {"a.x", "a.base"}, "a.x": {"a", "b.run"}, "a.base": {"a"}, "b.run": {"a", "a.base"}}
    assert cycles(graph) == {frozenset({"a", "a.x", "b.run"})}
    assert cycles({"a": {"a.x"}, "a.x": {"a", "a.y"}, "a.y": {"a"}}) == set()  # siblings through the package
