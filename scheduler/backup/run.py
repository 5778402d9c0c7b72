"""One full backup of a VM, end to end (spec §4, §7.1-7.2): checks, LCM state, capture, upload, record.

The run checks the target (a BACKUP_DS datastore with room for the selected disks), puts the VM in
ACTIVE/BACKUP (live, from RUNNING) or ACTIVE/BACKUP_POWEROFF (cold, from POWEROFF), stages the disks on
the hypervisor under ``<BACKUP_BASE_PATH>/<vm_id>/<run_id>`` with the ``qcow2`` transfer driver, adds
``vm.xml`` and ``domain.xml``, uploads the directory to the datastore and removes it. Then ONE transaction
records the BACKUP image, the VM's BACKUP_IDS, the datastore's IMAGES and the VM's state back; KEEP_LAST
removes the oldest backups afterwards (errors only logged, as OpenNebula does).

Every artifact is journaled in the run's steps before it exists: the state the VM had, the staging dir on
its host, the upload's backup id (plus the transfer driver's own steps). ``scheduler.backup.recovery``
reads them back after a crash of the daemon and undoes what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from zoneinfo import ZoneInfo

from drivers import tm
from drivers.commands import Runner, shielded
from drivers.datastore import (
    BackupDatastore,
    UploadRequest,
    UploadResult,
    open_datastore,
)
from drivers.datastore.base import first_error
from drivers.datastore.layout import DOMAIN_XML, VM_XML
from drivers.datastore.limits import io_limits
from drivers.tm.qcow2 import CaptureOptions
from drivers.tm.rbdplan import RbdSource
from scheduler.actions.base import RunContext
from scheduler.backup.chain import Link, add_link, new_chain, next_link, start_chain
from scheduler.backup.checks import (
    backup_image,
    backup_state,
    capacity_check_on,
    check_space,
    check_tools,
    disk_sources,
    reservation_mb,
    selected_disks,
    target_datastore,
)
from scheduler.backup.flatten import keep_last_links
from scheduler.backup.retention import apply_keep_last
from scheduler.backup.steps import STEPS, Process, Staging, Upload, VmStateSaved
from scheduler.backup.transport import upload_ssh
from scheduler.engine.progress import CAPTURE, RECORD, UPLOAD
from scheduler.engine.steps import Step
from scheduler.errors import ActionError
from scheduler.hosts.links import HostLinks
from scheduler.hosts.placement import Placement, locate_for_run
from scheduler.model import backup_config as backups
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import LcmState, VmState
from scheduler.model.objects.vm import set_states
from scheduler.model.template import Vector
from scheduler.store.state import State

log = logging.getLogger(__name__)

UPLOAD_TIMEOUT = 6 * 3600.0
COMMAND_TIMEOUT = 120.0


@dataclass(frozen=True)
class BackupSettings:
    """What sched.conf says about backups, and the ssh options a hypervisor uses for the upload."""

    base_path: str = "/var/tmp/vmsched"
    capacity_check: bool = True
    timezone: str = "UTC"
    upload_timeout: float = UPLOAD_TIMEOUT

    @classmethod
    def from_config(cls, config: Any) -> BackupSettings:
        if config is None:
            return cls()
        return cls(str(config.backup_base_path), bool(config.datastore_capacity_check), config.timezone)


# ---- the run -----------------------------------------------------------------------------------------


@dataclass
class _Backup:
    """One run in progress: what it works on, and what it must undo."""

    ctx: RunContext
    settings: BackupSettings
    datastore: Datastore
    store: BackupDatastore
    where: Placement
    disks: list[Vector]
    link: Link | None = None  # MODE=INCREMENT: the chain link this run takes
    restore_to: tuple[VmState, LcmState] | None = None
    staging: str = ""
    current_phase: str = ""
    upload_processes: int = 0
    rbd: list[RbdSource] = field(default_factory=list)  # the RBD disks captured

    # -- what the drivers tell the run (drivers.sink.DriverSink) ---------------------------------------
    async def journal(self, entry: dict[str, Any]) -> None:
        await self.ctx.sink.step(entry)

    async def note(self, step: Step) -> None:
        """Journal one of the run's own steps (before what it names exists)."""
        await self.journal(STEPS.entry(step))

    async def process_started(self, side: str, pgid: int) -> None:
        """A convert, or an upload's copy or hash, runs on the hypervisor ("source") or the datastore's
        server: journaled, so that a restarted daemon kills it."""
        if self.current_phase != UPLOAD:
            await self.note(Process(side, self.where.host.id, pgid, self.staging))
            self.reached("convert")
            return
        await self.note(Process(side, self.where.host.id, pgid, self.staging, datastore=self.datastore.id))
        self.upload_processes += 1
        if self.upload_processes == 2:  # the copy and the hash both run
            self.reached("upload")

    def disk_progress(self, disk_id: int, done: int, total: int) -> None:
        if self.ctx.sink.progress is not None:
            self.ctx.sink.progress.disk(disk_id, done, total)

    def files_progress(self, done: Mapping[str, int], total: Mapping[str, int]) -> None:
        if self.ctx.sink.progress is not None:
            self.ctx.sink.progress.files(done, total)

    def reached(self, point: str) -> None:
        self.ctx.sink.reached(point)

    # ----------------------------------------------------------------------------------------------------
    def phase(self, name: str) -> None:
        self.current_phase = name
        if self.ctx.sink.progress is not None:
            self.ctx.sink.progress.begin(name, [int(d["DISK_ID"]) for d in self.disks])

    @property
    def links(self) -> HostLinks:
        return self.ctx.connections("backups cannot run")

    @property
    def runner(self) -> Runner:
        return self.links.runner(self.where.host)

    @property
    def vm_id(self) -> int:
        return int(self.where.vm.id)

    @property
    def snapshot(self) -> bool:
        """MODE=INCREMENT with INCREMENT_MODE=SNAPSHOT: the VM runs on an overlay per increment."""
        return self.link is not None and backups.increment_mode(self.where.vm.backup_config) == "SNAPSHOT"


