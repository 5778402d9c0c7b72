"""The journal steps of an in-place restore (and the temporary files of any disk fetch).

Before the swap, a restarted daemon undoes: it kills the copies, removes every temporary file journaled
and puts the VM's state back. Once the swap step is journaled every new disk was verified, so a restart
finishes the swap instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scheduler.engine.steps import Steps, VmStateSaved


@dataclass(frozen=True)
class Temp:
    """A temporary file about to be written on a host (a fetched copy, its raw conversion)."""

    KIND: ClassVar[str] = "temp"
    host: int
    path: str


@dataclass(frozen=True)
class Swap:
    """The verified new disks are about to replace the old: (current path, new file, old file) each."""

    KIND: ClassVar[str] = "swap"
    host: int
    domain: str
    vm: int
    disks: list[list[str]]


STEPS = Steps("restore", VmStateSaved, Temp, Swap)

__all__ = ["STEPS", "Swap", "Temp", "VmStateSaved"]
