"""In-place restore of a powered-off VM from one of its backups (spec §8.4), as an engine run.

Checks (:func:`check_request`, shared with ``one.vm.restore``): the VM is POWEROFF, the image is a BACKUP
image of this VM, the increment is one of the image's chain (-1: the last), the disk is
one of the image's BACKUP_DISK_IDS (-1: all of them) and still a disk of the VM. The run then puts the VM in
ACTIVE/RESTORE, commits the SNAPSHOT-mode overlays a disk may run on into it (content unchanged) and, for
each disk, fetches the backed-up file next to the domain's current disk file
(``<disk>.vmsched-new-<run>.part``, :func:`scheduler.restore.disk.fetch_disk`: verified against the
recorded sha256, a chain merged up to the increment, in the disk's own format). A failure up to here removes what was fetched: the VM is
exactly as it was. Then the swap, shielded from cancellation: each current file is renamed aside
(``<disk>.vmsched-old-<run>.part``) and the new one renamed in; when every disk is swapped the old files
go, libvirt's snapshot and checkpoint metadata of the domain is dropped (the disks hold none of it now),
and one transaction resets the increment chain pointers, forgets vmsched's system snapshot records and
puts the VM back to POWEROFF.

Journal steps (key ``restore``): ``state`` (the VM's state before), ``temp`` (each temporary file, before
it exists), ``swap`` (every disk's current/new/old path, before the first rename). :func:`make_recoverer`
reads them after a crash: before a ``swap`` it removes the temporary files and puts the state back; after
one it finishes the swap (every new disk was verified) and the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from drivers import tm
from drivers.commands import CommandFailed, Runner, shielded
from drivers.processes import kill_marked
from drivers.vmm import DomainState, KvmHost
from drivers.vmm.domainxml import parse_disks
from scheduler.actions.base import RunContext
from scheduler.backup.checks import state_name
from scheduler.errors import ActionError, NotFound
from scheduler.faults import crash_point
from scheduler.hosts.links import HostLinks
from scheduler.hosts.placement import Placement, locate_for_run
from scheduler.model import backup_config as backups
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import ImageType, LcmState, VmState
from scheduler.model.objects.vm import Vm, set_states
from scheduler.restore.disk import chain_to, fetch_disk, remove_temps
from scheduler.restore.steps import STEPS, Swap, Temp, VmStateSaved
from scheduler.store.state import State

log = logging.getLogger(__name__)

LAST = -1  # increment_id: the last one; disk_id: every disk


@dataclass(frozen=True)
class RestoreArgs:
    """What to restore in place: ARGS ``image_id,increment_id,disk_id`` of the ``restore`` run."""

    image_id: int
    increment_id: int = LAST
    disk_id: int = LAST

    def text(self) -> str:
        return f"{self.image_id},{self.increment_id},{self.disk_id}"


COMMAND_TIMEOUT = 120.0
Recoverer = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class DiskFile:
    """One disk to restore: its id, the domain's file for it now, that file's format, and the run's names."""

    disk_id: int
    path: str
    format: str
    new: str
    old: str


# ---- pure checks and names ----------------------------------------------------------------------------


def check_request(state: State, vm: Vm, image_id: int, increment_id: int, disk_id: int) -> tuple[Image, list[int]]:
    """The image and the disk ids a restore of ``vm`` writes, after spec §8.4's checks; errors say why not."""
    if vm.state != VmState.POWEROFF:
        raise ActionError(f"VM {vm.id} must be powered off to be restored; it is {state_name(vm)}")
    image = state.images.find(image_id)
    if image is None:
        raise NotFound(f"Error getting image [{image_id}].")
    if image.type != ImageType.BACKUP:
        raise ActionError(f"image {image_id} is not a backup image (TYPE {image.type.name})")
    if vm.id not in image.vms:
        owners = ", ".join(map(str, image.vms)) or "no VM"
        raise ActionError(f"backup image {image_id} is a backup of {owners}, not of VM {vm.id}")
    chain_to(image, increment_id)  # an error naming the image's increments when it has no such one
    if disk_id != LAST and disk_id not in image.backup_disk_ids:
        known = ", ".join(map(str, image.backup_disk_ids)) or "none"
        raise ActionError(f"backup image {image_id} has no disk {disk_id} (its disks: {known})")
    chosen = list(image.backup_disk_ids) if disk_id == LAST else [disk_id]
    present = {int(d["DISK_ID"]) for d in vm.template.vectors("DISK") if (d.get("DISK_ID") or "").isdigit()}
    missing = [d for d in chosen if d not in present]
    if missing:
        raise ActionError(f"VM {vm.id} has no disk {', '.join(map(str, missing))} any more: "
                          "it cannot be restored in place")
    if not chosen:
        raise ActionError(f"backup image {image_id} holds no disk")
    return image, chosen


