"""Snapshot actions: system snapshots (``name`` / ``snap_id``) and disk snapshots
(``disk_id,name`` / ``disk_id,snap_id``), run on the VM's domain through libvirt.

System snapshots are libvirt internal snapshots (memory when running, every disk inside its qcow2);
the vmm driver refuses them when a writable disk is not qcow2, and that message is the run's error.
Each one is recorded in the VM TEMPLATE as OpenNebula does (``SNAPSHOT = [ SNAPSHOT_ID, NAME,
HYPERVISOR_ID, TIME, SYSTEM_DISK_SIZE ]``); its libvirt name is ``vmsched-snap-<SNAPSHOT_ID>``.

Disk snapshots are qcow2 internal snapshots made with qemu-img, so the driver allows create, revert
and delete only while the VM is powered off (a running QEMU holds the image). A disk snapshot's id is
qemu's own id of that snapshot inside the image (``qemu-img snapshot -l``); names must be unique per
disk so that the id always names one snapshot.

Like power actions, each run locates the domain first and calls libvirt once, never retrying.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from drivers.vmm.domainxml import disk_by_target
from drivers.vmm.imageinfo import ImageInfo, image_info
from scheduler.actions.base import ActionSpec, ArgsCheck, RunContext, int_token, malformed, split_args
from scheduler.errors import ActionError, ValidationError
from scheduler.hosts.placement import Placement, locate_for_run, sync_state
from scheduler.model import backup_config as backups
from scheduler.model.objects.vm import Vm
from scheduler.model.template import Vector

Token = Callable[[str], bool]
HYPERVISOR_PREFIX = "vmsched-snap-"


def _name(token: str) -> bool:
    return bool(token)


def _id(token: str) -> bool:
    value = int_token(token)
    return value is not None and value >= 0


# name -> (ARGS format, one check per token)
FORMATS: dict[str, tuple[str, tuple[Token, ...]]] = {
    "snapshot-create": ("name", (_name,)),
    "snapshot-revert": ("snap_id", (_id,)),
    "snapshot-delete": ("snap_id", (_id,)),
    "disk-snapshot-create": ("disk_id,name", (_id, _name)),
    "disk-snapshot-revert": ("disk_id,snap_id", (_id, _id)),
    "disk-snapshot-delete": ("disk_id,snap_id", (_id, _id)),
}


def _validator(name: str, args_format: str, tokens: tuple[Token, ...]) -> ArgsCheck:
    def validate(args: str) -> None:
        given = split_args(args)
        if len(given) != len(tokens) or not all(ok(token) for ok, token in zip(tokens, given, strict=True)):
            raise malformed(name, args_format)

    return validate


# ---- system snapshots -------------------------------------------------------------------------------


def system_snapshot(vm: Vm, snap_id: int) -> Vector:
    for vector in vm.template.vectors("SNAPSHOT"):
        if vector.get("SNAPSHOT_ID") == str(snap_id):
            return vector
    known = ", ".join(v.get("SNAPSHOT_ID") or "?" for v in vm.template.vectors("SNAPSHOT")) or "none"
    raise ActionError(f"VM {vm.id} has no system snapshot {snap_id} (snapshots: {known})")


def next_snapshot_id(vm: Vm) -> int:
    ids = [int(v["SNAPSHOT_ID"]) for v in vm.template.vectors("SNAPSHOT") if (v.get("SNAPSHOT_ID") or "").isdigit()]
    return max(ids, default=-1) + 1


async def _change_template(ctx: RunContext, change: Callable[[Vm], None]) -> None:
    async with ctx.state.mutation() as m:
        vm = ctx.state.vms.editable(ctx.vm.id)
        change(vm)
        m.put("vm", vm)


def refuse_under_overlays(vm: Vm, what: str) -> None:
    """A VM backed up with INCREMENT_MODE=SNAPSHOT runs on overlays that each backup commits into its disks
    and removes: a snapshot kept inside one would be lost with it."""
    config = vm.backup_config
    if backups.mode(config) == "INCREMENT" and backups.increment_mode(config) == "SNAPSHOT":
        raise ActionError(f"VM {vm.id} is backed up with INCREMENT_MODE=SNAPSHOT: its disks run on overlays that "
                          f"every backup commits and removes, so {what} inside them would be lost; use "
                          "INCREMENT_MODE=CBT (or MODE=FULL) for this VM first")


async def snapshot_create(ctx: RunContext, where: Placement) -> str:
    name = split_args(ctx.args)[0]
    refuse_under_overlays(where.vm, "a system snapshot")
    snap_id = next_snapshot_id(where.vm)
    hypervisor_id = f"{HYPERVISOR_PREFIX}{snap_id}"
    await where.kvm.create_system_snapshot(where.ref, hypervisor_id, description=name)
    record = Vector([("SNAPSHOT_ID", str(snap_id)), ("NAME", name), ("HYPERVISOR_ID", hypervisor_id),
                     ("TIME", str(int(ctx.clock.now()))), ("SYSTEM_DISK_SIZE", "0")])
    await _change_template(ctx, lambda vm: vm.template.add("SNAPSHOT", record))
    return f"system snapshot {snap_id} ({name!r}, libvirt {hypervisor_id}) created"


async def snapshot_revert(ctx: RunContext, where: Placement) -> str:
    snap_id = int(split_args(ctx.args)[0])
    record = system_snapshot(where.vm, snap_id)
    try:
        await where.kvm.revert_system_snapshot(where.ref, record.get("HYPERVISOR_ID") or "")
    finally:
        now = await sync_state(ctx, where)
    return f"reverted to system snapshot {snap_id} ({record.get('NAME')!r}); VM is {now}"


async def snapshot_delete(ctx: RunContext, where: Placement) -> str:
    snap_id = int(split_args(ctx.args)[0])
    record = system_snapshot(where.vm, snap_id)
    await where.kvm.delete_system_snapshot(where.ref, record.get("HYPERVISOR_ID") or "")

    def forget(vm: Vm) -> None:
        kept = [v for v in vm.template.vectors("SNAPSHOT") if v.get("SNAPSHOT_ID") != str(snap_id)]
        vm.template.remove("SNAPSHOT")
        for vector in kept:
            vm.template.add("SNAPSHOT", vector)

    await _change_template(ctx, forget)
    return f"system snapshot {snap_id} ({record.get('NAME')!r}) deleted"


# ---- disk snapshots ---------------------------------------------------------------------------------


def disk_target(vm: Vm, disk_id: int) -> str:
    for disk in vm.template.vectors("DISK"):
        if disk.get("DISK_ID") == str(disk_id) and disk.get("TARGET"):
            return disk["TARGET"]
    raise ActionError(f"VM {vm.id} has no disk {disk_id}")


async def _disk_image(ctx: RunContext, where: Placement, disk_id: int) -> tuple[str, str, ImageInfo]:
    """(target, image path, qemu-img info) of one disk of the VM, as the domain has it now."""
    target = disk_target(where.vm, disk_id)
    try:
        disk = disk_by_target(await where.kvm.disks(where.ref), target)
    except ValidationError as exc:
        raise ActionError(f"VM {where.vm.id}: disk {disk_id}: {exc}") from exc
    if disk.type != "file" or not disk.path:
        raise ActionError(f"VM {where.vm.id}: disk {disk_id} ({target}) is not a file disk; "
                          "internal disk snapshots need a qcow2 file")
    info = await image_info(where.runner, disk.path, where.host.name)
    return target, disk.path, info


def _only_named(info: ImageInfo, snap_id: int, label: str) -> str:
    snapshot = info.snapshot(snap_id)
    if snapshot is None:
        known = ", ".join(f"{s.id} {s.name!r}" for s in info.snapshots) or "none"
        raise ActionError(f"{label} has no snapshot {snap_id} (snapshots: {known})")
    if len(info.named(snapshot.name)) > 1:
        raise ActionError(f"{label}: snapshot {snap_id} shares its name {snapshot.name!r} with another; "
                          "use qemu-img on the host")
    return snapshot.name


async def disk_snapshot_create(ctx: RunContext, where: Placement) -> str:
    token, name = split_args(ctx.args)
    disk_id = int(token)
    refuse_under_overlays(where.vm, "a disk snapshot")
    target, path, info = await _disk_image(ctx, where, disk_id)
    if info.named(name):
        raise ActionError(f"VM {where.vm.id}: disk {disk_id} ({target}) already has a snapshot named {name!r}")
    await where.kvm.create_disk_snapshot(where.ref, target, name)
    created = (await image_info(where.runner, path, where.host.name)).named(name)
    snap = f"snapshot {created[0].id}" if created else "a snapshot"
    return f"disk {disk_id} ({target}): {snap} {name!r} created"


async def _disk_snapshot_change(ctx: RunContext, where: Placement, verb: str) -> str:
    disk_id, snap_id = (int(token) for token in split_args(ctx.args))
    target, _, info = await _disk_image(ctx, where, disk_id)
    name = _only_named(info, snap_id, f"VM {where.vm.id}: disk {disk_id} ({target})")
    if verb == "reverted to":
        await where.kvm.revert_disk_snapshot(where.ref, target, name)
    else:
        await where.kvm.delete_disk_snapshot(where.ref, target, name)
    return f"disk {disk_id} ({target}): {verb} snapshot {snap_id} ({name!r})"


async def disk_snapshot_revert(ctx: RunContext, where: Placement) -> str:
    return await _disk_snapshot_change(ctx, where, "reverted to")


async def disk_snapshot_delete(ctx: RunContext, where: Placement) -> str:
    return await _disk_snapshot_change(ctx, where, "deleted")


OPERATIONS: dict[str, Callable[[RunContext, Placement], Awaitable[str]]] = {
    "snapshot-create": snapshot_create,
    "snapshot-revert": snapshot_revert,
    "snapshot-delete": snapshot_delete,
    "disk-snapshot-create": disk_snapshot_create,
    "disk-snapshot-revert": disk_snapshot_revert,
    "disk-snapshot-delete": disk_snapshot_delete,
}


def _runner(name: str) -> Callable[[RunContext], Awaitable[str | None]]:
    async def run(ctx: RunContext) -> str | None:
        where = await locate_for_run(ctx)
        return await OPERATIONS[name](ctx, where)

    return run


SPECS = tuple(
    ActionSpec(name, "snapshot", False, _validator(name, fmt, tokens), _runner(name), args_format=fmt)
    for name, (fmt, tokens) in FORMATS.items()
)
