"""One full backup of a VM, end to end (spec §4, §7.1-7.2): checks, LCM state, capture, upload, record.

The run checks the target (a BACKUP_DS datastore with room for the selected disks), puts the VM in
ACTIVE/BACKUP (live, from RUNNING) or ACTIVE/BACKUP_POWEROFF (cold, from POWEROFF), stages the disks on
the hypervisor under ``<BACKUP_BASE_PATH>/<vm_id>/<run_id>`` with the ``qcow2`` transfer driver, adds
``vm.xml`` and ``domain.xml``, uploads the directory to the datastore and removes it. Then ONE transaction
records the BACKUP image, the VM's BACKUP_IDS, the datastore's IMAGES and the VM's state back; KEEP_LAST
removes the oldest backups afterwards (errors only logged, as OpenNebula does).

Every artifact is journaled in the run's steps before it exists: the state the VM had, the staging dir on
its host, the upload's backup id (plus the transfer driver's own steps). :func:`make_recoverer` reads them
back after a crash of the daemon and undoes what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any
from zoneinfo import ZoneInfo

from drivers import hostkeys, tm
from drivers.commands import Runner, shielded
from drivers.datastore import BackupDatastore, Capacity, UploadRequest, UploadResult, open_datastore, server_of
from drivers.datastore.base import first_error
from drivers.datastore.layout import DOMAIN_XML, VM_XML
from drivers.datastore.restic import password_file_prefix, remove_password_files
from drivers.datastore.rsync import bwlimit_bytes, priority
from drivers.processes import kill_marked
from drivers.tm.qcow2 import CaptureOptions
from drivers.vmm.domainxml import Disk
from scheduler.actions.base import RunContext
from scheduler.backup.urls import url_vectors
from scheduler.engine.progress import CAPTURE, RECORD, UPLOAD
from scheduler.errors import ActionError, NotFound, ValidationError
from scheduler.hosts.links import HostLinks, is_local
from scheduler.hosts.monitor import tool_key
from scheduler.hosts.placement import Placement, locate_for_run, set_states
from scheduler.model import backup_config as backups
from scheduler.model.objects.common import BACKUP_IMAGE_PERMISSIONS
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import DatastoreType, ImageState, ImageType, LcmState, VmState
from scheduler.model.objects.vm import Vm
from scheduler.model.template import Vector
from scheduler.store.state import State

log = logging.getLogger(__name__)

UPLOAD_TIMEOUT = 6 * 3600.0
COMMAND_TIMEOUT = 120.0
STEP = "backup"  # the key of every journal step this module writes (the transfer driver's use "tm")
StepJournal = Callable[[dict[str, Any]], Awaitable[None]]


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


# ---- pure checks and choices ------------------------------------------------------------------------


def target_datastore(state: State, ds_id: int) -> Datastore:
    datastore = state.datastores.find(ds_id)
    if datastore is None:
        raise ValidationError(f"Error getting datastore [{ds_id}].")
    if datastore.type != DatastoreType.BACKUP_DS:
        raise ValidationError("Datastore needs to be of type BACKUP")
    return datastore


def state_name(vm: Vm) -> str:
    """OpenNebula's state string: the LCM state of an ACTIVE VM, the VM state otherwise."""
    return vm.lcm_state.name if vm.state == VmState.ACTIVE else vm.state.name


def backup_state(vm: Vm) -> LcmState:
    """BACKUP for a running VM, BACKUP_POWEROFF for a powered-off one (spec §4.2); else the error."""
    if vm.host is None:
        raise ActionError(f"VM {vm.id} is not bound to a host (import it or deploy it first): nothing to back up",
                          retryable=True)
    if (vm.state, vm.lcm_state) == (VmState.ACTIVE, LcmState.RUNNING):
        return LcmState.BACKUP
    if vm.state == VmState.POWEROFF:
        return LcmState.BACKUP_POWEROFF
    raise ActionError(f"Could not create a new backup for VM {vm.id}, wrong state {state_name(vm)}.", retryable=True)