async def perform(ctx: RunContext, ds_id: int, *, reset: bool = False) -> str:
    """The whole backup of ``ctx.vm`` into datastore ``ds_id`` (an increment goes where its chain is;
    ``reset`` starts a new chain); the run's message."""
    settings = BackupSettings.from_config(getattr(ctx, "config", None))
    vm = ctx.state.vms.get(ctx.vm.id)
    backup_state(vm)
    disks = selected_disks(vm)
    link = next_link(vm, {image.id: image for image in ctx.state.images.all()},
                     [int(d["DISK_ID"]) for d in disks], reset=reset)
    if link is not None and link.image is not None and link.image.datastore_id != ds_id:
        log.info("VM %s: increment %d goes to datastore %d, where its chain (image %d) is, not to %d",
                 vm.id, link.increment_id, link.image.datastore_id, link.image.id, ds_id)
        ds_id = link.image.datastore_id
    datastore = target_datastore(ctx.state, ds_id)
    links = ctx.connections("backups cannot run")
    where = await locate_for_run(ctx)
    check_tools(where.host, datastore)
    live = backup_state(where.vm) is LcmState.BACKUP
    store = open_datastore(datastore, links.pool)
    if capacity_check_on(datastore, settings.capacity_check):
        check_space(await store.monitor(), reservation_mb(disks))
    run = _Backup(ctx, settings, datastore, store, where, disks, link)
    try:
        await _enter_backup_state(run, LcmState.BACKUP if live else LcmState.BACKUP_POWEROFF)
        image = await _backup(run)
    finally:
        await _leave_backup_state(run)
    kept = ""
    if run.link is None or run.link.increment_id == 0:  # KEEP_LAST counts images (spec §7.1)
        removed = await apply_keep_last(ctx.state, links, vm.id)
        if run.link is None:
            await _prune_anchors(run)  # a full backup: the chain an earlier MODE=INCREMENT left on the cluster is over
        kept = f"; KEEP_LAST removed image(s) {', '.join(map(str, removed))}" if removed else ""
    else:
        ctx.sink.reached("recorded")
        await (_settle_snapshots(run) if run.snapshot else _prune_checkpoints(run))
        await _prune_anchors(run)
        kept = await keep_last_links(ctx.state, links, vm.id, image.id,
                                     backups.keep_last(ctx.state.vms.get(vm.id).backup_config), ctx.clock.now())
    return f"{_what(run, live)} of VM {vm.id} stored in datastore {ds_id} as image {image.id} ({image.size} MB){kept}"


