"""one.vm.restore (spec §8.4, §10.1, §10.3) and vmsched's way of following the restore it queued.

``one.vm.restore`` checks the request as the run will (``scheduler.restore.in_place.check_request``: VM powered
off, a BACKUP image of this VM, the increment, the disk) and queues a one-shot ``restore`` run through the
engine, serialised with the VM's other actions; ``vmsched.vm.restorestatus`` tells how the VM's last one
went.
"""

from __future__ import annotations

from typing import Any

from scheduler.actions.restore import NAME as ACTION
from scheduler.api.context import Context
from scheduler.api.permissions import Caller, Right, require
from scheduler.api.registry import registry
from scheduler.api.rpc import Param
from scheduler.errors import ActionError, NotFound
from scheduler.restore.in_place import RestoreArgs, check_request


@registry.method("one.vm.restore", Param("id", int), Param("image_id", int), Param("increment_id", int, -1),
                 Param("disk_id", int, -1))
async def restore(ctx: Context, caller: Caller, vm_id: int, image_id: int, increment_id: int, disk_id: int) -> int:
    """Restore the powered-off VM's disks in place from its backup image; the VM id. The restore runs later
    (``vmsched.vm.restorestatus`` follows it); the VM is ACTIVE/RESTORE while it does."""
    vm = ctx.state.vms.get(vm_id)
    require(caller, vm.ownership.uid, Right.ADMIN, "VM", vm_id, "restore")
    image = ctx.state.images.get(image_id)
    require(caller, image.ownership.uid, Right.USE, "IMAGE", image_id, "restore")
    check_request(ctx.state, vm, image_id, increment_id, disk_id)
    if ctx.engine is None:
        raise ActionError("this daemon runs no engine: restores cannot be queued")
    if any(r.vm_id == vm_id and r.action == ACTION for r in ctx.engine.journal.open.values()):
        raise ActionError(f"VM {vm_id} has a restore queued or running already")
    ctx.engine.submit(vm_id, ACTION, RestoreArgs(image_id, increment_id, disk_id).text())
    return vm_id


@registry.method("vmsched.vm.restorestatus", Param("id", int))
async def restore_status(ctx: Context, caller: Caller, vm_id: int) -> dict[str, Any]:
    """The VM's newest restore run: ID, STATE (queued, running, done, failed, interrupted), MESSAGE, and
    IMAGE_ID, INCREMENT_ID, DISK_ID as requested."""
    vm = ctx.state.vms.get(vm_id)
    require(caller, vm.ownership.uid, Right.USE, "VM", vm_id, "restorestatus")
    if ctx.engine is None:
        raise ActionError("this daemon runs no engine")
    journal = ctx.engine.journal
    ours = [r for r in journal.open.values() if r.vm_id == vm_id and r.action == ACTION]
    if not ours:
        await journal.durable()
        ours = [r for r in await journal.history(vm_id, 50) if r.action == ACTION]
    if not ours:
        raise NotFound(f"VM {vm_id} has no restore")
    run = max(ours, key=lambda r: r.id)
    image_id, increment_id, disk_id = (int(word) for word in run.args.split(","))
    return {"ID": run.id, "STATE": run.state.value, "MESSAGE": run.message, "IMAGE_ID": image_id,
            "INCREMENT_ID": increment_id, "DISK_ID": disk_id}
