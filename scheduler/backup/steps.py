"""The journal steps of a backup run, each written before the artifact it names exists.

The transfer driver journals its own (overlays, staged files, a frozen or paused guest) under ``"tm"``;
these are the run's: the VM state to put back, the staging dir on the hypervisor, every heavy process
started (killed by a restarted daemon), and the upload's backup id on the datastore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from scheduler.engine.steps import Steps, VmStateSaved


@dataclass(frozen=True)
class Staging:
    KIND: ClassVar[str] = "staging"
    host: int
    domain: str  # the domain's UUID
    path: str  # <BACKUP_BASE_PATH>/<vm_id>/<run_id> on the host


@dataclass(frozen=True)
class Process:
    """A process group started for the run: a convert ("source" side), an upload's copy or hash ("source"
    or "server"). ``marker`` (the staging dir) is in the command line of each."""

    KIND: ClassVar[str] = "process"
    side: str
    host: int
    pgid: int
    marker: str
    datastore: int | None = None  # set for the upload's processes


@dataclass(frozen=True)
class Upload:
    KIND: ClassVar[str] = "upload"
    datastore: int
    vm: int
    backup_id: str


STEPS = Steps("backup", VmStateSaved, Staging, Process, Upload)


def step(name: str, **fields: Any) -> dict[str, Any]:
    """A backup step's journal entry as JSON, as ``STEPS.entry`` writes it (for entries made by hand)."""
    return {STEPS.key: name, **fields}

__all__ = ["STEPS", "Process", "Staging", "Upload", "VmStateSaved", "step"]
