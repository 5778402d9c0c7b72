"""Pure parts of capturing file disks: vmsched's file names, request checks, qemu-img argv and output,
the journal steps of a capture and what a crashed capture left behind.

Names are what makes a file vmsched's: an overlay is ``<disk file>.vmsched-<run>.overlay`` beside the
VM's disk (INCREMENT_MODE=SNAPSHOT's: ``<disk file>.vmsched-snap.<vm_id>.<n>``), a staged copy is ``<staging dir>/disk.<disk_id>.<increment>`` where the staging dir is
``<BACKUP_BASE_PATH>/<vm_id>/<run>``. Recovery removes only files whose names match the run they were
journaled for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any

from drivers.vmm.checkpoints import parse_checkpoint_name
from drivers.vmm.domainxml import Disk
from scheduler.errors import ValidationError

TM = "qcow2"  # the ``tm`` key of every journal step this driver writes
FORMATS = ("qcow2", "raw")
CONVERT_COROUTINES = 4  # qemu-img convert -m: parallel requests per disk, as OpenNebula's backup tool
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
_STAGING_FILE = re.compile(r"disk\.\d+\.\d+\Z")
RBD_SNAPSHOT_PREFIX = "vmsched-"
_CHAIN_SNAPSHOT = re.compile(rf"{RBD_SNAPSHOT_PREFIX}chain-([0-9]{{1,10}})-([0-9]{{1,10}})\Z")
_SNAPSHOT_OVERLAY = re.compile(r"(?P<base>/.+)\.vmsched-snap\.(?P<vm>\d+)\.(?P<n>\d+)\Z")


class FsFreeze(StrEnum):
    """``BACKUP_CONFIG/FS_FREEZE``: how the guest is quiesced for the snapshot (spec §4.7)."""

    NONE = "NONE"
    AGENT = "AGENT"
    SUSPEND = "SUSPEND"


def fs_freeze(value: str | None) -> FsFreeze:
    """The mode named by ``value``; anything else is NONE, as OpenNebula's core normalises it."""
    try:
        return FsFreeze((value or "").strip().upper())
    except ValueError:
        return FsFreeze.NONE


class Step(StrEnum):
    """Journal step names; each is written before the artifact it names exists (thawed, resumed and
    committed after the fact they record)."""

    FROZEN = "frozen"
    THAWED = "thawed"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    OVERLAY = "overlay"
    STAGING = "staging"
    COMMITTED = "committed"
    CHECKPOINT = "checkpoint"  # an increment's libvirt checkpoint (and its bitmaps), created with its backup job
    NEXT_OVERLAY = "next-overlay"  # INCREMENT_MODE=SNAPSHOT: the overlay the VM runs on until the next increment
    RBD_SNAPSHOT = "rbd-snapshot"  # a run's snapshot of an RBD disk (pool, image, snapshot, access), removed after


@dataclass(frozen=True)
class DiskSource:
    """One disk to back up: OpenNebula's DISK_ID, the libvirt target and the file the VM runs on."""

    disk_id: int
    target: str
    path: str
    format: str


# ------------------------------------------------------------------------------------------------ names


def check_run_id(run_id: int | str) -> str:
    text = str(run_id)
    if not _RUN_ID.match(text):
        raise ValidationError(f"run id {text!r} is not a plain token (letters, digits, '-', '_')")
    return text


def overlay_path(disk_path: str, run_id: int | str) -> str:
    """The overlay of ``disk_path`` for a run: beside the disk, never on the staging space."""
    return f"{disk_path}.vmsched-{check_run_id(run_id)}.overlay"


def staging_dir(base: str, vm_id: int, run_id: int | str) -> str:
    """``<BACKUP_BASE_PATH>/<vm_id>/<run>``."""
    return str(PurePosixPath(base) / str(vm_id) / check_run_id(run_id))


def staging_file(directory: str, disk_id: int, increment: int = 0) -> str:
    return str(PurePosixPath(directory) / f"disk.{disk_id}.{increment}")


def rbd_snapshot_name(run_id: int | str) -> str:
    """The snapshot a run takes of each RBD disk: ``vmsched-<run>`` (see drivers/tm/rbdplan.py)."""
    return f"{RBD_SNAPSHOT_PREFIX}{check_run_id(run_id)}"


def chain_snapshot_name(vm_id: int, number: int) -> str:
    """The RBD snapshot anchoring increment ``number`` of VM ``vm_id``'s chain: ``vmsched-chain-<vm>-<n>``."""
    return f"{RBD_SNAPSHOT_PREFIX}chain-{int(vm_id)}-{int(number)}"


def parse_chain_snapshot(name: str) -> tuple[int, int] | None:
    """(VM id, increment) of a chain anchor's name; None for any other snapshot."""
    found = _CHAIN_SNAPSHOT.match(name)
    return (int(found.group(1)), int(found.group(2))) if found else None


