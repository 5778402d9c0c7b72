"""one.image.* and one.imagepool.info."""

from __future__ import annotations

from scheduler import backups
from scheduler.api.common import pool_slice, xml_string
from scheduler.api.context import Context
from scheduler.api.registry import registry
from scheduler.objects import pool_element
from scheduler.permissions import Caller, Right, require
from scheduler.rpc import Param

KIND = "image"


@registry.method("one.image.info", Param("id", int), Param("decrypt", bool, False))
async def info(ctx: Context, caller: Caller, image_id: int, decrypt: bool) -> str:
    image = ctx.state.get(KIND, image_id)
    require(caller, image.ownership.uid, Right.USE, "IMAGE", image_id, "info")
    return image.to_xml()


@registry.method("one.image.delete", Param("id", int), Param("force", bool, False))
async def delete(ctx: Context, caller: Caller, image_id: int, force: bool) -> int:
    async with ctx.state.mutation() as m:
        image = ctx.state.get(KIND, image_id)
        require(caller, image.ownership.uid, Right.MANAGE, "IMAGE", image_id, "delete")
        datastore = ctx.state.find("datastore", image.datastore_id)
        if datastore is not None and image_id in datastore.images:
            datastore = ctx.state.editable("datastore", datastore.id)
            datastore.images = [i for i in datastore.images if i != image_id]
            m.put("datastore", datastore)
        for vm_id in image.vms:
            vm = ctx.state.find("vm", vm_id)
            if vm is not None and image_id in vm.backup_ids:
                vm = ctx.state.editable("vm", vm_id)
                vm.backup_ids = backups.del_backup_id(vm.backup_ids, image_id)
                m.put("vm", vm)
        m.delete(KIND, image_id)
    return image_id


@registry.method("one.imagepool.info", Param("filter", int, -2), Param("start", int, -1), Param("end", int, -1))
async def pool_info(ctx: Context, caller: Caller, pool_filter: int, start: int, end: int) -> str:
    return xml_string(pool_element(KIND, pool_slice(caller, ctx.state.all(KIND), pool_filter, start, end)))
