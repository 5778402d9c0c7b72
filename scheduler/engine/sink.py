"""Where a running action reports to the engine: one RunSink per run, instead of callbacks.

The engine builds the sink when it starts an attempt and hands it to the executor with the run. An
action journals a step (durable before the artifact it names exists), stages its success into its own
transaction (so its result and the run's completion commit together), reports progress, and passes
named points (where the crash-recovery tests stop the daemon). A sink built without a run (a test's
context, a simulated action) journals nothing and has nothing to stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from scheduler import faults
from scheduler.engine.journal import Journal, Run
from scheduler.engine.progress import BackupProgress
from scheduler.store.state import Mutation


class SuccessRecorder(Protocol):
    """The engine, as the sink sees it."""

    def stage_success(self, run: Run, m: Mutation) -> None: ...


@dataclass
class RunSink:
    run: Run | None = None
    journal: Journal | None = None
    recorder: SuccessRecorder | None = None
    progress: BackupProgress | None = None  # a backup's: what the API and /metrics show of it

    async def step(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` to the run's journaled steps; return once it is durable."""
        if self.run is None or self.journal is None:
            return
        self.run.steps.append(entry)
        self.journal.save(self.run)
        await self.journal.durable()

    def complete(self, m: Mutation) -> None:
        """Stage the run's success into ``m``, the action's own transaction holding its result."""
        if self.run is not None and self.recorder is not None:
            self.recorder.stage_success(self.run, m)

    def reached(self, point: str) -> None:
        """A named point of the run: where ``VMSCHED_CRASH_AT`` stops the daemon (test use only)."""
        faults.crash_point(point)


__all__ = ["RunSink", "SuccessRecorder"]