def new_path(path: str, run_id: int) -> str:
    return f"{path}.vmsched-new-{int(run_id)}.part"


def old_path(path: str, run_id: int) -> str:
    return f"{path}.vmsched-old-{int(run_id)}.part"


def disk_files(vm: Vm, disk_ids: Sequence[int], domain_xml: str, run_id: int) -> list[DiskFile]:
    """The domain's file of each disk to restore (matched by the VM's DISK/TARGET); only qcow2 and raw files."""
    targets = {int(d["DISK_ID"]): d.get("TARGET") or "" for d in vm.template.vectors("DISK")
               if (d.get("DISK_ID") or "").isdigit()}
    by_target = {d.target: d for d in parse_disks(domain_xml)}
    files = []
    for disk_id in disk_ids:
        disk = by_target.get(targets.get(disk_id, ""))
        if disk is None or disk.type != "file" or not disk.path or (disk.format or "raw") not in ("qcow2", "raw"):
            raise ActionError(f"VM {vm.id}: disk {disk_id} ({targets.get(disk_id) or 'no TARGET'}) is not a qcow2 "
                              "or raw file disk of the domain; only those are restored in place by this version")
        files.append(DiskFile(disk_id, disk.path, disk.format or "raw", new_path(disk.path, run_id),
                              old_path(disk.path, run_id)))
    return files


def restored_vm(vm: Vm, to: tuple[VmState, LcmState]) -> Vm:
    """``vm`` (an editable copy) after a restore: chain pointers reset, no system snapshot records, state
    back to ``to`` when it is still RESTORE."""
    vm.backup_config = backups.reset_chain(vm.backup_config)
    vm.template.remove("SNAPSHOT")
    if vm.lcm_state == LcmState.RESTORE:
        set_states(vm, *to)
    return vm


# ---- the run -----------------------------------------------------------------------------------------


@dataclass
class _Restore:
    ctx: RunContext
    where: Placement
    image: Image
    disk_ids: list[int]
    increment_id: int = LAST
    restore_to: tuple[VmState, LcmState] | None = None
    files: list[DiskFile] = field(default_factory=list)
    swapping: bool = False  # from the swap step on, the swap itself records the VM's state

    async def journal(self, entry: dict[str, Any]) -> None:
        await self.ctx.sink.step(entry)

    async def fetch_started(self, side: str, pgid: int) -> None:
        self.ctx.sink.reached("restore-fetch")

    @property
    def links(self) -> HostLinks:
        return self.ctx.connections("restores cannot run")

    @property
    def runner(self) -> Runner:
        return self.links.runner(self.where.host)

    @property
    def vm_id(self) -> int:
        return int(self.where.vm.id)


async def perform(ctx: RunContext, args: RestoreArgs) -> str:
    """Restore ``ctx.vm`` in place from backup image ``args.image_id``; the run's message."""
    vm = ctx.state.vms.get(ctx.vm.id)
    image, disk_ids = check_request(ctx.state, vm, args.image_id, args.increment_id, args.disk_id)
    ctx.connections("restores cannot run")
    where = await locate_for_run(ctx)
    await _require_shut_off(where, "a restore writes its disks")
    run = _Restore(ctx, where, image, disk_ids, args.increment_id)
    try:
        await _enter_restore_state(run)
        folded = await tm.fold_snapshots(where.kvm, run.runner, where.ref, run.vm_id)
        if folded:  # INCREMENT_MODE=SNAPSHOT: the disks, not their overlays, are what the restore replaces
            log.info("VM %s: disk(s) %s run on their own files again before the restore", run.vm_id, ", ".join(folded))
        run.files = disk_files(where.vm, disk_ids, await where.kvm.xml(where.ref, inactive=True), ctx.run_id)
        await _fetch_all(run)
        dropped = await shielded_result(_swap_and_finish(run))
    finally:
        if run.restore_to is not None and not run.swapping:
            await restore_state(ctx.state, run.vm_id, run.restore_to)
    disks = ", ".join(map(str, disk_ids))
    increment, source = chain_to(image, args.increment_id)[-1]
    at = f"increment {increment} " if image.increments else ""
    return (f"restored disk(s) {disks} of VM {run.vm_id} from backup image {image.id} ({at}{source}, "
            f"datastore {image.datastore_id}), sha256 verified; {dropped}")


