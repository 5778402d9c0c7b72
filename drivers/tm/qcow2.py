"""The ``qcow2`` transfer driver's capture of file disks (qcow2 and raw files): OpenNebula's full
``prebackup[_live]`` and the overlay half of ``postbackup_live`` (spec §4.6, §4.7).

Live VM: quiesce the guest as FS_FREEZE says, take ONE atomic disk-only external snapshot of the
selected disks (overlays beside the VM's disks), unquiesce at once, ``qemu-img convert`` each frozen base
into the staging dir (a few disks at a time, under nice/ionice), then blockcommit each overlay back into
the image it was taken on, pivot, and delete it. Powered-off VM: ``qemu-img convert`` of the disks.

Every artifact is journaled before it exists (:class:`drivers.tm.plan.Step`). Whatever happens (error,
cancellation, timeout) the cleanup runs to its end, shielded from cancellation: the guest is thawed or
resumed and runs on its own files again, and a failed capture leaves no staged file. :func:`recover`
runs the same cleanup from journaled steps after a crash of the daemon.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar

from drivers.commands import Runner, shielded
from drivers.sink import NO_SINK, DriverSink
from drivers.tm import dirty, plan, rbdplan, snapshots
from drivers.tm.chaincheck import ChainCheck, DiskBitmaps, Increment
from drivers.tm.errors import CaptureError
from drivers.tm.plan import Artifacts, DiskSource, FsFreeze, Step
from drivers.tm.rbddisks import RbdCommands, RbdDisks
from drivers.tm.rbdplan import RbdSource
from drivers.vmm.checkpoints import (
    backup_xml,
    checkpoint_name,
    checkpoint_xml,
    parse_checkpoint_name,
    redefine_xml,
)
from drivers.vmm.domainxml import Disk
from drivers.vmm.errors import GuestAgentError, VmmError
from drivers.vmm.kvm import KvmHost
from drivers.vmm.states import DomainState
from scheduler.errors import DriverError, ValidationError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class CaptureOptions:
    parallel: int = 2  # disks converted at the same time
    rate_limit: int = 0  # qemu-img convert -r, bytes/s per disk; 0 = unlimited
    progress_interval: float = 2.0  # seconds between two looks at the staged files' sizes
    convert_timeout: float = 6 * 3600.0
    commit_deadline: float = 600.0  # per overlay; past it the commit is aborted and the overlay kept
    command_timeout: float = 120.0  # mkdir, rm, qemu-img info


@dataclass(frozen=True)
class CaptureRequest:
    """One capture: which disks of which domain, how the guest is quiesced, where the copies go."""

    domain: str
    disks: Sequence[DiskSource]
    fs_freeze: FsFreeze
    run_id: int | str
    staging_dir: str  # <BACKUP_BASE_PATH>/<vm_id>/<run_id> on the host; created if missing
    nice: int | None = None  # of each convert
    ionice: int | None = None
    options: CaptureOptions = CaptureOptions()
    # Report each disk's staged bytes to the sink: one qemu-img info per disk, a stat every progress_interval.
    progress: bool = False
    increment: Increment | None = None  # None: a full copy by snapshot and convert
    # The VM backed up: any SNAPSHOT-mode overlays of it the domain runs on are committed first, unless the
    # increment continues such a chain (drivers/tm/snapshots.py); None: the domain's files are taken as they are
    vm_id: int | None = None
    # Ceph RBD disks (drivers/tm/rbdplan.py): a snapshot each, in the same quiesce window as the file disks'
    # overlays, read by qemu-img straight from the cluster; full copies only
    rbd_disks: Sequence[RbdSource] = ()


@dataclass(frozen=True)
class DiskImage:
    """One staged ``disk.<disk_id>.0``: its path on the host and sizes in bytes."""

    disk_id: int
    target: str
    path: str
    virtual_size: int
    actual_size: int


@dataclass(frozen=True)
class CaptureResult:
    images: list[DiskImage]
    live: bool
    frozen_filesystems: int | None = None  # AGENT: how many the agent froze; 0 means nothing was quiesced
    thawed_first: int = 0  # filesystems found frozen (left by an earlier crash) and thawed before freezing
    snapshot_seconds: float | None = None  # freeze/suspend + snapshot + thaw/resume: the guest's pause


@dataclass
class RecoveryReport:
    thawed: bool = False
    resumed: bool = False
    committed: list[str] = field(default_factory=list)  # disk targets pivoted back to their own file
    removed: list[str] = field(default_factory=list)  # overlays and staged files deleted
    refused: list[str] = field(default_factory=list)  # journaled paths not named like the run's: untouched


async def _finish(task: asyncio.Future[None]) -> None:
    await task


@asynccontextmanager
async def capture(kvm: KvmHost, runner: Runner, request: CaptureRequest,
                  sink: DriverSink = NO_SINK) -> AsyncIterator[CaptureResult]:
    """Stage ``disk.<disk_id>.0`` (qcow2, sparse, backing chain flattened) of each disk in the request's
    staging dir; inside the ``async with`` block the staged files are there to upload while the overlays
    are committed back, and leaving the block waits for that commit. The sink is told each step before its
    artifact exists, each convert's process group ("source" side) and, when the request asks, the bytes
    staged per disk. If the capture or the block fails, the staged files are removed too and the cleanup's
    problems are added to the error as notes; the caller removes the staging dir after its upload."""
    disks = request.disks
    run = plan.check_request(disks, request.run_id, request.staging_dir, more=len(request.rbd_disks))
    session = _Session(kvm, runner, request.domain, Artifacts(run), sink, request.options,
                       staging=request.staging_dir, nice=request.nice, ionice=request.ionice,
                       progress=request.progress)
    state = await kvm.state(request.domain)
    if state not in (DomainState.SHUTOFF, DomainState.RUNNING, DomainState.PAUSED):
        raise CaptureError(f"{session.where}: the domain is {state}; only running, paused or powered-off VMs "
                           "are backed up", host=kvm.name)
    increment = request.increment
    session.rbd = list(request.rbd_disks)
    session.rbd_increment = increment if session.rbd else None
    if session.rbd_increment is not None:
        await session.rbd_disks.check_chain(session.rbd, session.rbd_increment)
    current = await kvm.disks(request.domain)
    if request.vm_id is not None and snapshots.needs_arranging(current, request.vm_id, increment):
        disks = await session.arrange(disks, request.vm_id, increment)
        current = await kvm.disks(request.domain)
    try:
        plan.check_sources(disks, current)
    except ValidationError as exc:
        raise CaptureError(f"{session.where}: {exc}", host=kvm.name) from exc
    paused = state is DomainState.PAUSED
    off = state is DomainState.SHUTOFF
    if increment is not None and not disks:
        body = session.rbd_only(request.fs_freeze, paused=paused, off=off)
    elif increment is not None and increment.snapshot:
        body = session.snapshot_increment(disks, request.fs_freeze, increment, paused=paused, off=off)
    elif request.increment is not None and state is DomainState.SHUTOFF:
        body = session.cold_increment(disks, current, request.increment)
    elif request.increment is not None:
        body = session.increment(disks, current, request.fs_freeze, request.increment, paused=paused)
    elif state is DomainState.SHUTOFF:
        body = session.cold(disks)
    else:
        body = session.live(disks, request.fs_freeze, paused=paused)
    if session.rbd_increment is not None:
        body = session.with_rbd_links(body, session.rbd_increment)
    async with session.guarded(body) as result:
        yield result


async def prune_checkpoints(kvm: KvmHost, domain: str, vm_id: int, keep_from: int) -> list[str]:
    """After increment ``n`` of VM ``vm_id`` is recorded, its checkpoints older than ``keep_from`` (``n - 1``:
    the last two stay, so a retried increment still finds its parent) are deleted, oldest first: each is
    one more bitmap every guest write updates. Other VMs' and foreign checkpoints are left alone."""
    doomed = sorted((parsed[1], name) for name in await kvm.checkpoints(domain)
                    if (parsed := parse_checkpoint_name(name)) is not None and parsed[0] == vm_id
                    and parsed[1] < keep_from)
    for _, name in doomed:
        await kvm.delete_checkpoint(domain, name)
    return [name for _, name in doomed]


