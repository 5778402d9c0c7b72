"""The run journal: one row per execution, written before its first side effect.

A run is keyed by (scheduled action, occurrence time); a one-shot request (``one.vm.backup``) has no
action. Rows are kept in memory while the run is open and written by the state's group commit, so
``await journal.durable()`` after ``save`` means the row is on disk. Finished rows stay in the table
as history.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from scheduler.engine.outcome import OutcomeKind
from scheduler.store.state import State


class RunState(StrEnum):
    QUEUED = "queued"  # journaled, waiting for its VM, for admission, or for a retry time
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # a failed attempt of an action that is not retried
    GIVEN_UP = "given_up"  # the last retry failed
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the daemon died while it ran; not run again (power/snapshot)

    @property
    def open(self) -> bool:
        return self in (RunState.QUEUED, RunState.RUNNING)


@dataclass
class Run:
    id: int
    vm_id: int
    action: str
    args: str
    scheduled: float  # the occurrence this run is for (epoch)
    action_id: int | None = None  # None for one-shot requests
    state: RunState = RunState.QUEUED
    attempt: int = 0  # attempts started so far
    not_before: float = 0.0  # retry backoff: not started before this time
    queued_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    host_id: int = -1
    datastore_id: int = -1
    priority: int = 0
    message: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)  # artifacts journaled by the action
    outcome: str = ""  # scheduler.engine.outcome.OutcomeKind of the last attempt that ended, "" before
    error_class: str = ""  # the exception class of a failed attempt

    def row(self) -> tuple[Any, ...]:
        return (
            self.id, self.action_id, self.vm_id, self.action, self.args, self.scheduled, self.state.value,
            self.attempt, self.not_before, self.queued_at, self.started_at, self.finished_at, self.host_id,
            self.datastore_id, self.priority, self.message, _steps_json(self.steps), self.outcome, self.error_class,
        )  # fmt: skip

    def changes(self) -> tuple[Any, ...]:
        """What can change after the row is written, for an UPDATE by id."""
        return (
            self.state.value, self.attempt, self.not_before, self.started_at, self.finished_at, self.host_id,
            self.datastore_id, self.message, _steps_json(self.steps), self.outcome, self.error_class, self.id,
        )  # fmt: skip

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Run:
        (run_id, action_id, vm_id, action, args, scheduled, state, attempt, not_before, queued_at, started_at,
         finished_at, host_id, datastore_id, priority, message, steps, outcome, error_class) = row  # fmt: skip
        return cls(
            id=run_id, action_id=action_id, vm_id=vm_id, action=action, args=args, scheduled=scheduled,
            state=RunState(state), attempt=attempt, not_before=not_before, queued_at=queued_at,
            started_at=started_at, finished_at=finished_at, host_id=host_id, datastore_id=datastore_id,
            priority=priority, message=message, steps=json.loads(steps), outcome=outcome, error_class=error_class,
        )  # fmt: skip


def _steps_json(steps: list[dict[str, Any]]) -> str:
    return json.dumps(steps) if steps else "[]"


COLUMNS = (
    "id, action_id, vm_id, action, args, scheduled, state, attempt, not_before, queued_at, started_at,"
    " finished_at, host_id, datastore_id, priority, message, steps, outcome, error_class"
)
_INSERT = f"INSERT INTO runs ({COLUMNS}) VALUES ({', '.join('?' * 19)})"
_UPDATE = (
    "UPDATE runs SET state = ?, attempt = ?, not_before = ?, started_at = ?, finished_at = ?, host_id = ?,"
    " datastore_id = ?, message = ?, steps = ?, outcome = ?, error_class = ? WHERE id = ?"
)


class Journal:
    def __init__(self, state: State) -> None:
        self.state = state
        self.open: dict[int, Run] = {}
        self._dirty: dict[int, Run] = {}
        self._written: set[int] = set()  # open runs whose row exists (or is being written)
        self._next_id = 1
        state.flush_hooks.append(self._write)

    async def load(self) -> list[Run]:
        """The runs left open by the previous daemon, oldest first."""
        rows = await self.state.store.query(
            f"SELECT {COLUMNS} FROM runs WHERE state IN ('queued', 'running') ORDER BY id"
        )
        [(last,)] = await self.state.store.query("SELECT coalesce(max(id), 0) FROM runs")
        self._next_id = int(last) + 1
        runs = [Run.from_row(tuple(row)) for row in rows]
        self.open = {run.id: run for run in runs}
        self._written = set(self.open)
        return runs

    def new_run(self, **fields: Any) -> Run:
        run = Run(id=self._next_id, **fields)
        self._next_id += 1
        self.save(run)
        return run

    def save(self, run: Run) -> None:
        """Record the run's current fields with the next group commit."""
        if run.state.open:
            self.open[run.id] = run
        else:
            self.open.pop(run.id, None)
        self._dirty[run.id] = run
        self.state.mark_dirty()

    async def durable(self) -> None:
        await self.state.durable()

    def _write(self) -> tuple[list[tuple[str, list[tuple[Any, ...]]]], Callable[[bool], None]]:
        dirty, self._dirty = self._dirty, {}
        inserts, updates, new_ids, updated = [], [], [], []
        for run in dirty.values():
            if run.id in self._written:
                updates.append(run.changes())
                updated.append(run.id)
            else:
                inserts.append(run.row())
                new_ids.append(run.id)
            if not run.state.open:
                self._written.discard(run.id)
        self._written.update(i for i, run in zip(new_ids, (dirty[i] for i in new_ids), strict=True) if run.state.open)

        def done(committed: bool) -> None:
            if not committed:  # written again with the next commit, as before
                self._written.difference_update(new_ids)
                self._written.update(updated)
                self._dirty = {**dirty, **self._dirty}

        ops = [(_INSERT, inserts), (_UPDATE, updates)]
        return [op for op in ops if op[1]], done

    @staticmethod
    def done_statement(run: Run, when: float, message: str = "") -> tuple[str, tuple[Any, ...]]:
        """The UPDATE closing ``run`` as done, for a transaction that records the run's result."""
        closed = dataclasses.replace(run, state=RunState.DONE, finished_at=when, message=message,
                                     steps=list(run.steps), outcome=OutcomeKind.DONE.value, error_class="")
        return _UPDATE, closed.changes()

    async def history(self, vm_id: int, limit: int = 20) -> list[Run]:
        rows = await self.state.store.query(
            f"SELECT {COLUMNS} FROM runs WHERE vm_id = ? ORDER BY id DESC LIMIT ?", (vm_id, limit)
        )
        return [Run.from_row(tuple(row)) for row in rows]