def selected_disks(vm: Vm) -> list[Vector]:
    """The DISK vectors a backup includes (spec §4.4); an error when there are none."""
    disks = vm.template.vectors("DISK")
    ids = set(backups.backup_disk_ids(disks, backups.backup_volatile(vm.backup_config)))
    chosen = [disk for disk in disks if int(disk.get("DISK_ID") or -1) in ids]
    if not chosen:
        raise ActionError(f"VM {vm.id} has no disk to back up (CDROM, swap and volatile disks are not backed up)")
    return chosen


def reservation_mb(disks: Sequence[Vector]) -> int:
    return sum(int(d["SIZE"]) for d in disks if (d.get("SIZE") or "").strip().isdigit())


def capacity_check_on(datastore: Datastore, default: bool) -> bool:
    value = (datastore.template.get("DATASTORE_CAPACITY_CHECK") or "").strip().upper()
    return default if value not in ("YES", "NO") else value == "YES"


def check_space(capacity: Capacity, needed_mb: int) -> None:
    if capacity.free_mb < needed_mb:
        raise ActionError("Not enough free space on target datastore")


def disk_sources(vm: Vm, disks: Sequence[Vector], current: Sequence[Disk]) -> list[tm.DiskSource]:
    """The files the domain runs each selected disk on now (matched by TARGET)."""
    by_target = {d.target: d for d in current}
    sources = []
    for disk in disks:
        target = disk.get("TARGET") or ""
        now = by_target.get(target)
        if now is None or now.type != "file" or not now.path:
            raise ActionError(f"VM {vm.id}: disk {disk.get('DISK_ID')} ({target or 'no TARGET'}) is not a file disk "
                              "of the domain; only file disks (qcow2, raw) are backed up by this version")
        sources.append(tm.DiskSource(int(disk["DISK_ID"]), target, now.path, now.format or "raw"))
    return sources


def image_name(vm_id: int, when: float, tz: ZoneInfo) -> str:
    """``"<vm_id> <dd-Mon HH.MM.SS>"`` (spec §7.2), in the configured time zone."""
    return f"{vm_id} {datetime.fromtimestamp(when, tz).strftime('%d-%b %H.%M.%S')}"


def backup_image(image_id: int, vm: Vm, datastore: Datastore, backup_id: str, upload: UploadResult,
                 disk_ids: Sequence[int], now: float, tz: ZoneInfo) -> Image:
    """The BACKUP image of one full backup (spec §7.2); each file's sha256 in TEMPLATE/CHECKSUMS."""
    image = Image(
        id=image_id, name=image_name(vm.id, now, tz), ownership=vm.ownership, permissions=BACKUP_IMAGE_PERMISSIONS,
        type=ImageType.BACKUP, regtime=int(now), modtime=int(now), source=backup_id, format="raw",
        size=upload.size_mb, state=ImageState.READY, prev_state=ImageState.READY, datastore_id=datastore.id,
        datastore=datastore.name, vms=[vm.id], backup_disk_ids=list(disk_ids),
    )  # fmt: skip
    for name, digest in sorted(upload.sha256.items()):
        image.template.add("CHECKSUMS", Vector([("FILE", name), ("SHA256", digest)]))
    for vector in url_vectors(image, datastore):
        image.template.add("BACKUP_URL", vector)
    return image


# AES-GCM first: the fastest cipher where both ends have AES-NI (data-path facts); chacha20 otherwise.
DATA_CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com"


# A backup server gone silent (no reset, e.g. a dead link) ends a copy after about a minute, not at its timeout.
KEEPALIVE = (15, 4)  # ServerAliveInterval seconds, ServerAliveCountMax


def ssh_command(key: Any, known_hosts: Any, *, only_key: bool = True) -> list[str]:
    """The ssh argv a copy runs with: strict host keys from ``known_hosts``, no prompts, the key ``key``
    (``only_key``: that key alone; otherwise ssh may fall back to the user's own keys)."""
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"ServerAliveInterval={KEEPALIVE[0]}",
            "-o", f"ServerAliveCountMax={KEEPALIVE[1]}", "-c", DATA_CIPHERS]
    if key:
        argv += (["-o", "IdentitiesOnly=yes"] if only_key else []) + ["-i", str(key)]
    return argv


