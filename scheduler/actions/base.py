"""What every scheduled action is: a name, a check of its ARGS, and how it runs.

An action module declares one ``ActionSpec`` per ACTION name. ``validate`` checks ARGS alone (at
schedule time and again before a run); ``check`` (optional) checks them against the current
objects, e.g. that a backup's datastore exists. ``run`` performs the action for the engine and
returns a message for the run record; it raises a typed error (``ActionError``, ``DriverError``)
when it cannot, never pretending success.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from scheduler.config import Config
from scheduler.engine.clock import Clock
from scheduler.engine.sink import RunSink
from scheduler.errors import ActionError, ValidationError
from scheduler.hosts.links import HostLinks
from scheduler.model.objects.vm import Vm
from scheduler.model.schedule import SchedAction
from scheduler.store.state import State

_INT_RE = re.compile(r"[+-]?\d+")


@dataclass
class RunContext:
    """What the engine hands an action when it runs it."""

    run_id: int
    vm: Vm
    args: str
    action: SchedAction | None  # None for a run not started by a scheduled action
    state: State
    clock: Clock
    log: logging.LoggerAdapter[Any]
    cancelled: asyncio.Event
    links: HostLinks | None = None  # the VM's host's runner and libvirt connection
    config: Config | None = None  # sched.conf as it is when the run starts
    # journal a step, stage the run's success with the action's result, report progress, pass crash points
    sink: RunSink = field(default_factory=RunSink)

    def connections(self, refused: str) -> HostLinks:
        """The host connections; a run without them (a test's) refuses with ``refused``."""
        if self.links is None:
            raise ActionError(f"this daemon has no host connections; {refused}")
        return self.links


ArgsCheck = Callable[[str], None]
ObjectsCheck = Callable[[State, Vm, str], None]
Runner = Callable[[RunContext], Awaitable["str | None"]]


@dataclass(frozen=True)
class ActionSpec:
    name: str
    family: str  # "backup", "power", "snapshot": the module that defines it
    is_backup: bool  # goes through the backup admission limits
    validate: ArgsCheck
    run: Runner
    args_format: str = ""  # OpenNebula's ARGS format; "" when the action takes none
    check: ObjectsCheck | None = None


def malformed(action: str, args_format: str) -> ValidationError:
    """OpenNebula's message for ARGS that do not fit the action."""
    return ValidationError(f"Missing or malformed ARGS for: {action}. Format: {args_format or 'none'}")


def split_args(args: str) -> list[str]:
    """ARGS split on commas, each token stripped; no ARGS gives no tokens."""
    if not args.strip():
        return []
    return [token.strip() for token in args.split(",")]


def int_token(token: str) -> int | None:
    """An integer token (blanks around it allowed), None when it is not one."""
    token = token.strip()
    return int(token) if _INT_RE.fullmatch(token) else None


def bool_token(token: str) -> bool | None:
    """A boolean token: only ``0`` and ``1`` are accepted."""
    return {"0": False, "1": True}.get(token.strip())