async def _require_shut_off(where: Placement, why: str) -> None:
    now = await where.kvm.state(where.ref)
    if now != DomainState.SHUTOFF:
        raise ActionError(f"VM {where.vm.id}: its domain {where.domain.name} on {where.host.name} is {now}, not "
                          f"shut off; {why}")


async def _enter_restore_state(run: _Restore) -> None:
    vm = run.ctx.state.vms.get(run.vm_id)
    await run.journal(STEPS.entry(VmStateSaved(vm.id, int(vm.state), int(vm.lcm_state))))
    async with run.ctx.state.mutation() as m:
        vm = run.ctx.state.vms.editable(run.vm_id)
        run.restore_to = (vm.state, vm.lcm_state)
        set_states(vm, VmState.ACTIVE, LcmState.RESTORE)
        m.put("vm", vm)


async def _fetch_all(run: _Restore) -> None:
    """Every disk fetched and verified next to the one it replaces; on any failure none is left."""
    ctx, host = run.ctx, run.where.host
    try:
        for disk in run.files:
            await run.journal(STEPS.entry(Temp(host.id, disk.new)))
            await fetch_disk(run.links, ctx.state, run.image, disk.disk_id, host, disk.new, disk.format,
                             run_id=ctx.run_id, journal=run.journal, started=run.fetch_started,
                             increment_id=run.increment_id)
        ctx.sink.reached("restore-fetched")
    except BaseException:
        await shielded(_remove(run.runner, [disk.new for disk in run.files]))
        raise


async def shielded_result(work: Awaitable[str]) -> str:
    """``work`` run to its end even when the caller is cancelled meanwhile; its result."""
    box: list[str] = []

    async def keep() -> None:
        box.append(await work)

    await shielded(keep())
    return box[0]


# $1 current file, $2 new file, $3 old file. Idempotent: a recovery runs it again after a crash anywhere.
_SWAP = """\
[ -e "$2" ] || exit 0
if [ -e "$1" ]; then
  if [ -e "$3" ]; then echo "$1, $2 and $3 all exist: not swapping" >&2; exit 4; fi
  mv -f -T -- "$1" "$3" || exit 1
fi
mv -f -T -- "$2" "$1"
"""
# $1 current file, $2 new file: the new file gets the current one's mode (and owner, where allowed).
_LIKE = 'chmod --reference="$1" -- "$2" && { chown --reference="$1" -- "$2" 2>/dev/null; true; }'


async def _swap_and_finish(run: _Restore) -> str:
    """Swap every disk in, then drop the old files and the libvirt metadata and record the result."""
    runner = run.runner
    try:
        await _require_shut_off(run.where, "its disks are not swapped")
        for disk in run.files:
            await runner.run(["sh", "-c", _LIKE, "sh", disk.path, disk.new], timeout=COMMAND_TIMEOUT)
    except BaseException:
        await _remove(runner, [disk.new for disk in run.files])
        raise
    disks = [(d.path, d.new, d.old) for d in run.files]
    await run.journal(STEPS.entry(Swap(run.where.host.id, run.where.ref, run.vm_id, [list(d) for d in disks])))
    assert run.restore_to is not None
    run.swapping = True
    try:
        return await finish_swap(run.ctx.state, runner, run.where.kvm, run.where.ref, run.vm_id, disks,
                                 run.restore_to)
    except Exception as exc:
        await restore_state(run.ctx.state, run.vm_id, run.restore_to)
        files = "; ".join(f"{current} (new: {new}, old: {old})" for current, new, old in disks)
        raise ActionError(f"VM {run.vm_id}: the restore failed while swapping its disks in: {exc}; check the "
                          f"files: {files}") from exc


