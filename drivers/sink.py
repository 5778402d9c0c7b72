"""What a driver tells the run it works for, as one object: the steps to journal, the processes it
started, how far it is, and the named points it passed.

The scheduler's backup run implements it (journal in the run's record, process groups kept for the
kill at start-up, progress for the API, crash points for the recovery tests); :data:`NO_SINK` is
for callers that want none of it (a recovery, a test), :class:`NoSink` the base of those that want a part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class DriverSink(Protocol):
    async def journal(self, entry: dict[str, Any]) -> None:
        """Make ``entry`` durable; the artifact it names is created only after this returns."""

    async def process_started(self, side: str, pgid: int) -> None:
        """A heavy command's process group started on ``side`` ("source": the hypervisor; "server")."""

    def disk_progress(self, disk_id: int, done: int, total: int) -> None:
        """Bytes of a disk staged so far, against the bytes to stage (an estimate)."""

    def files_progress(self, done: Mapping[str, int], total: Mapping[str, int]) -> None:
        """Bytes uploaded so far per file name, against each file's size."""

    def reached(self, point: str) -> None:
        """A named point of the work passed ("quiesced", "snapshot", "converted")."""


class NoSink:
    """A sink that wants nothing; subclass it to hear only some of what a driver tells."""

    async def journal(self, entry: dict[str, Any]) -> None:
        return None

    async def process_started(self, side: str, pgid: int) -> None:
        return None

    def disk_progress(self, disk_id: int, done: int, total: int) -> None:
        return None

    def files_progress(self, done: Mapping[str, int], total: Mapping[str, int]) -> None:
        return None

    def reached(self, point: str) -> None:
        return None


NO_SINK: DriverSink = NoSink()

__all__ = ["NO_SINK", "DriverSink", "NoSink"]