def _what(run: _Backup, live: bool) -> str:
    kind = "live" if live else "cold"
    link = run.link
    if link is None:
        return f"{kind} backup"
    if link.increment_id:
        return f"{kind} increment {link.increment_id}"
    return f"{kind} full base of a new chain" + (f" ({link.reason})" if link.reason else "")


async def _settle_snapshots(run: _Backup) -> None:
    """The recorded increment's overlays committed into the disks; a failure is logged (the next increment
    commits what is left before it starts)."""
    assert run.link is not None
    try:
        rbd = {source.target for source in run.rbd}
        await tm.settle_snapshots(run.where.kvm, run.runner, run.where.ref, run.vm_id,
                                  [t for d in run.disks if (t := d.get("TARGET") or "") not in rbd],
                                  run.link.increment_id + 1)
    except Exception as exc:  # noqa: BLE001 - logged; the backup is recorded and complete
        log.warning("VM %s: the overlay of increment %d is not committed into its disks yet: %s", run.vm_id,
                    run.link.increment_id, exc)


async def _prune_checkpoints(run: _Backup) -> None:
    """The checkpoints no increment will start from again go; a failure costs bitmaps, not backups."""
    assert run.link is not None
    try:
        removed = await tm.prune_checkpoints(run.where.kvm, run.where.ref, run.vm_id, run.link.increment_id - 1)
    except Exception as exc:  # noqa: BLE001 - logged; the next increment prunes again
        log.warning("VM %s: cannot delete its older checkpoints: %s", run.vm_id, exc)
        return
    if removed:
        log.info("VM %s: checkpoint(s) %s deleted (the chain goes on from the newer ones)", run.vm_id,
                 ", ".join(removed))


async def _prune_anchors(run: _Backup) -> None:
    """The RBD disks keep only the recorded increment's snapshot, the next one's anchor (none after a full
    backup); a failure is logged (the next increment removes what is left)."""
    if not run.rbd:
        return
    number = None if run.link is None else run.link.increment_id
    try:
        removed = await tm.prune_anchors(run.runner, run.where.host.name, run.rbd, run.vm_id, number)
    except Exception as exc:  # noqa: BLE001 - logged; the backup is recorded and complete
        log.warning("VM %s: cannot remove older RBD chain snapshots: %s", run.vm_id, exc)
        return
    if removed:
        log.info("VM %s: RBD snapshot(s) %s removed (%s)", run.vm_id, ", ".join(removed),
                 "a full backup ends the chain" if number is None else f"increment {number} anchors the chain now")


async def _enter_backup_state(run: _Backup, lcm: LcmState) -> None:
    vm = run.ctx.state.vms.get(run.vm_id)
    await run.note(VmStateSaved(vm.id, int(vm.state), int(vm.lcm_state)))
    async with run.ctx.state.mutation() as m:
        vm = run.ctx.state.vms.editable(run.vm_id)
        run.restore_to = (vm.state, vm.lcm_state)
        set_states(vm, VmState.ACTIVE, lcm)
        m.put("vm", vm)


