"""Outside ``drivers/datastore/`` nothing knows which kinds of backup datastore exist: no branch on
``ds_mad``, no isinstance of a driver class, no import of one driver's module. Adding a driver then
touches only its own module and the registry (``drivers/datastore/__init__.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from drivers.datastore import DRIVERS

REPO = Path(__file__).resolve().parents[1]
DRIVER_MODULES = {f"drivers.datastore.{name}" for name in DRIVERS}
DRIVER_CLASSES = {cls.__name__ for cls in DRIVERS.values()}  # type: ignore[attr-defined]


def outside_modules() -> list[Path]:
    files = [*REPO.glob("scheduler/**/*.py"), *REPO.glob("drivers/**/*.py")]
    inside = REPO / "drivers" / "datastore"
    return sorted(p for p in files if "__pycache__" not in p.parts and inside not in p.parents)


def _names_ds_mad(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "ds_mad"


def _is_registry(node: ast.AST) -> bool:
    """A registry of drivers by kind (``DRIVERS``, ``IMAGE_DRIVERS``), the one thing ds_mad may be looked up in."""
    return isinstance(node, ast.Name) and node.id.endswith("DRIVERS")


def leaks(source: str) -> list[str]:
    """What in ``source`` knows a datastore kind: ds_mad compared to a kind, a driver class, a driver module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            if any(_names_ds_mad(side) for side in (node.left, *node.comparators)):
                found.append(f"line {node.lineno}: ds_mad compared")
        elif isinstance(node, ast.Compare) and _names_ds_mad(node.left) and not _is_registry(node.comparators[0]):
            found.append(f"line {node.lineno}: ds_mad tested against a list of kinds")
        elif isinstance(node, ast.Name) and node.id in DRIVER_CLASSES:
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.ImportFrom) and node.module in DRIVER_MODULES:
            found.append(f"line {node.lineno}: imports {node.module}")
    return found


def test_the_check_sees_each_kind_of_leak() -> None:
    assert leaks("if ds.ds_mad == 'restic': pass") == ["line 1: ds_mad compared"]
    assert leaks("ok = ds.ds_mad in ('rsync', 'fs')") == ["line 1: ds_mad tested against a list of kinds"]
    assert leaks("ok = ds.ds_mad not in KINDS") == ["line 1: ds_mad tested against a list of kinds"]
    assert leaks("assert isinstance(s, ResticDatastore)") == ["line 1: ResticDatastore"]
    assert leaks("from drivers.datastore.rsync import priority") == ["line 1: imports drivers.datastore.rsync"]
    assert leaks("kind = ds.ds_mad.upper()\nknown = ds.ds_mad in DRIVERS") == []


@pytest.mark.parametrize("path", outside_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_datastore_kind_is_known_outside_the_drivers(path: Path) -> None:
    assert leaks(path.read_text()) == []