# The backup server's verified key, installed for the hypervisor's ssh (stdin: the known_hosts lines; $1 the
# file name under ~/.ssh). Rewritten (atomically) only when it differs; prints the file's absolute path.
_INSTALL_KNOWN_HOSTS = """\
umask 077
mkdir -p -- "$HOME/.ssh"
f="$HOME/.ssh/$1"
cat > "$f.new.$$"
if cmp -s -- "$f.new.$$" "$f"; then rm -f -- "$f.new.$$"; else mv -f -- "$f.new.$$" "$f"; fi
printf '%s\\n' "$f"
"""


def known_hosts_file(datastore: Datastore) -> str:
    """Named by the server, not the datastore: daemons (or datastores) sharing a hypervisor and a backup
    server share the file, and never overwrite one another's."""
    target = server_of(datastore)
    assert target is not None, "only datastores on an SSH server have a server key"
    return f"vmsched_known_hosts.{target.host}_{target.port}"


def server_known_hosts(links: HostLinks, datastore: Datastore) -> str:
    """The known_hosts lines vmsched trusts for the datastore's backup server; an error naming the fix when
    it has none (the server's key must be verified once: ``vmsched datastore accept-hostkey``)."""
    target = server_of(datastore)
    assert target is not None, "only datastores on an SSH server have a server key"
    lines = hostkeys.trusted_entries(links.settings.known_hosts, target.host, target.port)
    if not lines:
        raise ActionError(f"the host key of {target.host}:{target.port}, the backup server of datastore "
                          f"{datastore.id}, is not known to vmsched: check its fingerprint and accept it with "
                          f"`vmsched datastore accept-hostkey {datastore.id}` (or ACCEPT_HOSTKEY = \"YES\")")
    return lines


async def upload_ssh(links: HostLinks, host: Any, runner: Any, datastore: Datastore) -> list[str]:
    """How the upload reaches the other side.

    ``rsync`` and ``restic``: the hypervisor's ssh to the backup (SFTP) server. Its host key is the one vmsched verified (installed
    into ``~/.ssh/vmsched_known_hosts.<server>_<port>`` on the hypervisor: a daemon under systemd has no agent to
    forward), unless the host's ``BACKUP_KNOWN_HOSTS`` names a file there. Its key is the host's
    ``BACKUP_SSH_KEY`` (a path on the hypervisor), else sched.conf's SSH/KEY path with the hypervisor user's
    own keys as fallback. ``fs``: the scheduler's own ssh to the hypervisor."""
    settings = links.settings
    if server_of(datastore) is None:
        return ssh_command(settings.key, settings.known_hosts)
    known = host.template.get("BACKUP_KNOWN_HOSTS")
    if not known:
        lines = server_known_hosts(links, datastore)
        if is_local(host.template):
            known = str(settings.known_hosts)
        else:
            result = await runner.run(["sh", "-c", _INSTALL_KNOWN_HOSTS, "sh", known_hosts_file(datastore)],
                                      timeout=COMMAND_TIMEOUT, input=lines.encode())
            known = result.stdout.decode().strip()
    key = host.template.get("BACKUP_SSH_KEY")
    return ssh_command(key or settings.key, known, only_key=bool(key))


def io_limits(datastore: Datastore) -> tuple[int | None, int | None, int]:
    """(nice, ionice, bytes/s) for the heavy commands of a backup into ``datastore``: its
    ``<DS_MAD>_NICE``, ``<DS_MAD>_IONICE`` and ``<DS_MAD>_BWLIMIT`` (spec §11), applied to the convert
    on the hypervisor as well as to the upload."""
    prefix = datastore.ds_mad.upper()
    nice, ionice = priority(datastore, prefix)
    return nice, ionice, bwlimit_bytes(datastore, prefix)


# The tools a backup into each kind of datastore runs on the hypervisor (fs: the scheduler pulls with rsync
# from a remote host, or copies locally).
NEEDED_TOOLS = {"rsync": ("qemu-img", "rsync"), "restic": ("qemu-img", "restic"), "fs": ("qemu-img",)}


def check_tools(host: Any, datastore: Datastore) -> None:
    """A host whose monitoring found a needed tool missing (``TOOL_<NAME> = NO``) cannot run the backup:
    say which and where, before anything starts. A host not monitored yet is not judged."""
    missing = [tool for tool in NEEDED_TOOLS.get(datastore.ds_mad, ("qemu-img",))
               if (host.template.get(tool_key(tool)) or "").upper() == "NO"]
    if missing:
        raise ActionError(f"host {host.name} has no {' and no '.join(missing)} (found by its monitoring): install "
                          f"{'them' if len(missing) > 1 else 'it'} there to back up into {datastore.ds_mad} "
                          f"datastore {datastore.id}")


