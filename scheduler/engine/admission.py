"""Admission control for backups: MAX_BACKUPS, MAX_BACKUPS_HOST, MAX_BACKUPS_DATASTORE.

A backup starts only when the global limit, its host's and its backup datastore's all have room
(0 = unlimited). Candidates are considered earliest due first (higher priority first at equal due
time); one that cannot start is skipped, never blocking those behind it whose own host and datastore
have room (OpenNebula ``break``s instead). Every candidate left waiting gets the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    max_backups: int = 5
    max_backups_host: int = 2
    max_backups_datastore: int = 0


@dataclass(frozen=True)
class Candidate:
    run_id: int
    due: float
    host_id: int
    host_name: str
    datastore_id: int
    datastore_name: str = ""
    priority: int = 0
    host_blocked: str = ""  # why the host cannot take work now ("" = it can)

    def order(self) -> tuple[float, int, int]:
        return (self.due, -self.priority, self.run_id)


@dataclass
class Running:
    """Backups actually running now, by host and by datastore."""

    total: int = 0
    per_host: Counter[int] = field(default_factory=Counter)
    per_datastore: Counter[int] = field(default_factory=Counter)

    def add(self, host_id: int, datastore_id: int) -> None:
        self.total += 1
        self.per_host[host_id] += 1
        self.per_datastore[datastore_id] += 1

    def remove(self, host_id: int, datastore_id: int) -> None:
        self.total -= 1
        self.per_host[host_id] -= 1
        self.per_datastore[datastore_id] -= 1
        if self.per_host[host_id] <= 0:
            del self.per_host[host_id]
        if self.per_datastore[datastore_id] <= 0:
            del self.per_datastore[datastore_id]

    def copy(self) -> Running:
        return Running(self.total, Counter(self.per_host), Counter(self.per_datastore))


@dataclass(frozen=True)
class Decision:
    admitted: list[Candidate]
    waiting: dict[int, str]  # run id -> reason


def blocking_reason(candidate: Candidate, running: Running, limits: Limits) -> str | None:
    """Why this candidate cannot start now, or None when it can."""
    if candidate.host_blocked:
        return f"waiting: {candidate.host_blocked}"
    if limits.max_backups and running.total >= limits.max_backups:
        return f"waiting: MAX_BACKUPS={limits.max_backups} reached"
    if limits.max_backups_host and running.per_host[candidate.host_id] >= limits.max_backups_host:
        return f"waiting: MAX_BACKUPS_HOST={limits.max_backups_host} reached on host {candidate.host_name}"
    if limits.max_backups_datastore and running.per_datastore[candidate.datastore_id] >= limits.max_backups_datastore:
        name = f" ({candidate.datastore_name})" if candidate.datastore_name else ""
        return (
            f"waiting: MAX_BACKUPS_DATASTORE={limits.max_backups_datastore} reached on datastore "
            f"{candidate.datastore_id}{name}"
        )
    return None


def admit(candidates: Iterable[Candidate], running: Running, limits: Limits) -> Decision:
    """Choose which waiting backups start now; ``running`` is not modified."""
    counts = running.copy()
    admitted: list[Candidate] = []
    waiting: dict[int, str] = {}
    for candidate in sorted(candidates, key=Candidate.order):
        reason = blocking_reason(candidate, counts, limits)
        if reason is None:
            admitted.append(candidate)
            counts.add(candidate.host_id, candidate.datastore_id)
        else:
            waiting[candidate.run_id] = reason
    return Decision(admitted, waiting)


def blocking_limit(reason: str) -> str:
    """The metric label of a waiting reason: global, host, datastore or host_state."""
    if "MAX_BACKUPS_HOST" in reason:
        return "host"
    if "MAX_BACKUPS_DATASTORE" in reason:
        return "datastore"
    if "MAX_BACKUPS=" in reason:
        return "global"
    return "host_state"
