"""ARCHITECTURE.md's module map names every module of scheduler/ and drivers/, and nothing that is gone.

A package ``__init__.py`` holding only its docstring may be left out of the map.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAPPED = re.compile(r"^\* `((?:scheduler|drivers)/[\w/]+\.py)` — ", re.M)


def modules() -> set[str]:
    found = set()
    for path in [*REPO.glob("scheduler/**/*.py"), *REPO.glob("drivers/**/*.py")]:
        if "__pycache__" in path.parts:
            continue
        body = ast.parse(path.read_text()).body
        docstring_only = len(body) <= 2 and all(
            isinstance(node, ast.Expr) or (isinstance(node, ast.ImportFrom) and node.module == "__future__")
            for node in body)
        if path.name == "__init__.py" and docstring_only:
            continue
        found.add(str(path.relative_to(REPO)))
    return found


def test_the_map_names_every_module_once_and_only_modules_that_exist() -> None:
    listed = MAPPED.findall((REPO / "ARCHITECTURE.md").read_text())
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert sorted(modules() - set(listed)) == [], "modules missing from ARCHITECTURE.md's map"
    assert sorted(set(listed) - modules()) == [], "ARCHITECTURE.md maps modules that do not exist"