def step(name: str, **fields: Any) -> dict[str, Any]:
    return {STEP: name, **fields}


def steps_named(steps: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [s for s in steps if s.get(STEP) == name]


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
    restore_to: tuple[VmState, LcmState] | None = None
    staging: str = ""
    current_phase: str = ""
    upload_processes: int = 0

    # -- what the drivers tell the run (drivers.sink.RunSink) ------------------------------------------
    async def journal(self, entry: dict[str, Any]) -> None:
        await self.ctx.sink.step(entry)

    async def process_started(self, side: str, pgid: int) -> None:
        """A convert, or an upload's copy or hash, runs on the hypervisor ("source") or the datastore's
        server: journaled, so that a restarted daemon kills it."""
        if self.current_phase != UPLOAD:
            await self.journal(step("process", side=side, host=self.where.host.id, pgid=pgid, marker=self.staging))
            self.reached("convert")
            return
        await self.journal(step("process", side=side, host=self.where.host.id, datastore=self.datastore.id,
                                pgid=pgid, marker=self.staging))
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
        links = self.ctx.links
        assert links is not None  # perform() refused to start without host connections
        return links

    @property
    def runner(self) -> Runner:
        return self.links.runner(self.where.host)

    @property
    def vm_id(self) -> int:
        return int(self.where.vm.id)


async def perform(ctx: RunContext, ds_id: int) -> str:
    """The whole backup of ``ctx.vm`` into datastore ``ds_id``; the run's message."""
    settings = BackupSettings.from_config(getattr(ctx, "config", None))
    vm = ctx.state.vms.get(ctx.vm.id)
    datastore = target_datastore(ctx.state, ds_id)
    backup_state(vm)
    disks = selected_disks(vm)
    if ctx.links is None:
        raise ActionError("this daemon has no host connections; backups cannot run")
    where = await locate_for_run(ctx)
    check_tools(where.host, datastore)
    live = backup_state(where.vm) is LcmState.BACKUP
    store = open_datastore(datastore, ctx.links.pool)
    if capacity_check_on(datastore, settings.capacity_check):
        check_space(await store.monitor(), reservation_mb(disks))
    run = _Backup(ctx, settings, datastore, store, where, disks)
    try:
        await _enter_backup_state(run, LcmState.BACKUP if live else LcmState.BACKUP_POWEROFF)
        image = await _backup(run)
    finally:
        await _leave_backup_state(run)
    removed = await apply_keep_last(ctx.state, ctx.links, vm.id)
    kept = f"; KEEP_LAST removed image(s) {', '.join(map(str, removed))}" if removed else ""
    return (f"{'live' if live else 'cold'} backup {image.source} of VM {vm.id} stored in datastore {ds_id} as image "
            f"{image.id} ({image.size} MB){kept}")


async def _enter_backup_state(run: _Backup, lcm: LcmState) -> None:
    vm = run.ctx.state.vms.get(run.vm_id)
    await run.journal(step("state", vm=vm.id, state=int(vm.state), lcm=int(vm.lcm_state)))
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
    await run.journal(step("staging", host=where.host.id, domain=where.ref, path=run.staging))
    nice, ionice, rate = io_limits(run.datastore)
    complete: list[str] = []  # the backup id once its upload is complete

    async def upload(captured: tm.CaptureResult) -> tuple[str, UploadResult]:
        files = [PurePosixPath(image.path).name for image in captured.images] + [VM_XML, DOMAIN_XML]
        backup_id, ssh, _ = await _together(run.store.new_backup_id(run.vm_id),
                                            upload_ssh(run.links, where.host, run.runner, run.datastore),
                                            _write_descriptions(run))
        await run.journal(step("upload", datastore=run.datastore.id, vm=run.vm_id, backup_id=backup_id))
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
            sources = disk_sources(where.vm, run.disks, await where.kvm.disks(where.ref))
            run.phase(CAPTURE)
            request = tm.CaptureRequest(where.ref, sources, tm.fs_freeze(backups.fs_freeze(where.vm.backup_config)),
                                        ctx.run_id, run.staging, nice=nice, ionice=ionice,
                                        options=CaptureOptions(rate_limit=rate), progress=ctx.sink.progress is not None)
            async with tm.capture(where.kvm, run.runner, request, run) as captured:  # overlays committed meanwhile
                backup_id, uploaded = await upload(captured)
        finally:
            await _remove_staging(run.runner, run.staging)
        run.phase(RECORD)
        return await _record(run, backup_id, uploaded)
    except BaseException:
        for backup_id in complete:
            await shielded(_forget_upload(run.store, run.vm_id, backup_id))
        raise


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


async def _remove_staging(runner: Any, staging: str) -> None:
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


async def _record(run: _Backup, backup_id: str, uploaded: UploadResult) -> Image:
    """One transaction: the image, the datastore's IMAGES, the VM's BACKUP_IDS and its state back."""
    ctx = run.ctx
    tz = ZoneInfo(run.settings.timezone)
    disk_ids = [int(d["DISK_ID"]) for d in run.disks]
    async with ctx.state.mutation() as m:
        image_id = await m.new_id("image")
        vm = ctx.state.vms.editable(run.vm_id)
        image = backup_image(image_id, vm, run.datastore, backup_id, uploaded, disk_ids, ctx.clock.now(), tz)
        datastore = ctx.state.datastores.editable(run.datastore.id)
        datastore.images = sorted({*datastore.images, image_id})
        vm.backup_ids = backups.add_backup_id(vm.backup_ids, image_id)
        if run.restore_to is not None and vm.lcm_state in (LcmState.BACKUP, LcmState.BACKUP_POWEROFF):
            set_states(vm, *run.restore_to)
        m.put("image", image)
        m.put("datastore", datastore)
        m.put("vm", vm)
        ctx.sink.complete(m)  # the run's success commits with its image, never apart
    run.restore_to = None
    return image


# ---- retention ---------------------------------------------------------------------------------------


async def apply_keep_last(state: State, links: HostLinks, vm_id: int) -> list[int]:
    """Delete the oldest backup images beyond KEEP_LAST (spec §7.1): the files, then the records.
    Errors are logged; an image whose files cannot be removed keeps its record."""
    vm = state.vms.get(vm_id)
    doomed = backups.remove_last(vm.backup_ids, backups.keep_last(vm.backup_config))
    if doomed:
        log.info("VM %s: Removing backup snapshots: %s", vm_id, " ".join(map(str, doomed)))
    removed = []
    for image_id in doomed:
        try:
            await _delete_backup(state, links, vm_id, image_id)
            removed.append(image_id)
        except Exception as exc:  # noqa: BLE001 - OpenNebula only logs retention errors
            log.error("VM %s: cannot remove backup image %s: %s", vm_id, image_id, exc)
    return removed


async def _delete_backup(state: State, links: HostLinks, vm_id: int, image_id: int) -> None:
    image = state.images.find(image_id)
    if image is not None and image.source:
        datastore = state.datastores.get(image.datastore_id)
        try:
            await open_datastore(datastore, links.pool).rm(vm_id, [image.source])
        except NotFound:
            log.warning("VM %s: files of backup image %s were gone already", vm_id, image_id)
    await forget_image(state, vm_id, image_id)


async def forget_image(state: State, vm_id: int, image_id: int) -> None:
    """Remove an image record, from its datastore's IMAGES and from the VM's BACKUP_IDS."""
    async with state.mutation() as m:
        image = state.images.find(image_id)
        if image is not None:
            datastore = state.datastores.find(image.datastore_id)
            if datastore is not None and image_id in datastore.images:
                datastore = state.datastores.editable(datastore.id)
                datastore.images = [i for i in datastore.images if i != image_id]
                m.put("datastore", datastore)
            m.delete("image", image_id)
        vm = state.vms.find(vm_id)
        if vm is not None and image_id in vm.backup_ids:
            vm = state.vms.editable(vm_id)
            vm.backup_ids = backups.del_backup_id(vm.backup_ids, image_id)
            m.put("vm", vm)


# ---- recovery after a crash of the daemon -----------------------------------------------------------


def make_recoverer(state: State, links: HostLinks) -> Callable[[Any], Awaitable[None]]:
    """The engine's ``recoverer``: undo what an interrupted backup run journaled, then forget its steps."""

    async def recover(run: Any) -> None:
        steps = list(run.steps)
        if not steps:
            return
        problems = [p for p in (await _recover_processes(state, links, run, steps),
                                await _recover_host(state, links, run, steps),
                                await _recover_upload(state, links, steps),
                                await _recover_state(state, steps)) if p]
        if problems:
            log.error("run %s: recovery incomplete: %s", run.id, "; ".join(problems))
        else:
            run.steps = []

    return recover


async def _recover_processes(state: State, links: HostLinks, run: Any, steps: list[dict[str, Any]]) -> str:
    """Kill the converts, copies and hashes the run left running: on every machine it journaled a process
    on, and on its hypervisor, every process group naming its staging directory (see drivers.processes)."""
    staged = steps_named(steps, "staging")
    if not staged or links is None:
        return ""
    marker = str(staged[-1]["path"])
    machines = {("source", int(staged[-1]["host"])): None}
    for entry in steps_named(steps, "process"):
        side = str(entry.get("side"))
        machines[(side, int(entry["datastore"] if side == "server" else entry["host"]))] = None
    problems = []
    for side, object_id in machines:
        try:
            runner = _process_runner(state, links, side, object_id)
            killed = await kill_marked(runner, marker) if runner is not None else []
            if killed:
                log.warning("run %s: killed process group(s) %s it left running (%s side)", run.id,
                            ", ".join(map(str, killed)), side)
            if runner is not None and side == "source":  # a killed restic leaves its password file
                await remove_password_files(runner, password_file_prefix(marker, run.vm_id), COMMAND_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - every part of the recovery is tried
            problems.append(f"processes of {marker} ({side} side): {exc}")
    return "; ".join(problems)



def _process_runner(state: State, links: HostLinks, side: str, object_id: int) -> Runner | None:
    """The runner of the machine a run's process ran on: the hypervisor, or the datastore's server."""
    if side == "server":
        datastore = state.datastores.find(object_id)
        return open_datastore(datastore, links.pool).server if datastore is not None else None
    host = state.hosts.find(object_id)
    return links.runner(host) if host is not None else None


async def _recover_host(state: State, links: HostLinks, run: Any, steps: list[dict[str, Any]]) -> str:
    """Guest resumed/thawed, overlays committed back, staged files and the staging dir removed."""
    staged = steps_named(steps, "staging")
    if not staged or links is None:
        return ""
    entry = staged[-1]
    host = state.hosts.find(int(entry["host"]))
    if host is None:
        return f"host {entry['host']} of the staging dir {entry['path']} is not registered any more"
    runner = links.runner(host)
    try:
        report = await tm.recover(links.vmm(host), runner, str(entry["domain"]), steps)
        log.info("run %s: recovered on %s: %s", run.id, host.name, report)
    except Exception as exc:  # noqa: BLE001 - every part of the recovery is tried
        return str(exc)
    if PurePosixPath(entry["path"]).name == str(run.id):  # only the run's own dir
        await _remove_staging(runner, str(entry["path"]))
    return ""


async def _recover_upload(state: State, links: HostLinks, steps: list[dict[str, Any]]) -> str:
    """Partial uploads removed; a complete upload that no image records removed too."""
    uploads = steps_named(steps, "upload")
    if not uploads or links is None:
        return ""
    entry = uploads[-1]
    datastore = state.datastores.find(int(entry["datastore"]))
    if datastore is None:
        return f"datastore {entry['datastore']} is not registered any more"
    store = open_datastore(datastore, links.pool)
    vm_id, backup_id = int(entry["vm"]), str(entry["backup_id"])
    try:
        await store.cleanup_partial(vm_id)
        recorded = any(i.source == backup_id and i.datastore_id == datastore.id for i in state.images.all())
        if not recorded and await store.exists(vm_id, backup_id):
            await store.rm(vm_id, [backup_id])
    except Exception as exc:  # noqa: BLE001 - every part of the recovery is tried
        return str(exc)
    return ""


async def _recover_state(state: State, steps: list[dict[str, Any]]) -> str:
    for entry in steps_named(steps, "state")[-1:]:
        await restore_state(state, int(entry["vm"]), (VmState(int(entry["state"])), LcmState(int(entry["lcm"]))))
    return ""