async def prune_anchors(runner: Runner, host: str, rbd: Sequence[RbdSource], vm_id: int,
                        number: int | None) -> list[str]:
    """After increment ``number`` of VM ``vm_id`` is recorded, its RBD disks keep only that increment's snapshot
    (the next one's anchor); after a full backup (``None``) none of its chain snapshots; the
    ``pool/image@snapshot`` removed."""
    keep = None if number is None else plan.chain_snapshot_name(vm_id, number)
    return await RbdDisks(runner, f"{host}: VM {vm_id}", host).drop_anchors(rbd, vm_id, keep=keep)


async def settle_snapshots(kvm: KvmHost, runner: Runner, domain: str, vm_id: int, targets: Sequence[str],
                           number: int, options: CaptureOptions = CaptureOptions()) -> None:
    """After SNAPSHOT-mode increment ``number - 1`` is recorded: each disk in ``targets`` runs on ``[overlay
    number, disk]``, the recorded increment's overlay committed into the disk."""
    await _layers(kvm, runner, domain, vm_id, f"{kvm.name}: domain {domain!r}", options).normalize(targets, number)


async def fold_snapshots(kvm: KvmHost, runner: Runner, domain: str, vm_id: int,
                         options: CaptureOptions = CaptureOptions()) -> list[str]:
    """Every disk of the domain that runs on SNAPSHOT-mode overlays of VM ``vm_id`` runs on its own file again
    (the overlays committed into it and removed); the targets that did."""
    return await _layers(kvm, runner, domain, vm_id, f"{kvm.name}: domain {domain!r}", options).fold()


def _layers(kvm: KvmHost, runner: Runner, domain: str, vm_id: int, where: str,
            options: CaptureOptions) -> snapshots.Layers:
    return snapshots.Layers(kvm, runner, domain, vm_id, where, command_timeout=options.command_timeout,
                            commit_deadline=options.commit_deadline)


async def recover(kvm: KvmHost, runner: Runner, domain: str, steps: Sequence[dict[str, Any]], *,
                  sink: DriverSink = NO_SINK, options: CaptureOptions = CaptureOptions()) -> RecoveryReport:
    """Undo what a capture that died left, from its journaled ``steps``: resume/thaw the guest, commit back
    every overlay the guest still runs on, delete overlays and staged files. Idempotent; files whose names
    are not the run's are left alone. CaptureError (after doing the rest) when something could not be undone."""
    artifacts = plan.artifacts_from_steps(steps)
    if artifacts is None:
        return RecoveryReport()
    session = _Session(kvm, runner, domain, artifacts, sink, options)
    for path in artifacts.refused:
        log.error("%s: journaled path %s is not named like this run's files: left alone", session.where, path)
    await shielded(session.release(discard=True))
    session.raise_problems("recovery incomplete")
    session.report.refused = list(artifacts.refused)
    return session.report


