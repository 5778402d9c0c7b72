"""How the daemon carries out a run: the action registry, or (tests only) a simulated action.

``VMSCHED_SIMULATE_ACTIONS="backup=2.5,reboot=0"`` makes the named actions only wait that many
seconds and succeed. It exists for the daemon crash tests and is logged loudly when set; it is never
read from sched.conf.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from scheduler.actions.base import RunContext
from scheduler.actions.registry import check_action, spec_of
from scheduler.config import Config
from scheduler.engine.clock import Clock
from scheduler.engine.journal import Run
from scheduler.engine.loop import Recoverer
from scheduler.engine.progress import ProgressBoard
from scheduler.engine.sink import RunSink
from scheduler.errors import ActionError, ValidationError
from scheduler.hosts.links import HostLinks
from scheduler.store.state import State

log = logging.getLogger(__name__)

SIMULATE_ENV = "VMSCHED_SIMULATE_ACTIONS"


def simulated_durations(environ: dict[str, str] | None = None) -> dict[str, float]:
    text = (os.environ if environ is None else environ).get(SIMULATE_ENV, "")
    durations: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, seconds = item.partition("=")
        try:
            durations[name.strip()] = float(seconds)
        except ValueError:
            raise ValidationError(f"{SIMULATE_ENV}: bad item {item!r}; expected ACTION=SECONDS") from None
    return durations


class Configured(Protocol):
    """Where the current sched.conf is (the daemon: it replaces ``config`` on SIGHUP)."""

    config: Config


def make_executor(state: State, clock: Clock, simulate: dict[str, float], links: HostLinks | None = None,
                  configured: Configured | None = None,
                  progress: ProgressBoard | None = None) -> Callable[[Run, RunSink], Awaitable[str | None]]:
    """``configured``: where the current sched.conf is; ``progress``: where running backups report how far
    they are."""
    if simulate:
        log.warning("%s is set: %s are simulated, not performed", SIMULATE_ENV, ", ".join(sorted(simulate)))

    async def execute(run: Run, sink: RunSink) -> str | None:
        vm = state.vms.find(run.vm_id)
        if vm is None:
            raise ActionError(f"VM {run.vm_id} does not exist any more")
        if run.action in simulate:
            await asyncio.sleep(simulate[run.action])
            return f"simulated {run.action}"
        spec = spec_of(run.action)
        check_action(state, vm, run.action, run.args)
        action = state.schedactions.find(run.action_id) if run.action_id is not None else None
        if progress is not None and spec.is_backup:
            sink.progress = progress.open(run.id, run.vm_id, clock.now())
        context = RunContext(
            run_id=run.id, vm=vm, args=run.args, action=action, state=state, clock=clock,
            log=logging.LoggerAdapter(logging.getLogger(f"scheduler.actions.{spec.family}"), {}),
            cancelled=asyncio.Event(), links=links, config=configured.config if configured is not None else None, sink=sink,
        )  # fmt: skip
        try:
            return await spec.run(context)
        finally:
            if progress is not None:
                progress.close(run.id)

    return execute


@dataclass(frozen=True)
class RecovererByAction:
    """The engine's one recoverer: the run's action's own (``by_action``), else ``default``."""

    default: Recoverer | None
    by_action: Mapping[str, Recoverer]

    async def __call__(self, run: Run) -> None:
        chosen = self.by_action.get(run.action, self.default)
        if chosen is not None:
            await chosen(run)
