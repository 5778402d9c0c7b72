"""The dependency lock (requirements*.txt, `make lock`) agrees with pyproject.toml and with the venv.

pyproject declares the direct dependencies and their ranges; the lock pins the whole tree with hashes
and is the only thing scripts/setup.sh installs. These checks fail when someone edits one without the
other (run `make lock`), or when the venv holds something the lock does not name.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


@dataclass
class Pin:
    version: str
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


def read_lock(name: str) -> dict[str, Pin]:
    """``name==version \\`` blocks with their ``--hash`` lines and ``# via`` comments."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in (REPO / name).read_text().splitlines():
        if match := _PIN.match(line):
            current = pins.setdefault(canonicalize_name(match[1]), Pin(match[2]))
        elif current is not None and (hashed := line.strip()).startswith("--hash="):
            current.hashes.append(hashed.removeprefix("--hash=").rstrip(" \\"))
        elif current is not None and line.startswith("    #"):
            current.via.append(line.strip("# ").removeprefix("via ").strip())
    return pins


def requirements(group: str) -> list[Requirement]:
    if group == "build":
        texts = PROJECT["build-system"]["requires"]
    elif group == "runtime":
        texts = PROJECT["project"]["dependencies"]
    else:
        texts = PROJECT["project"]["optional-dependencies"][group]
    return [Requirement(text) for text in texts]


LOCKS = {
    "requirements-build.txt": ["build"],
    "requirements.txt": ["runtime"],
    "requirements-test.txt": ["runtime", "test"],
}


@pytest.mark.parametrize(("lock", "groups"), LOCKS.items())
def test_every_direct_dependency_is_pinned_within_its_range(lock: str, groups: list[str]) -> None:
    pins = read_lock(lock)
    wrong = []
    for requirement in (r for group in groups for r in requirements(group)):
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None or not requirement.specifier.contains(pin.version, prereleases=True):
            wrong.append(f"{requirement} is locked as {pin.version if pin else 'nothing'}")
    assert not wrong, f"{lock} disagrees with pyproject.toml (run `make lock`): {wrong}"


@pytest.mark.parametrize("lock", LOCKS)
def test_the_lock_names_exactly_pyprojects_direct_dependencies(lock: str) -> None:
    """A dependency dropped from pyproject leaves the lock too; every pin comes from something."""
    pins = read_lock(lock)
    declared = {canonicalize_name(r.name) for group in LOCKS[lock] for r in requirements(group)}
    from_pyproject = {name for name, pin in pins.items() if any("(pyproject.toml" in via for via in pin.via)}
    assert from_pyproject == declared, f"{lock}: run `make lock`"
    assert all(pin.via for pin in pins.values()), f"{lock}: a pin without its reason"


@pytest.mark.parametrize("lock", LOCKS)
def test_every_pin_carries_its_hashes(lock: str) -> None:
    pins = read_lock(lock)
    assert pins
    unhashed = [name for name, pin in pins.items() if not pin.hashes]
    assert not unhashed, f"{lock}: pins without --hash (pip --require-hashes refuses them): {unhashed}"
    assert all(h.startswith("sha256:") and len(h) == len("sha256:") + 64 for p in pins.values() for h in p.hashes)


def test_the_test_lock_has_the_services_versions() -> None:
    """`make run` and `make test` install the same versions of what the service runs on."""
    service, test = read_lock("requirements.txt"), read_lock("requirements-test.txt")
    differ = {name: (pin.version, test[name].version if name in test else None)
              for name, pin in service.items() if name not in test or test[name].version != pin.version}
    assert not differ


def test_the_venv_holds_exactly_the_lock() -> None:
    """What setup.sh installed is the lock, package for package: nothing unlocked rides along."""
    assert (Path(sys.prefix) / ".installed-requirements-test.txt").exists(), (
        f"{sys.prefix} was not installed by `scripts/setup.sh --test` (run `make test`)"
    )
    locked = {name: pin.version for lock in LOCKS for name, pin in read_lock(lock).items()}
    locked["vmsched"] = PROJECT["project"]["version"]
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    assert installed == locked
