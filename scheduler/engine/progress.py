"""How far the running backups are: bytes done and to do, per disk and overall, for the API, /metrics
and the CLI's progress bar.

A backup moves its data twice: the hypervisor stages each disk (``capture``: qemu-img convert; the
bytes are the staged file's allocation against the disk chain's, an estimate), then sends the staged
files (``upload``: bytes arrived in the datastore's temporary directory against the files' sizes).
DONE and TOTAL count the current phase; ``record`` is the short last step. Held in memory only: a
restarted daemon starts its runs over, and their progress with them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

CAPTURE, UPLOAD, RECORD = "capture", "upload", "record"
_DISK_FILE = re.compile(r"disk\.(\d+)\.\d+\Z")


@dataclass
class Bytes:
    done: int = 0
    total: int = 0


@dataclass
class BackupProgress:
    """One backup run's progress; its methods are what the backup's drivers call back."""

    run_id: int
    vm_id: int
    started: float
    phase: str = "starting"
    disks: dict[int, Bytes] = field(default_factory=dict)
    other: Bytes = field(default_factory=Bytes)  # vm.xml, domain.xml: part of the upload's totals

    def begin(self, phase: str, disk_ids: list[int] | None = None) -> None:
        self.phase = phase
        for disk_id in disk_ids or list(self.disks):
            self.disks[disk_id] = Bytes()
        self.other = Bytes()

    def disk(self, disk_id: int, done: int, total: int) -> None:
        """The capture's report for one disk."""
        self.disks[disk_id] = Bytes(min(done, total), total)

    def files(self, done: Mapping[str, int], total: Mapping[str, int]) -> None:
        """The upload's report per file name: ``disk.<id>.<n>`` files count for their disk."""
        other = Bytes()
        for name, size in total.items():
            arrived = min(done.get(name, 0), size)
            match = _DISK_FILE.match(name)
            if match:
                self.disks[int(match.group(1))] = Bytes(arrived, size)
            else:
                other.done, other.total = other.done + arrived, other.total + size
        self.other = other

    @property
    def done(self) -> int:
        return sum(b.done for b in self.disks.values()) + self.other.done

    @property
    def total(self) -> int:
        return sum(b.total for b in self.disks.values()) + self.other.total

    def as_struct(self, now: float) -> dict[str, Any]:
        """The API's PROGRESS struct. Bytes are doubles: XML-RPC integers are 32-bit."""
        return {
            "PHASE": self.phase, "DONE": float(self.done), "TOTAL": float(self.total),
            "ELAPSED": round(max(0.0, now - self.started), 3), "RUN_ID": self.run_id,
            "DISKS": [{"DISK_ID": disk_id, "DONE": float(b.done), "TOTAL": float(b.total)}
                      for disk_id, b in sorted(self.disks.items())],
        }  # fmt: skip


class ProgressBoard:
    """The progress of every backup running now, by run id."""

    def __init__(self) -> None:
        self._runs: dict[int, BackupProgress] = {}

    def open(self, run_id: int, vm_id: int, now: float) -> BackupProgress:
        self._runs[run_id] = progress = BackupProgress(run_id, vm_id, now)
        return progress

    def close(self, run_id: int) -> None:
        self._runs.pop(run_id, None)

    def get(self, run_id: int) -> BackupProgress | None:
        return self._runs.get(run_id)

    def for_vm(self, vm_id: int) -> BackupProgress | None:
        return next((p for p in self._runs.values() if p.vm_id == vm_id), None)

    def __iter__(self) -> Iterator[BackupProgress]:
        return iter(list(self._runs.values()))