class _Session:
    """One capture (or recovery) of one domain: the artifacts it journaled and the cleanup they need."""

    def __init__(self, kvm: KvmHost, runner: Runner, domain: str, artifacts: Artifacts, sink: DriverSink,
                 options: CaptureOptions, *, staging: str = "", nice: int | None = None,
                 ionice: int | None = None, progress: bool = False) -> None:
        self.kvm, self.runner, self.domain, self.artifacts = kvm, runner, domain, artifacts
        self.sink, self.options, self.staging, self.nice, self.ionice = sink, options, staging, nice, ionice
        self.progress = progress
        self.converting: dict[int, tuple[str, int]] = {}  # disk_id -> (staged file, bytes to stage)
        self.where = f"{kvm.name}: domain {domain!r}: run {artifacts.run}"
        self.problems: list[Exception] = []
        self.report = RecoveryReport()
        self.disk_bitmaps = DiskBitmaps(kvm, runner, domain, options.command_timeout)
        self.rbd: list[RbdSource] = []
        self.rbd_increment: Increment | None = None  # the RBD disks' increment: anchored by chain snapshots
        self.rbd_disks = RbdDisks(runner, self.where, kvm.name, RbdCommands(
            options.command_timeout, options.convert_timeout, options.rate_limit, nice, ionice),
            started=self.convert_started)

    async def note(self, name: Step, **fields: Any) -> None:
        entry = plan.step(name, self.artifacts.run, **fields)
        self.artifacts.record(entry)
        await self.sink.journal(entry)

    def layers(self, vm_id: int) -> snapshots.Layers:
        return _layers(self.kvm, self.runner, self.domain, vm_id, self.where, self.options)

    async def convert_started(self, pgid: int) -> None:
        await self.sink.process_started("source", pgid)

    async def command(self, argv: list[str]) -> bytes:
        return (await self.runner.run(argv, timeout=self.options.command_timeout)).stdout

    # ------------------------------------------------------------------ the two captures

    @asynccontextmanager
    async def guarded(self, body: Awaitable[CaptureResult]) -> AsyncIterator[CaptureResult]:
        """``body``, then the cleanup (with the caller's block running meanwhile); on any failure the
        cleanup also discards the staged files."""
        try:
            value = await body
            self.sink.reached("converted")
        except BaseException as exc:
            await shielded(self.release(discard=True))
            self.note_problems(exc)
            raise
        release = asyncio.ensure_future(self.release(discard=False))  # never raises: failures go to problems
        try:
            yield value
        except BaseException as exc:
            await shielded(_finish(release))
            await shielded(self.discard())
            self.note_problems(exc)
            raise
        await shielded(_finish(release))
        self.raise_problems("backup captured, but the cleanup failed (staged files removed)")

    def note_problems(self, exc: BaseException) -> None:
        for problem in self.problems:
            exc.add_note(f"cleanup: {problem}")

    async def cold(self, disks: Sequence[DiskSource]) -> CaptureResult:
        await self.snap_rbd(live=False)
        await self.command(["mkdir", "-p", "--", self.staging])
        return CaptureResult(await self.convert_all(disks, shared=False, rbd_snapshot=None), live=False)

    async def live(self, disks: Sequence[DiskSource], mode: FsFreeze, *, paused: bool,
                   keep_for: int | None = None) -> CaptureResult:
        """A full copy of a running domain; ``keep_for`` (a VM id: the base of a SNAPSHOT chain) keeps the
        snapshot's overlays as the VM's overlay 1 instead of committing them back."""
        if paused and mode is not FsFreeze.NONE:
            log.info("%s: the guest is paused: nothing to quiesce", self.where)
            mode = FsFreeze.NONE
        if keep_for is None:
            overlays = {d.target: plan.overlay_path(d.path, self.artifacts.run) for d in disks}
        else:
            overlays = {d.target: plan.snapshot_overlay_path(d.path, keep_for, 1) for d in disks}
        for target, path in overlays.items():
            await self.note(Step.OVERLAY if keep_for is None else Step.NEXT_OVERLAY, target=target, path=path)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            frozen, thawed_first = await self.quiesce(mode)
            self.sink.reached("quiesced")
        except BaseException:
            self.artifacts.overlays.clear()  # no snapshot was attempted: no overlay can exist
            self.artifacts.next_overlays.clear()
            raise
        snapshot = rbdplan.snapshot_name(self.artifacts.run)
        try:
            if overlays:
                await self.kvm.snapshot_disks(self.domain, overlays, name=f"vmsched-{self.artifacts.run}")
            await self.snap_rbd(live=True)  # the guest is quiesced for these too: one consistent point for every disk
            self.sink.reached("snapshot")
        finally:
            await shielded(self.unquiesce())
        window = loop.time() - started
        log.info("%s: snapshot of %s taken in %.3f s (FS_FREEZE=%s)", self.where,
                 ", ".join([*overlays, *(d.target for d in self.rbd)]), window, mode.value)
        await self.command(["mkdir", "-p", "--", self.staging])
        images = await self.convert_all(disks, shared=True, rbd_snapshot=snapshot if self.rbd else None)
        return CaptureResult(images, live=True, frozen_filesystems=frozen, thawed_first=thawed_first,
                             snapshot_seconds=window)

    async def arrange(self, disks: Sequence[DiskSource], vm_id: int, increment: Increment | None) -> list[DiskSource]:
        """Before the capture: a SNAPSHOT increment's disks on ``[overlay n, disk]`` (ChainBroken when overlay n
        is gone), any other capture's on the disk files themselves (the VM's overlays committed); the disks to
        capture, with the files they run on now."""
        layers = self.layers(vm_id)
        if snapshots.continues_overlays(increment):
            assert increment is not None
            await self.check_sizes(increment, disks)
            await layers.normalize([d.target for d in disks], increment.increment_id)
        elif not await layers.fold():
            return list(disks)
        now = {d.target: d.path for d in await self.kvm.disks(self.domain)}
        return [dataclasses.replace(d, path=now.get(d.target) or d.path) for d in disks]

    async def check_sizes(self, increment: Increment, disks: Sequence[DiskSource]) -> None:
        await ChainCheck(self.kvm, self.domain, self.where, self.disk_bitmaps).check_sizes(increment, disks)

    async def snapshot_increment(self, disks: Sequence[DiskSource], mode: FsFreeze, increment: Increment, *,
                                 paused: bool, off: bool) -> CaptureResult:
        """INCREMENT_MODE=SNAPSHOT: the base is a full copy whose snapshot the VM keeps running on (overlay 1);
        increment n puts overlay n + 1 on top (the guest quiesced only for that) and stages a copy of overlay
        n, which holds exactly what the guest wrote since increment n - 1. Overlay n is committed into the
        disk once the increment is recorded (:func:`settle_snapshots`)."""
        vm_id, number = increment.vm_id, increment.increment_id
        if number == 0 and not off:
            await self.drop_checkpoints(vm_id)
            return await self.live(disks, mode, paused=paused, keep_for=vm_id)
        nexts = {d.target: plan.snapshot_overlay_path(snapshots.base_of(d.path), vm_id, number + 1) for d in disks}
        for target, path in nexts.items():
            await self.note(Step.NEXT_OVERLAY, target=target, path=path)
        if number == 0:
            result = await self.cold(disks)
            await self.layers(vm_id).add_next({d.target: d.path for d in disks}, nexts, off=True, name="")
            return result
        frozen, thawed_first, window = await self.in_window(
            FsFreeze.NONE if paused or off else mode,
            self.add_next(vm_id, {d.target: d.path for d in disks}, nexts, off=off))
        await self.command(["mkdir", "-p", "--", self.staging])
        targets = {d.target: plan.staging_file(self.staging, d.disk_id, number) for d in disks}
        for disk in disks:
            await self.note(Step.STAGING, path=targets[disk.target])
            await self.runner.run(["cp", "--sparse=always", "--", disk.path, targets[disk.target]],
                                  timeout=self.options.convert_timeout, nice=self.nice, ionice=self.ionice,
                                  started=self.convert_started)
        images = await self.linked(disks, targets, number)
        log.info("%s: increment %d of %s taken from overlay(s) %s (%s)", self.where, number, ", ".join(targets),
                 ", ".join(d.path for d in disks), "powered off" if off else f"a {window:.3f} s pause")
        return CaptureResult(images, live=not off, frozen_filesystems=None if off else frozen,
                             thawed_first=thawed_first, snapshot_seconds=None if off else window)

    async def add_next(self, vm_id: int, disks: dict[str, str], nexts: dict[str, str], *, off: bool) -> None:
        await self.layers(vm_id).add_next(disks, nexts, off=off, name=f"vmsched-{self.artifacts.run}")
        await self.snap_rbd(live=True)

    async def in_window(self, mode: FsFreeze, work: Coroutine[Any, Any, None]) -> tuple[int | None, int, float]:
        """``work`` (the snapshots) with the guest quiesced as ``mode`` says; (filesystems frozen or None, found
        frozen and thawed first, seconds the window lasted)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            frozen, thawed_first = await self.quiesce(mode)
        except BaseException:
            work.close()  # never started: nothing was snapshotted
            raise
        self.sink.reached("quiesced")
        try:
            await work
            self.sink.reached("snapshot")
        finally:
            await shielded(self.unquiesce())
        return frozen, thawed_first, loop.time() - started

    async def drop_checkpoints(self, vm_id: int) -> None:
        """A SNAPSHOT chain needs no checkpoint: this VM's (of an earlier CBT chain) go, each being one more
        bitmap every write updates."""
        try:
            removed = await prune_checkpoints(self.kvm, self.domain, vm_id, 1 << 62)
        except VmmError as exc:
            log.warning("%s: cannot delete the checkpoints of an earlier chain: %s", self.where, exc)
            return
        if removed:
            log.info("%s: checkpoint(s) %s of an earlier chain deleted", self.where, ", ".join(removed))

    async def increment(self, disks: Sequence[DiskSource], current: Sequence[Disk], mode: FsFreeze,
                        increment: Increment, *, paused: bool) -> CaptureResult:
        """One increment by changed-block tracking: a push-mode backup job writes what changed since the
        previous checkpoint (the whole disk for the base) into ``disk.<id>.<increment>``, creating the next
        checkpoint as it starts; the guest is quiesced only for that start. Each increment then reads
        through the previous one (its backing file, by relative name)."""
        if paused and mode is not FsFreeze.NONE:
            mode = FsFreeze.NONE
        number = increment.increment_id
        targets = {d.target: plan.staging_file(self.staging, d.disk_id, number) for d in disks}
        name = checkpoint_name(increment.vm_id, number)
        since = checkpoint_name(increment.vm_id, number - 1) if number else None
        try:
            job_xml = backup_xml(current, targets, since)
            mark_xml = checkpoint_xml(name, current, targets)
        except ValidationError as exc:
            raise CaptureError(f"{self.where}: {exc}", host=self.kvm.name) from exc
        await self.check_chain(increment, since, disks)
        await self.command(["mkdir", "-p", "--", self.staging])
        for target in targets.values():
            await self.note(Step.STAGING, path=target)
        await self.note(Step.CHECKPOINT, checkpoint=name)
        loop = asyncio.get_running_loop()
        started = loop.time()
        frozen, thawed_first = await self.quiesce(mode)
        self.sink.reached("quiesced")
        try:
            await self.kvm.begin_backup(self.domain, job_xml, mark_xml)
            await self.snap_rbd(live=True)
            self.sink.reached("snapshot")
        finally:
            await shielded(self.unquiesce())
        window = loop.time() - started
        await self.kvm.finish_backup(self.domain, name, deadline=self.options.convert_timeout)
        images = await self.linked(disks, targets, number)
        log.info("%s: increment %d of %s (checkpoint %s) taken with a %.3f s pause", self.where, number,
                 ", ".join(targets), name, window)
        return CaptureResult(images, live=True, frozen_filesystems=frozen, thawed_first=thawed_first,
                             snapshot_seconds=window)

    async def linked(self, disks: Sequence[DiskSource], targets: Mapping[str, str], number: int) -> list[DiskImage]:
        """The staged increments, each pointed at the previous link by its bare name."""
        return [await self.link(disk.disk_id, disk.target, targets[disk.target], number) for disk in disks]

    async def link(self, disk_id: int, target: str, path: str, number: int) -> DiskImage:
        """The staged increment ``path``, pointed at the previous link by its bare name."""
        if number:
            previous = PurePosixPath(plan.staging_file(self.staging, disk_id, number - 1)).name
            await self.command(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", previous, path])
        virtual, actual = plan.image_sizes(await self.command(["qemu-img", "info", "--output=json", path]))
        return DiskImage(disk_id, target, path, virtual, actual)

    # ------------------------------------------------------------------ RBD disks

    def rbd_snapshot(self, number: int | None = None) -> str:
        """The run's snapshot of the RBD disks: a chain's anchor for an increment, else ``vmsched-<run>``."""
        if self.rbd_increment is None:
            return rbdplan.snapshot_name(self.artifacts.run)
        vm_id = self.rbd_increment.vm_id
        return plan.chain_snapshot_name(vm_id, self.rbd_increment.increment_id if number is None else number)

    async def snap_rbd(self, *, live: bool) -> None:
        """Snapshot every RBD disk (a full backup of a VM that is off reads its images as they are instead)."""
        if not self.rbd or (not live and self.rbd_increment is None):
            return
        snapshot, chain = self.rbd_snapshot(), self.rbd_increment is not None
        for source in self.rbd:
            await self.note(Step.RBD_SNAPSHOT, snapshot=snapshot, chain=chain, **rbdplan.source_fields(source))
            await self.rbd_disks.create(source, snapshot)

    async def rbd_only(self, mode: FsFreeze, *, paused: bool, off: bool) -> CaptureResult:
        """An increment of a VM whose disks are all RBD: the guest quiesced for the snapshots only."""
        frozen, thawed_first, window = await self.in_window(FsFreeze.NONE if paused or off else mode,
                                                            self.snap_rbd(live=True))
        await self.command(["mkdir", "-p", "--", self.staging])
        return CaptureResult([], live=not off, frozen_filesystems=None if off else frozen, thawed_first=thawed_first,
                             snapshot_seconds=None if off else window)

    async def with_rbd_links(self, body: Awaitable[CaptureResult], increment: Increment) -> CaptureResult:
        """``body`` (the file disks' increment), then each RBD disk's link: the whole image at the chain's base,
        else what changed since the previous anchor."""
        result = await body
        images = list(result.images)
        number = increment.increment_id
        async with self.watching():
            for source in self.rbd:
                path = plan.staging_file(self.staging, source.disk_id, number)
                await self.note(Step.STAGING, path=path)
                if number:
                    since = self.rbd_snapshot(number - 1)
                    extents = await self.rbd_disks.changes(source, since, self.rbd_snapshot())
                    total = dirty.dirty_bytes(extents)
                    self.begin_progress(source.disk_id, path, total)
                    await self.rbd_disks.stage_link(source, since, self.rbd_snapshot(), path, extents,
                                                    increment.sizes.get(source.disk_id))
                else:
                    total = await self.rbd_disks.used(source, self.rbd_snapshot()) if self.progress else 0
                    self.begin_progress(source.disk_id, path, total)
                    await self.rbd_disks.stage_full(source, self.rbd_snapshot(), path)
                self.end_progress(source.disk_id, total)
                images.append(await self.link(source.disk_id, source.target, path, number))
        return dataclasses.replace(result, images=images)

    def begin_progress(self, disk_id: int, path: str, total: int) -> None:
        """Disk ``disk_id`` is being staged into ``path``, ``total`` bytes (reported when the request asks)."""
        if self.progress:
            self.converting[disk_id] = (path, total)
            self.sink.disk_progress(disk_id, 0, total)

    def end_progress(self, disk_id: int, total: int) -> None:
        self.converting.pop(disk_id, None)
        if self.progress:
            self.sink.disk_progress(disk_id, total, total)

    @asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """The staged files' sizes reported while the block runs (when the request asks)."""
        if not self.progress:
            yield
            return
        watcher = asyncio.ensure_future(self.watch_progress())
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def cold_increment(self, disks: Sequence[DiskSource], current: Sequence[Disk],
                             increment: Increment) -> CaptureResult:
        """One increment of a powered-off VM, from the persistent bitmaps in its qcow2 files (no QEMU runs
        the guest): the base is a full convert; a later one copies the ranges dirty since bitmap n-1
        (:mod:`drivers.tm.dirty`). Then bitmap n is added to every disk and libvirt is given checkpoint n's
        record, so a live increment can follow as well as a cold one."""
        number = increment.increment_id
        targets = {d.target: plan.staging_file(self.staging, d.disk_id, number) for d in disks}
        name = checkpoint_name(increment.vm_id, number)
        since = checkpoint_name(increment.vm_id, number - 1) if number else None
        try:
            checkpoint_xml(name, current, targets)  # only qcow2 file disks can carry a bitmap
        except ValidationError as exc:
            raise CaptureError(f"{self.where}: {exc}", host=self.kvm.name) from exc
        await self.check_chain(increment, since, disks)
        await self.snap_rbd(live=False)
        await self.command(["mkdir", "-p", "--", self.staging])
        if since is None:
            await self.convert_all(disks, shared=False)
        else:
            for disk in disks:
                await self.copy_dirty(disk, since, targets[disk.target])
        await self.note(Step.CHECKPOINT, checkpoint=name)
        for disk in disks:
            await self.command(["qemu-img", "bitmap", "--add", "-f", "qcow2", disk.path, name])
        parent = since if since in await self.kvm.checkpoints(self.domain) else None
        await self.kvm.redefine_checkpoint(self.domain, redefine_xml(name, parent, int(time.time()), targets))
        images = await self.linked(disks, targets, number)
        log.info("%s: increment %d of %s (checkpoint %s) taken from the bitmaps of the powered-off disks", self.where,
                 number, ", ".join(targets), name)
        return CaptureResult(images, live=False)

    async def copy_dirty(self, disk: DiskSource, since: str, target: str) -> None:
        """``target``: a qcow2 holding the ranges of ``disk`` dirty since bitmap ``since``."""
        await self.note(Step.STAGING, path=target)
        socket, pid_file = f"{self.staging}/nbd.{disk.disk_id}.sock", f"{self.staging}/nbd.{disk.disk_id}.pid"
        extents = dirty.dirty_extents(await self.command(dirty.map_argv(socket, pid_file, since, disk.path)))
        await self.command(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk.path, target])
        for argv in dirty.copy_argvs(target, dirty.read_commands(extents)):
            await self.runner.run(argv, timeout=self.options.convert_timeout, nice=self.nice, ionice=self.ionice,
                                  started=self.convert_started)
        log.info("%s: disk %d (%s): %d bytes dirty since %s copied into %s", self.where, disk.disk_id, disk.target,
                 dirty.dirty_bytes(extents), since, target)

    async def check_chain(self, increment: Increment, since: str | None, disks: Sequence[DiskSource]) -> None:
        await ChainCheck(self.kvm, self.domain, self.where, self.disk_bitmaps).run(increment, since, disks)

    # ------------------------------------------------------------------ quiesce

    async def quiesce(self, mode: FsFreeze) -> tuple[int | None, int]:
        """(filesystems frozen or None, filesystems found frozen and thawed first)."""
        if mode is FsFreeze.SUSPEND:
            await self.note(Step.SUSPENDED)
            await self.kvm.suspend(self.domain)
        elif mode is FsFreeze.AGENT:
            await self.note(Step.FROZEN)
            return await self.freeze()
        return None, 0

    async def freeze(self) -> tuple[int, int]:
        thawed_first = 0
        try:
            frozen = await self.kvm.fsfreeze(self.domain)
        except GuestAgentError as exc:
            self.artifacts.frozen = False  # the agent did not answer: nothing was frozen
            raise GuestAgentError(f"{exc}; FS_FREEZE=AGENT needs a running QEMU guest agent in the VM; "
                                  "nothing was snapshotted", host=self.kvm.name, code=exc.code) from exc
        except VmmError as exc:
            if "frozen" not in str(exc):
                raise
            thawed_first = await self.kvm.fsthaw(self.domain)
            log.warning("%s: the guest was left frozen (by an earlier run that died?); thawed %d filesystems "
                        "before freezing again", self.where, thawed_first)
            frozen = await self.kvm.fsfreeze(self.domain)
        if frozen == 0:
            log.warning("%s: the guest agent froze 0 filesystems: nothing was quiesced", self.where)
        return frozen, thawed_first

    async def unquiesce(self) -> None:
        if self.artifacts.frozen:
            await self.kvm.fsthaw(self.domain)
            await self.note(Step.THAWED)
        if self.artifacts.suspended:
            await self.kvm.resume(self.domain)
            await self.note(Step.RESUMED)

    # ------------------------------------------------------------------ convert

    async def convert_all(self, disks: Sequence[DiskSource], *, shared: bool,
                          rbd_snapshot: str | None = None) -> list[DiskImage]:
        """Every file disk and every RBD disk (at ``rbd_snapshot``, or the image itself) staged, a few at a time."""
        bound = asyncio.Semaphore(max(1, self.options.parallel))

        async def one(disk: DiskSource) -> DiskImage:
            async with bound:
                return await self.convert(disk, shared=shared)

        async def one_rbd(source: RbdSource) -> DiskImage:
            async with bound:
                return await self.convert_rbd(source, rbd_snapshot)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [*(group.create_task(one(disk)) for disk in disks),
                         *(group.create_task(one_rbd(source)) for source in self.rbd if self.rbd_increment is None)]
                if self.progress:
                    watcher = group.create_task(self.watch_progress())
                    done = asyncio.gather(*tasks, return_exceptions=True)
                    done.add_done_callback(lambda _: watcher.cancel())
        except BaseExceptionGroup as failed:
            for other in failed.exceptions[1:]:
                log.error("%s: %s", self.where, other)
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    async def convert(self, disk: DiskSource, *, shared: bool) -> DiskImage:
        target = plan.staging_file(self.staging, disk.disk_id)
        await self.note(Step.STAGING, path=target)
        argv = plan.convert_argv(disk, target, shared=shared, rate_limit=self.options.rate_limit)
        total = 0
        if self.progress:
            total = plan.chain_allocated(await self.command(["qemu-img", "info", "-U", "--backing-chain",
                                                             "--output=json", disk.path]))
        self.begin_progress(disk.disk_id, target, total)
        done = await self.runner.run(argv, timeout=self.options.convert_timeout, nice=self.nice, ionice=self.ionice,
                                     started=self.convert_started)
        self.end_progress(disk.disk_id, total)
        virtual, actual = plan.image_sizes(await self.command(["qemu-img", "info", "--output=json", target]))
        log.info("%s: disk %d (%s) staged as %s in %.1f s: %d bytes virtual, %d allocated", self.where,
                 disk.disk_id, disk.target, target, done.duration, virtual, actual)
        return DiskImage(disk.disk_id, disk.target, target, virtual, actual)

    async def convert_rbd(self, source: RbdSource, snapshot: str | None) -> DiskImage:
        """``qemu-img convert`` of an RBD disk (its snapshot, or the image of a VM that is off) into the staging
        dir, straight from the cluster."""
        target = plan.staging_file(self.staging, source.disk_id)
        await self.note(Step.STAGING, path=target)
        total = await self.rbd_disks.used(source, snapshot) if self.progress else 0
        self.begin_progress(source.disk_id, target, total)
        done = await self.rbd_disks.stage_full(source, snapshot, target)
        self.end_progress(source.disk_id, total)
        virtual, actual = plan.image_sizes(await self.command(["qemu-img", "info", "--output=json", target]))
        log.info("%s: RBD disk %d (%s, %s%s) staged as %s in %.1f s: %d bytes virtual, %d allocated", self.where,
                 source.disk_id, source.target, source.spec, f"@{snapshot}" if snapshot else "", target, done.duration,
                 virtual, actual)
        return DiskImage(source.disk_id, source.target, target, virtual, actual)

    async def watch_progress(self) -> None:
        """Report the staged files' allocated sizes every ``progress_interval`` until cancelled; a failed
        look ends the reports, never the capture."""
        while True:
            await asyncio.sleep(self.options.progress_interval)
            converting = dict(self.converting)
            if not converting:
                continue
            paths = [path for path, _ in converting.values()]
            try:
                out = await self.runner.run(["stat", "-c", "%b %B", "--", *paths],
                                            timeout=self.options.command_timeout, check=False)
            except DriverError as exc:
                log.info("%s: no more progress reports: %s", self.where, exc)
                return
            sizes = plan.allocated_sizes(out.stdout, len(paths))
            for (disk_id, (_, total)), size in zip(converting.items(), sizes, strict=True):
                if size is not None and disk_id in self.converting:
                    self.sink.disk_progress(disk_id, min(size, total), total)

    # ------------------------------------------------------------------ cleanup (capture and recovery)

    async def release(self, *, discard: bool) -> None:
        """Resume, thaw, commit back and delete the overlays, and (``discard``, or when something failed)
        delete the staged files. Each part is tried even when an earlier one failed; failures are kept in
        ``problems``."""
        await self.attempt("resume the guest", self.resume_if_suspended())
        await self.attempt("thaw the guest", self.thaw_if_frozen())
        for target, overlay in list(self.artifacts.overlays.items()):
            await self.attempt(f"commit {target} back from {overlay}", self.drop_overlay(target, overlay))
        for target, fields in list(self.artifacts.rbd_snapshots.items()):
            if fields.get("chain"):
                continue  # an increment's anchor: kept with the capture, removed by discard()
            await self.attempt(f"remove RBD snapshot {fields.get('pool')}/{fields.get('image')}@"
                               f"{fields.get('snapshot')} of {target}", self.drop_rbd_snapshot(target, fields))
        if discard or self.problems:
            await self.discard()

    async def discard(self) -> None:
        """The capture is not kept: its staged files go, and so does its checkpoint (its bitmaps merged into
        the previous one, which then tracks every change since)."""
        for path in list(self.artifacts.staging):
            await self.attempt(f"remove {path}", self.remove_staged(path))
        for target, fields in list(self.artifacts.rbd_snapshots.items()):
            await self.attempt(f"remove RBD snapshot {fields.get('pool')}/{fields.get('image')}@"
                               f"{fields.get('snapshot')} of {target}", self.drop_rbd_snapshot(target, fields))
        for target, overlay in list(self.artifacts.next_overlays.items()):
            await self.attempt(f"take overlay {overlay} off {target}", self.drop_next(target, overlay))
        checkpoint = self.artifacts.checkpoint
        if checkpoint is not None:
            await self.attempt(f"delete checkpoint {checkpoint}", self.drop_checkpoint(checkpoint))

    async def drop_rbd_snapshot(self, target: str, fields: Mapping[str, Any]) -> None:
        """The run's snapshot of an RBD disk removed (a snapshot already gone is fine)."""
        source, snapshot = rbdplan.source_from_fields(fields), str(fields["snapshot"])
        if await self.rbd_disks.remove(source, snapshot):
            self.report.removed.append(f"{source.spec}@{snapshot}")
        del self.artifacts.rbd_snapshots[target]

    async def drop_next(self, target: str, overlay: str) -> None:
        parsed = plan.parse_snapshot_overlay(overlay)
        assert parsed is not None  # journaled paths are checked when read back
        if await self.layers(parsed[1]).drop_next(target, overlay):
            self.report.removed.append(overlay)
            if target not in self.report.committed:
                self.report.committed.append(target)
        del self.artifacts.next_overlays[target]

    async def drop_checkpoint(self, checkpoint: str) -> None:
        """Delete the run's checkpoint; a backup job still writing (a daemon that died left it running in
        QEMU) is aborted first, for the checkpoint cannot go while it runs."""
        state = await self.kvm.state(self.domain)
        if state in (DomainState.RUNNING, DomainState.PAUSED):
            await self.kvm.abort_backup(self.domain)
        elif state is DomainState.SHUTOFF:  # libvirt deletes no bitmap of a domain that is off
            paths = [d.path for d in await self.kvm.disks(self.domain) if d.type == "file" and d.format == "qcow2"
                     and d.path]
            for path, bitmaps in (await self.disk_bitmaps.of(paths, off=True)).items():
                if checkpoint in [b.name for b in bitmaps]:
                    await self.disk_bitmaps.remove(path, checkpoint, off=True)
                    self.report.removed.append(f"{path}:{checkpoint}")
        if await self.kvm.delete_checkpoint(self.domain, checkpoint, metadata_only=state is DomainState.SHUTOFF):
            self.report.removed.append(checkpoint)
        self.artifacts.checkpoint = None

    async def attempt(self, what: str, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception as exc:  # noqa: BLE001 - every cleanup step is tried; the failures are reported
            log.error("%s: cannot %s: %s", self.where, what, exc)
            self.problems.append(exc)

    def raise_problems(self, summary: str) -> None:
        if self.problems:
            retryable = all(getattr(p, "retryable", False) for p in self.problems)
            raise CaptureError(f"{self.where}: {summary}: " + "; ".join(str(p) for p in self.problems),
                               host=self.kvm.name, retryable=retryable) from self.problems[0]

    async def resume_if_suspended(self) -> None:
        if not self.artifacts.suspended:
            return
        if await self.kvm.state(self.domain) is DomainState.PAUSED:
            await self.kvm.resume(self.domain)
            self.report.resumed = True
        await self.note(Step.RESUMED)

    async def thaw_if_frozen(self) -> None:
        if not self.artifacts.frozen:
            return
        if await self.kvm.state(self.domain) is DomainState.RUNNING:  # a stopped guest is frozen no more
            self.report.thawed = await self.kvm.fsthaw(self.domain) > 0
        await self.note(Step.THAWED)

    async def drop_overlay(self, target: str, overlay: str) -> None:
        chain = await self.chain(target)
        if chain[:1] == [overlay]:
            if await self.kvm.state(self.domain) is DomainState.SHUTOFF:
                raise CaptureError(f"{self.where}: the powered-off domain is defined on {overlay} for {target}; "
                                   f"kept: commit it into its backing file by hand", host=self.kvm.name)
            await self.kvm.blockcommit(self.domain, target, deadline=self.options.commit_deadline)
            await self.note(Step.COMMITTED, target=target)
            self.report.committed.append(target)
        elif overlay in chain:
            raise CaptureError(f"{self.where}: {target} runs on an image backed by {overlay} (a snapshot was "
                               "taken on top of it); kept", host=self.kvm.name)
        await self.remove(overlay)
        del self.artifacts.overlays[target]

    async def chain(self, target: str) -> list[str]:
        """The files ``target`` runs on now, top first; empty when the domain has no such disk."""
        disk = next((d for d in await self.kvm.disks(self.domain) if d.target == target), None)
        if disk is None or not disk.path:
            return []
        return plan.chain_files(await self.command(["qemu-img", "info", "-U", "--backing-chain",
                                                    "--output=json", disk.path]))

    async def remove_staged(self, path: str) -> None:
        await self.remove(path)
        self.artifacts.staging.remove(path)

    async def remove(self, path: str) -> None:
        if await self.command(["rm", "-f", "-v", "--", path]):  # -v: says so only when the file was there
            self.report.removed.append(path)
