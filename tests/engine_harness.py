"""The real engine, journal, state and store on virtual time, with simulated actions, for tests.

A test writes its scenario as a coroutine and runs it with ``run_virtual``: the event loop's clock
jumps from timer to timer, so hours of schedule take milliseconds, and waits only for real I/O
(the store's commits). Hosts, datastores, VMs and scheduled actions are the real objects, written
through the real State to a real SQLite file, so a second engine can be started on the same file
(restart recovery). Each simulated action waits a scripted number of virtual seconds, then succeeds
or raises its scripted error (a retryable ``DriverError`` unless told otherwise); every call is
recorded as an ``Execution``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from scheduler.engine.admission import Limits
from scheduler.engine.journal import Journal, Run
from scheduler.engine.loop import Engine, EngineSettings
from scheduler.engine.simclock import VirtualClock, VirtualTimeLoop
from scheduler.engine.sink import RunSink
from scheduler.errors import DriverError
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.host import Host
from scheduler.model.objects.states import DatastoreType, HostState
from scheduler.model.objects.vm import History, Vm
from scheduler.model.schedule import EndType, Repeat, SchedAction
from scheduler.store.codecs import build_codecs
from scheduler.store.sqlite import Store
from scheduler.store.state import State

START = 1_767_225_600  # 2026-01-01 00:00:00 UTC, a Thursday
HOUR, DAY = 3600, 86_400
BACKUP_DS = 100  # the datastore id ``vm()`` and ``action()`` use unless told otherwise

T = TypeVar("T")


def run_virtual(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``scenario()`` on a fresh VirtualTimeLoop (virtual time starts at 0 = ``START``)."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(scenario())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def settings(max_backups: int = 0, max_backups_host: int = 0, max_backups_datastore: int = 0, *,
             retry_max: int = 0, retry_backoff: float = 60.0, missed_runs: str = "ONCE",
             timezone: str = "UTC") -> EngineSettings:
    """Engine settings for tests: no limits and no retries unless asked."""
    return EngineSettings(
        limits=Limits(max_backups, max_backups_host, max_backups_datastore), retry_max=retry_max,
        retry_backoff=retry_backoff, missed_runs=missed_runs, timezone=timezone, drain_time=0,
    )


@dataclass
class Execution:
    """One call of the executor: one attempt of one run."""

    run_id: int
    vm_id: int
    action: str
    action_id: int | None
    scheduled: float
    attempt: int
    host_id: int
    datastore_id: int
    started: float
    finished: float | None = None
    ok: bool | None = None  # None while running (or when cancelled)


@dataclass
class Script:
    """What simulated actions do: wait ``duration`` virtual seconds (per VM: ``durations``), then
    succeed, or fail with ``error`` on the first ``failing[vm id]`` attempts of each run: a ``DriverError``
    that is ``retryable`` or not, or an exception of class ``raises`` (a programming error, say)."""

    duration: float = 10.0
    durations: dict[int, float] = field(default_factory=dict)
    failing: dict[int, int] = field(default_factory=dict)
    error: str = "disk full"
    retryable: bool = True
    raises: type[Exception] | None = None

    def failure(self) -> Exception:
        return self.raises(self.error) if self.raises else DriverError(self.error, retryable=self.retryable)

    def duration_of(self, run: Run) -> float:
        return self.durations.get(run.vm_id, self.duration)

    def fails(self, run: Run) -> bool:
        return run.attempt <= self.failing.get(run.vm_id, 0)


class EngineHarness:
    """One engine over one state file. ``await open()``, add objects, ``await start()``, ``await close()``."""

    def __init__(self, path: Path, engine_settings: EngineSettings | None = None, script: Script | None = None,
                 recoverer: Callable[[Run], Awaitable[None]] | None = None) -> None:
        self.path = path
        self.settings = engine_settings or settings()
        self.script = script or Script()
        self.recoverer = recoverer
        # Called after a simulated action succeeds, before it returns (an action recording its result).
        self.on_success: Callable[[EngineHarness, Run], Awaitable[None]] | None = None
        self.executions: list[Execution] = []
        self.changed = asyncio.Event()
        self.engine: Engine | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = 0
        self.max_running = 0  # most executions in flight at once (all actions)

    # -- set-up ----------------------------------------------------------------------------------
    async def open(self, start: float = START) -> EngineHarness:
        """Open (or reopen) the state file; virtual time 0 of this loop is the epoch ``start``."""
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop), "run the scenario with run_virtual()"
        self.clock = VirtualClock(loop, start)
        self.store = await Store.open(self.path)
        loop.busy = lambda: self.store.busy
        self.state = State(self.store, build_codecs())
        # Commit at once: the group-commit window would add its millisecond of (virtual) latency to
        # every burst, and the tests compare exact times.
        self.state.commit_window = 0
        await self.state.load()
        self.journal = Journal(self.state)
        self.state.flush_hooks.append(self._committed)
        self.state.listeners.append(lambda *_: self.changed.set())
        return self

    def now(self) -> float:
        return self.clock.now()

    def host(self, host_id: int, state: HostState = HostState.MONITORED) -> Host:
        host = Host(id=host_id, name=f"kvm{host_id}", state=state)
        self.state.update_soon("host", host)
        return host

    def datastore(self, ds_id: int = BACKUP_DS) -> Datastore:
        datastore = Datastore(id=ds_id, name=f"backups{ds_id}", type=DatastoreType.BACKUP_DS, ds_mad="fs")
        self.state.update_soon("datastore", datastore)
        return datastore

    def vm(self, vm_id: int, host_id: int) -> Vm:
        vm = Vm(id=vm_id, name=f"vm{vm_id}", history=[History(0, f"kvm{host_id}", host_id)])
        self.state.update_soon("vm", vm)
        return vm

    def action(self, vm_id: int, action: str = "backup", *, time: float, args: str | None = None,
               repeat: Repeat = Repeat.NONE, days: str = "", end_type: EndType = EndType.NONE,
               end_value: int = -1) -> SchedAction:
        """A scheduled action of a VM (a backup to BACKUP_DS unless ``args`` says otherwise)."""
        if args is None:
            args = f"{BACKUP_DS},0" if action == "backup" else ""
        sa = SchedAction(
            id=self.state.allocate_id("schedaction"), parent_id=vm_id, action=action, args=args, time=int(time),
            repeat=repeat, days=days, end_type=end_type, end_value=end_value,
        )
        self.state.update_soon("schedaction", sa)
        return sa

    def delete(self, kind: str, obj_id: int) -> None:
        self.state.update_soon(kind, None, obj_id)

    def sched(self, sa_id: int) -> SchedAction:
        """The scheduled action as it is now."""
        return self.state.get("schedaction", sa_id)

    # -- running ---------------------------------------------------------------------------------
    async def start(self) -> Engine:
        await self.state.durable()
        self.engine = Engine(self.state, self.journal, self.clock, self.settings, self._execute,
                             is_backup=lambda action: action == "backup", recoverer=self.recoverer)
        self.engine.stats.lateness = []
        self._task = asyncio.create_task(self.engine.run())
        await self.engine.ready.wait()
        return self.engine

    async def wait_for(self, predicate: Callable[[], bool], within: float) -> None:
        """Until ``predicate()`` holds, checked after every commit, object change and execution step;
        TimeoutError after ``within`` virtual seconds."""
        async with asyncio.timeout(within):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def until(self, epoch: float) -> None:
        """Let the engine work until the virtual clock reads ``epoch``."""
        if epoch > self.now():
            await asyncio.sleep(epoch - self.now())

    async def settle(self) -> None:
        """Let the engine react to what just changed (no virtual time passes): until the loop has
        nothing left to do at this instant, with every change committed."""
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        await loop.idle()
        await self.state.durable()
        await loop.idle()

    async def crash_copy(self, target: Path) -> Path:
        """What a crash at this instant leaves on disk: the committed state, copied to ``target``."""
        await self.state.durable()
        with sqlite3.connect(self.path) as source, sqlite3.connect(target) as copy:
            source.backup(copy)
        source.close()
        copy.close()
        return target

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.stop(0)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.state.close()
        await self.store.close()

    async def runs(self) -> list[tuple[Any, ...]]:
        """(id, action_id, vm_id, scheduled, state, attempt, started_at, finished_at, message) of every row."""
        await self.state.durable()
        return [tuple(row) for row in await self.store.query(
            "SELECT id, action_id, vm_id, scheduled, state, attempt, started_at, finished_at, message"
            " FROM runs ORDER BY id")]

    # -- the simulated actions -------------------------------------------------------------------
    async def _execute(self, run: Run, sink: RunSink) -> str:
        record = Execution(run.id, run.vm_id, run.action, run.action_id, run.scheduled, run.attempt, run.host_id,
                           run.datastore_id, self.now())
        self.executions.append(record)
        self._running += 1
        self.max_running = max(self.max_running, self._running)
        self.changed.set()
        try:
            await asyncio.sleep(self.script.duration_of(run))
            record.finished = self.now()
            record.ok = not self.script.fails(run)
        finally:
            self._running -= 1
            self.changed.set()
        if not record.ok:
            raise self.script.failure()
        if self.on_success is not None:
            await self.on_success(self, run)
        return "simulated"

    def _committed(self) -> tuple[list[Any], Callable[[bool], None]]:
        return [], lambda ok: self.changed.set()