def snapshot_overlay_path(base: str, vm_id: int, number: int) -> str:
    """INCREMENT_MODE=SNAPSHOT: overlay ``number`` of disk file ``base`` of VM ``vm_id``, beside the disk."""
    return f"{base}.vmsched-snap.{int(vm_id)}.{int(number)}"


def parse_snapshot_overlay(path: str) -> tuple[str, int, int] | None:
    """(disk file, VM id, overlay number) of a path named like a SNAPSHOT overlay; None for any other."""
    found = _SNAPSHOT_OVERLAY.match(path)
    if found is None or not _plain_absolute(PurePosixPath(path)):
        return None
    return found["base"], int(found["vm"]), int(found["n"])


def is_snapshot_overlay(path: str) -> bool:
    return parse_snapshot_overlay(path) is not None


def _plain_absolute(path: PurePosixPath) -> bool:
    return path.is_absolute() and ".." not in path.parts


def is_overlay_of_run(path: str, run_id: str) -> bool:
    pure, suffix = PurePosixPath(path), f".vmsched-{run_id}.overlay"
    return _plain_absolute(pure) and pure.name.endswith(suffix) and len(pure.name) > len(suffix)


def is_staging_of_run(path: str, run_id: str) -> bool:
    pure = PurePosixPath(path)
    return _plain_absolute(pure) and pure.parent.name == run_id and bool(_STAGING_FILE.match(pure.name))


# ------------------------------------------------------------------------------------------------ checks


def check_request(disks: Sequence[DiskSource], run_id: int | str, staging: str, *, more: int = 0) -> str:
    """The run id as text, after refusing what cannot be captured: no disks, duplicate ids or targets,
    relative paths, formats other than qcow2/raw, a staging dir not named after the run."""
    run = check_run_id(run_id)
    if not disks and not more:  # ``more``: disks of other kinds (RBD) captured with these
        raise ValidationError("no disks to back up")
    for attribute in ("disk_id", "target", "path"):
        values = [getattr(d, attribute) for d in disks]
        if len(set(values)) != len(values):
            raise ValidationError(f"the same {attribute} appears twice in the disks to back up: {values}")
    for disk in disks:
        if not PurePosixPath(disk.path).is_absolute():
            raise ValidationError(f"disk {disk.disk_id} ({disk.target}): path {disk.path!r} is not absolute")
        if disk.format not in FORMATS:
            raise ValidationError(f"disk {disk.disk_id} ({disk.target}) is {disk.format!r}; file disks must be "
                                  f"one of {', '.join(FORMATS)}")
    if not PurePosixPath(staging).is_absolute() or PurePosixPath(staging).name != run:
        raise ValidationError(f"staging dir {staging!r} must be an absolute path ending in the run id {run!r}")
    return run


def check_sources(disks: Iterable[DiskSource], current: Sequence[Disk]) -> None:
    """Refuse unless the domain runs each disk on exactly the file and format asked for (a disk already on
    an overlay, or moved since the request was built, is not captured)."""
    by_target = {d.target: d for d in current}
    for disk in disks:
        now = by_target.get(disk.target)
        if now is None:
            raise ValidationError(f"disk {disk.disk_id}: the domain has no disk {disk.target!r} "
                                  f"(disks: {', '.join(by_target) or 'none'})")
        if now.type != "file" or not now.writable_disk:
            raise ValidationError(f"disk {disk.disk_id} ({disk.target}) is a {now.type} {now.device}, "
                                  "not a writable file disk")
        if (now.path, now.format) != (disk.path, disk.format):
            raise ValidationError(f"disk {disk.disk_id} ({disk.target}) runs on {now.path} ({now.format}), "
                                  f"not on {disk.path} ({disk.format})")


# ------------------------------------------------------------------------------------------------ qemu-img


def convert_argv(disk: DiskSource, target: str, *, shared: bool, rate_limit: int = 0) -> list[str]:
    """``qemu-img convert`` of a disk (with its backing chain, flattened) into a sparse qcow2.

    ``shared`` (-U) reads an image QEMU holds open: the frozen base of a live snapshot, which nothing
    writes any more. A powered-off disk is read with the lock taken, so the VM cannot start meanwhile.
    ``rate_limit``: bytes per second (qemu-img -r), 0 for none."""
    argv = ["qemu-img", "convert", "-q", "-m", str(CONVERT_COROUTINES), "-f", disk.format, "-O", "qcow2"]
    if shared:
        argv.append("-U")
    if rate_limit:
        argv += ["-r", str(rate_limit)]
    return [*argv, disk.path, target]


def image_sizes(info_json: str | bytes) -> tuple[int, int]:
    """(virtual size, bytes allocated on the host) from ``qemu-img info --output=json``."""
    info = json.loads(info_json)
    return int(info["virtual-size"]), int(info.get("actual-size", 0))


