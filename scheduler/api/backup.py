"""one.vm.backup (spec §4.1, §10.1, §10.3) and vmsched's way of following the backup it queued.

``one.vm.backup`` checks the request as OpenNebula does (the VM, its backup job, the datastore's type and
free space, the VM's state, its disks) and queues a one-shot run through the engine, so a direct backup
passes the same admission limits as a scheduled one. The backup itself runs later
(``scheduler.backup.run``); ``vmsched.vm.backupstatus`` tells how the VM's last one-shot backup went.
"""

from __future__ import annotations

from typing import Any

from drivers.datastore import Capacity
from scheduler.api.context import Context
from scheduler.api.permissions import Caller, Right, require
from scheduler.api.registry import registry
from scheduler.api.rpc import Param
from scheduler.backup.checks import (
    backup_state,
    capacity_check_on,
    check_space,
    reservation_mb,
    selected_disks,
    target_datastore,
)
from scheduler.errors import ActionError, NotFound, ValidationError
from scheduler.model import backup_config as backups
from scheduler.model.objects.vm import Vm

ACTION = "backup"


def default_datastore(ctx: Context, vm: Vm) -> int:
    """ds -1: the datastore of the VM's newest backup."""
    for image_id in reversed(vm.backup_ids):
        image = ctx.state.images.find(image_id)
        if image is not None:
            return int(image.datastore_id)
    raise ValidationError(f"VM {vm.id} has no earlier backup: give the backup datastore")


def check_request(ctx: Context, vm: Vm, ds_id: int) -> int:
    """The datastore the backup goes to, after OpenNebula's checks in its order (spec §4.1, §4.2)."""
    job = backups.member_of_job(vm.backup_config)
    if job is not None:
        raise ActionError("Unable to start an individual backup for the Virtual Machine, it is part of "
                          f"Backup Job ID {job}")
    ds_id = default_datastore(ctx, vm) if ds_id < 0 else ds_id
    datastore = target_datastore(ctx.state, ds_id)
    disks = selected_disks(vm)
    monitored = datastore.total_mb > 0
    if monitored and capacity_check_on(datastore, ctx.config.datastore_capacity_check):
        check_space(Capacity(datastore.total_mb, datastore.free_mb, datastore.used_mb), reservation_mb(disks))
    backup_state(vm)
    return ds_id


@registry.method("one.vm.backup", Param("id", int), Param("ds_id", int, -1), Param("reset", bool, False))
async def backup(ctx: Context, caller: Caller, vm_id: int, ds_id: int, reset: bool) -> int:
    vm = ctx.state.vms.get(vm_id)
    require(caller, vm.ownership.uid, Right.ADMIN, "VM", vm_id, "backup")
    ds_id = check_request(ctx, vm, ds_id)
    if ctx.engine is None:
        raise ActionError("this daemon runs no engine: backups cannot be queued")
    ctx.engine.submit(vm_id, ACTION, f"{ds_id},{int(reset)}")
    return vm_id


def run_status(ctx: Context, run: Any) -> dict[str, Any]:
    message = run.message
    if not message and run.state.value == "queued" and ctx.engine is not None:  # why it waits
        message = ctx.engine.waiting_reasons().get(run.id, "")
    status = {"ID": run.id, "STATE": run.state.value, "ATTEMPT": run.attempt, "MESSAGE": message,
              "DATASTORE_ID": run.datastore_id}
    progress = ctx.progress.get(run.id) if ctx.progress is not None else None
    if progress is not None:
        status["PROGRESS"] = progress.as_struct(ctx.clock.now())
    return status


@registry.method("vmsched.vm.backupstatus", Param("id", int))
async def backup_status(ctx: Context, caller: Caller, vm_id: int) -> dict[str, Any]:
    """The VM's newest one-shot backup run: ID, STATE (queued, running, done, given_up...), ATTEMPT, MESSAGE (while
    it is queued: why it waits), and while it runs PROGRESS (see ``vmsched.vm.backupprogress``)."""
    vm = ctx.state.vms.get(vm_id)
    require(caller, vm.ownership.uid, Right.USE, "VM", vm_id, "backupstatus")
    if ctx.engine is None:
        raise ActionError("this daemon runs no engine")
    journal = ctx.engine.journal
    ours = [r for r in journal.open.values() if r.vm_id == vm_id and r.action == ACTION and r.action_id is None]
    if not ours:
        await journal.durable()
        ours = [r for r in await journal.history(vm_id, 50) if r.action == ACTION and r.action_id is None]
    if not ours:
        raise NotFound(f"VM {vm_id} has no one-shot backup")
    return run_status(ctx, max(ours, key=lambda r: r.id))


@registry.method("vmsched.vm.backupprogress", Param("id", int))
async def backup_progress(ctx: Context, caller: Caller, vm_id: int) -> dict[str, Any]:
    """How far the VM's running backup (scheduled or one-shot) is: PHASE (capture, upload, record), DONE and
    TOTAL bytes of that phase, ELAPSED seconds, RUN_ID, and DISKS (DISK_ID, DONE, TOTAL); {} when none runs.
    Bytes are doubles (XML-RPC integers are 32-bit)."""
    vm = ctx.state.vms.get(vm_id)
    require(caller, vm.ownership.uid, Right.USE, "VM", vm_id, "backupprogress")
    progress = ctx.progress.for_vm(vm_id) if ctx.progress is not None else None
    return progress.as_struct(ctx.clock.now()) if progress is not None else {}


@registry.method("one.vm.backupcancel", Param("id", int))
async def backupcancel(ctx: Context, caller: Caller, vm_id: int) -> int:
    """Cancel the VM's running (or queued) backup; it is recorded as cancelled and not retried."""
    vm = ctx.state.vms.get(vm_id)
    require(caller, vm.ownership.uid, Right.ADMIN, "VM", vm_id, "backup-cancel")
    if ctx.engine is None or ctx.engine.cancel_backup(vm_id) is None:
        raise ActionError(f"VM {vm_id} has no backup in progress or waiting to cancel")
    return vm_id