async def _leave_backup_state(run: _Backup) -> None:
    """Put the VM's state back unless the recording transaction did it already."""
    if run.restore_to is None:
        return
    await restore_state(run.ctx.state, run.vm_id, run.restore_to)
    run.restore_to = None


async def restore_state(state: State, vm_id: int, to: tuple[VmState, LcmState]) -> None:
    async with state.mutation() as m:
        vm = state.vms.find(vm_id)
        if vm is not None and vm.lcm_state in (LcmState.BACKUP, LcmState.BACKUP_POWEROFF):
            vm = state.vms.editable(vm_id)
            set_states(vm, *to)
            m.put("vm", vm)


async def _backup(run: _Backup) -> Image:
    """Capture, then upload while the overlays are committed back; then record. An upload that completed
    but is not recorded (the commit or the record failed) is removed again."""
    ctx, where = run.ctx, run.where
    run.staging = tm.staging_dir(run.settings.base_path, run.vm_id, ctx.run_id)
    await run.note(Staging(where.host.id, where.ref, run.staging))
    complete: list[str] = []  # the backup id once its upload is complete

    async def upload(captured: tm.CaptureResult) -> tuple[str, UploadResult]:
        files = [PurePosixPath(image.path).name for image in captured.images] + [VM_XML, DOMAIN_XML]
        backup_id, ssh, _ = await _together(run.store.new_backup_id(run.vm_id),
                                            upload_ssh(run.links, where.host, run.runner, run.datastore),
                                            _write_descriptions(run))
        await run.note(Upload(run.datastore.id, run.vm_id, backup_id))
        run.phase(UPLOAD)
        request = UploadRequest(run.runner, run.staging, files, run.vm_id, backup_id,
                                timeout=run.settings.upload_timeout, ssh_command=ssh,
                                progress=ctx.sink.progress is not None)
        uploaded = await run.store.upload(request, run)
        complete.append(backup_id)
        run.reached("uploaded")
        return backup_id, uploaded

    try:
        try:
            sources, rbd = disk_sources(where.vm, run.disks, await where.kvm.disks(where.ref), where.host)
            run.rbd = rbd
            run.phase(CAPTURE)

            async def capture_and_upload() -> tuple[tm.CaptureResult, str, UploadResult]:
                async with tm.capture(where.kvm, run.runner, _request(run, sources, rbd), run) as captured:
                    return captured, *await upload(captured)  # overlays committed meanwhile

            try:
                captured, backup_id, uploaded = await capture_and_upload()
            except tm.ChainBroken as broken:  # raised before anything was captured
                log.warning("VM %s: %s", run.vm_id, broken)
                run.link = new_chain(broken.reason, broken.cause)
                captured, backup_id, uploaded = await capture_and_upload()
        finally:
            await remove_staging(run.runner, run.staging)
        run.phase(RECORD)
        return await _record(run, backup_id, uploaded, captured)
    except BaseException:
        for backup_id in complete:
            await shielded(_forget_upload(run.store, run.vm_id, backup_id))
        raise


def _request(run: _Backup, sources: list[tm.DiskSource], rbd: list[RbdSource]) -> tm.CaptureRequest:
    """What the transfer driver captures: a full copy, or the run's link of the chain."""
    limits = io_limits(run.datastore)  # the convert on the hypervisor is held to the datastore's limits too
    increment = None
    config = run.where.vm.backup_config
    if run.link is not None:
        increment = tm.Increment(run.vm_id, run.link.increment_id, run.link.sizes, snapshot=run.snapshot)
    return tm.CaptureRequest(run.where.ref, sources, tm.fs_freeze(backups.fs_freeze(config)),
                             run.ctx.run_id, run.staging, nice=limits.nice, ionice=limits.ionice,
                             options=CaptureOptions(rate_limit=limits.rate),
                             progress=run.ctx.sink.progress is not None, increment=increment, vm_id=run.vm_id,
                             rbd_disks=rbd)