def chain_allocated(info_json: str | bytes) -> int:
    """Bytes allocated on the host by every file of a backing chain (what a convert reads, roughly)."""
    infos = json.loads(info_json)
    return sum(int(info.get("actual-size", 0)) for info in (infos if isinstance(infos, list) else [infos]))


def allocated_sizes(stat_output: bytes, count: int) -> list[int | None]:
    """Bytes allocated per file from ``stat -c '%b %B'`` lines; None for a file stat could not read
    (its line is missing: stat reports it on stderr), when the lines do not add up."""
    lines = stat_output.decode("ascii", "replace").splitlines()
    if len(lines) != count:
        return [None] * count
    sizes: list[int | None] = []
    for line in lines:
        words = line.split()
        sizes.append(int(words[0]) * int(words[1]) if len(words) == 2 and all(w.isdigit() for w in words)
                     else None)
    return sizes


def chain_files(info_json: str | bytes) -> list[str]:
    """The files of a backing chain, top first, from ``qemu-img info --backing-chain --output=json``."""
    infos = json.loads(info_json)
    return [str(info["filename"]) for info in (infos if isinstance(infos, list) else [infos])]


# ------------------------------------------------------------------------------------------------ journal


def step(name: Step, run: str, **fields: Any) -> dict[str, Any]:
    """One journal step of this driver (plain JSON)."""
    return {"tm": TM, "step": name.value, "run": run, **fields}


@dataclass
class Artifacts:
    """What a capture of one run may have left: a frozen or paused guest, overlays, staged files.

    ``record`` follows the journal: capture feeds it the steps it journals, recovery the steps it reads
    back. A path whose name does not belong to the run is refused (kept in ``refused``, never touched)."""

    run: str
    frozen: bool = False
    suspended: bool = False
    overlays: dict[str, str] = field(default_factory=dict)  # target -> overlay file
    committed: set[str] = field(default_factory=set)
    staging: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    checkpoint: str | None = None  # the increment's checkpoint, deleted unless the increment is kept
    next_overlays: dict[str, str] = field(default_factory=dict)  # target -> SNAPSHOT overlay, dropped unless kept
    # target -> its journal step; a step with ``chain`` names an increment's anchor, kept when the capture is
    rbd_snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, entry: Mapping[str, Any]) -> None:
        if entry.get("tm") != TM or str(entry.get("run")) != self.run:
            return
        name, path, target = entry.get("step"), str(entry.get("path", "")), str(entry.get("target"))
        if name in (Step.FROZEN, Step.THAWED):
            self.frozen = name == Step.FROZEN
        elif name in (Step.SUSPENDED, Step.RESUMED):
            self.suspended = name == Step.SUSPENDED
        elif name in (Step.OVERLAY, Step.NEXT_OVERLAY, Step.STAGING):
            self._record_file(Step(name), target, path)
        elif name == Step.COMMITTED:
            self.committed.add(target)
        elif name == Step.RBD_SNAPSHOT:
            snapshot = str(entry.get("snapshot", ""))
            chain = bool(entry.get("chain")) and parse_chain_snapshot(snapshot) is not None
            if self._ours(snapshot, chain or snapshot == rbd_snapshot_name(self.run)):
                self.rbd_snapshots[target] = dict(entry)
        elif name == Step.CHECKPOINT:
            checkpoint = str(entry.get("checkpoint", ""))
            if self._ours(checkpoint, parse_checkpoint_name(checkpoint) is not None):
                self.checkpoint = checkpoint

    def _record_file(self, name: Step, target: str, path: str) -> None:
        if name is Step.OVERLAY:
            if self._ours(path, is_overlay_of_run(path, self.run)):
                self.overlays[target] = path
        elif name is Step.NEXT_OVERLAY:
            if self._ours(path, is_snapshot_overlay(path)):
                self.next_overlays[target] = path
        elif self._ours(path, is_staging_of_run(path, self.run)) and path not in self.staging:
            self.staging.append(path)

    def _ours(self, path: str, ours: bool) -> bool:
        if not ours and path not in self.refused:
            self.refused.append(path)
        return ours


def artifacts_from_steps(steps: Iterable[Mapping[str, Any]]) -> Artifacts | None:
    """What the journaled ``steps`` say may be left, or None when no step is this driver's."""
    ours = [s for s in steps if s.get("tm") == TM]
    if not ours:
        return None
    runs = {str(s.get("run")) for s in ours}
    if len(runs) != 1:
        raise ValidationError(f"journal steps of several runs mixed together: {sorted(runs)}")
    artifacts = Artifacts(check_run_id(runs.pop()))
    for entry in ours:
        artifacts.record(entry)
    return artifacts