async def finish_swap(state: State, runner: Runner, kvm: KvmHost, domain: str, vm_id: int,
                      disks: Sequence[Sequence[str]], to: tuple[VmState, LcmState]) -> str:
    """Everything from the first rename on (also what a recovery finishes): each disk swapped, the old
    files removed, libvirt's snapshot and checkpoint metadata dropped, the VM recorded; what was dropped."""
    for current, new, old in disks:
        await runner.run(["sh", "-c", _SWAP, "sh", current, new, old], timeout=COMMAND_TIMEOUT)
        crash_point("restore-swap")
    await _remove(runner, [old for _, _, old in disks])
    snapshots = await kvm.drop_snapshot_metadata(domain)
    checkpoints = await kvm.drop_checkpoint_metadata(domain)
    async with state.mutation() as m:
        vm = state.vms.find(vm_id)
        if vm is not None:
            m.put("vm", restored_vm(state.vms.editable(vm_id), to))
    return (f"libvirt snapshots dropped: {', '.join(snapshots) or 'none'}; "
            f"checkpoints dropped: {', '.join(checkpoints) or 'none'}")


async def restore_state(state: State, vm_id: int, to: tuple[VmState, LcmState]) -> None:
    """The VM's state before the restore, unless something else changed it since."""
    async with state.mutation() as m:
        vm = state.vms.find(vm_id)
        if vm is not None and vm.lcm_state == LcmState.RESTORE:
            vm = state.vms.editable(vm_id)
            set_states(vm, *to)
            m.put("vm", vm)


async def _remove(runner: Any, paths: Sequence[str]) -> None:
    """``rm -f`` files of the run; logged, never raised (recovery removes what is left)."""
    if not paths:
        return
    try:
        await runner.run(["rm", "-f", "--", *paths], timeout=COMMAND_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - the run's own error is what it reports
        log.warning("cannot remove %s: %s", ", ".join(paths), exc)


# ---- recovery after a crash of the daemon -----------------------------------------------------------


def make_recoverer(state: State, links: HostLinks) -> Recoverer:
    """The engine's ``recoverer`` for restore runs: undo (before the swap) or finish (after) what an
    interrupted restore journaled, then forget its steps."""

    async def recover(run: Any) -> None:
        steps = [s for s in run.steps if STEPS.owns(s)]
        if not steps:
            return
        try:
            if STEPS.all(steps, Swap):
                dropped = await _recover_swap(state, links, steps)
                run.message = ("interrupted by a daemon restart after its disks were verified; the swap was "
                               f"finished at start-up, the VM is restored; {dropped}")
            else:
                await _recover_fetch(state, links, run, steps)
        except Exception as exc:  # noqa: BLE001 - reported; the engine keeps the steps for the next try
            log.error("run %s: recovery of the restore incomplete: %s", run.id, exc)
            return
        run.steps = []

    return recover


async def _recover_fetch(state: State, links: HostLinks, run: Any, steps: list[dict[str, Any]]) -> None:
    """Kill the copies, hashes and converts the run left, remove its temporary files, put the state back."""
    for temp in STEPS.all(steps, Temp):
        host = state.hosts.find(temp.host)
        if host is None:
            raise ActionError(f"host {temp.host} of the restore's file {temp.path} is not registered any more")
        runner = links.runner(host)
        for machine in {id(runner): runner, id(links.local): links.local}.values():
            killed = await kill_marked(machine, temp.path)
            if killed:
                log.warning("run %s: killed process group(s) %s it left running", run.id, ", ".join(map(str, killed)))
        await runner.run(["rm", "-f", "--", temp.path], timeout=COMMAND_TIMEOUT)
        await remove_temps(runner, temp.path, int(run.id))
    saved = STEPS.last(steps, VmStateSaved)
    if saved is not None:
        await restore_state(state, saved.vm, (VmState(saved.state), LcmState(saved.lcm)))


async def _recover_swap(state: State, links: HostLinks, steps: list[dict[str, Any]]) -> str:
    """Every new disk was verified before the swap began: finish it; what libvirt metadata went."""
    swap = STEPS.last(steps, Swap)
    assert swap is not None  # the caller saw it
    host = state.hosts.find(swap.host)
    if host is None:
        raise ActionError(f"host {swap.host} of an interrupted restore is not registered any more")
    before = STEPS.last(steps, VmStateSaved)
    to = (VmState(before.state), LcmState(before.lcm)) if before else (VmState.POWEROFF, LcmState.LCM_INIT)
    try:
        dropped = await finish_swap(state, links.runner(host), links.vmm(host), swap.domain, swap.vm, swap.disks, to)
    except CommandFailed as exc:
        raise ActionError(f"cannot finish the swap of VM {swap.vm}'s disks: {exc}") from exc
    log.warning("VM %s: interrupted restore finished: disks swapped in; %s", swap.vm, dropped)
    return dropped