async def _together(*steps: Awaitable[Any]) -> list[Any]:
    """Run ``steps`` at the same time; their results, or the first failure (the others are cancelled)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_awaited(step)) for step in steps]
    except BaseExceptionGroup as failed:
        raise first_error(failed) from None
    return [task.result() for task in tasks]


async def _awaited(step: Awaitable[Any]) -> Any:
    return await step


async def _write_descriptions(run: _Backup) -> None:
    """``vm.xml`` (the VM as it is now) and ``domain.xml`` (libvirt's definition) beside the disks."""
    vm = run.ctx.state.vms.get(run.vm_id)
    domain = await run.where.kvm.xml(run.where.ref, inactive=True)
    await _together(*(run.runner.run(["sh", "-c", 'cat > "$1"', "sh", f"{run.staging}/{name}"],
                                     timeout=COMMAND_TIMEOUT, input=text.encode())
                      for name, text in ((VM_XML, vm.to_xml()), (DOMAIN_XML, domain))))


_REMOVE_STAGING = 'rm -rf -- "$1" && { rmdir -- "$2" 2>/dev/null; true; }'


async def remove_staging(runner: Any, staging: str) -> None:
    """``rm -rf`` the run's staging dir, then its VM dir when that is empty; logged, never raised."""
    try:
        await runner.run(["sh", "-c", _REMOVE_STAGING, "sh", staging, str(PurePosixPath(staging).parent)],
                         timeout=COMMAND_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - the backup itself is not worse for a leftover dir
        log.warning("cannot remove the staging dir %s: %s", staging, exc)


async def _forget_upload(store: BackupDatastore, vm_id: int, backup_id: str) -> None:
    try:
        await store.rm(vm_id, [backup_id])
    except Exception as exc:  # noqa: BLE001 - reported; the caller's error is what the run shows
        log.error("cannot remove unrecorded backup %s of VM %s: %s", backup_id, vm_id, exc)


async def _record(run: _Backup, backup_id: str, uploaded: UploadResult, captured: tm.CaptureResult) -> Image:
    """One transaction: the image (new, or the chain's with one more link), the datastore's IMAGES, the VM's
    BACKUP_IDS and chain pointers, and its state back."""
    ctx, link = run.ctx, run.link
    tz = ZoneInfo(run.settings.timezone)
    disk_ids = [int(d["DISK_ID"]) for d in run.disks]
    now = ctx.clock.now()
    sizes = {PurePosixPath(disk.path).name: disk.virtual_size for disk in captured.images}
    async with ctx.state.mutation() as m:
        vm = ctx.state.vms.editable(run.vm_id)
        if link is not None and link.image is not None:
            chain = ctx.state.images.find(link.image.id)
            if chain is None:
                raise ActionError(f"chain image {link.image.id} was deleted while increment {link.increment_id} "
                                  "was taken: the increment is not kept", retryable=True)
            image = add_link(chain, run.datastore, link.increment_id, backup_id, uploaded.size_mb, uploaded.sha256,
                             sizes, now)
        else:
            image_id = await m.new_id("image")
            image = backup_image(image_id, vm, run.datastore, backup_id, uploaded, disk_ids, now, tz, sizes)
            if link is not None:
                image = start_chain(image, run.datastore, link, uploaded.size_mb, sizes, now)
            datastore = ctx.state.datastores.editable(run.datastore.id)
            datastore.images = sorted({*datastore.images, image_id})
            vm.backup_ids = backups.add_backup_id(vm.backup_ids, image_id)
            m.put("datastore", datastore)
        if link is not None:
            vm.backup_config = backups.with_chain(vm.backup_config, image.id, link.increment_id)
        if run.restore_to is not None and vm.lcm_state in (LcmState.BACKUP, LcmState.BACKUP_POWEROFF):
            set_states(vm, *run.restore_to)
        m.put("image", image)
        m.put("vm", vm)
        ctx.sink.complete(m)  # the run's success commits with its image, never apart
    run.restore_to = None
    return image
