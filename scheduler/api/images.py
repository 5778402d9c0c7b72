"""one.image.* and one.imagepool.info."""

from __future__ import annotations

import logging

from drivers.datastore import open_datastore
from scheduler.api.common import pool_slice, xml_string
from scheduler.api.context import Context
from scheduler.api.permissions import Caller, Right, require
from scheduler.api.registry import registry
from scheduler.api.rpc import Param
from scheduler.backup.chain import being_flattened
from scheduler.backup.retention import forget_image
from scheduler.backup.urls import with_urls
from scheduler.errors import ActionError, DriverError, NotFound, ValidationError
from scheduler.hosts.imageds import bridge_host, is_image_datastore
from scheduler.model.objects import pool_element
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import ImageType, LcmState
from scheduler.restore import to_images as image_restore
from scheduler.restore.to_images import this_machine

KIND = "image"
log = logging.getLogger(__name__)


@registry.method("one.image.info", Param("id", int), Param("decrypt", bool, False))
async def info(ctx: Context, caller: Caller, image_id: int, decrypt: bool) -> str:
    image = ctx.state.images.get(image_id)
    require(caller, image.ownership.uid, Right.USE, "IMAGE", image_id, "info")
    return with_urls(image, ctx.state.datastores.find(image.datastore_id)).to_xml()


@registry.method("one.image.delete", Param("id", int), Param("force", bool, False))
async def delete(ctx: Context, caller: Caller, image_id: int, force: bool) -> int:
    """A backup image's files go first, through its datastore's driver; then the record (OpenNebula's
    image delete path, spec §5.2 ``rm``). With ``force`` the record goes even if the files cannot."""
    image = ctx.state.images.get(image_id)
    require(caller, image.ownership.uid, Right.MANAGE, "IMAGE", image_id, "delete")
    vm_id = image.vms[0] if image.vms else -1
    if image.type in (ImageType.OS, ImageType.DATABLOCK):
        await _remove_image_file(ctx, image)
    if image.type == ImageType.BACKUP:
        vm = ctx.state.vms.find(vm_id)
        if being_flattened(image):
            raise ActionError(f"Active backup on the associated VM {vm_id}: the oldest increments of image "
                              f"{image_id} are being merged; delete it when that is done")
        if vm is not None and vm.lcm_state in (LcmState.BACKUP, LcmState.BACKUP_POWEROFF):
            raise ActionError(f"Active backup on the associated VM {vm_id}: delete image {image_id} when it has ended")
        await _remove_backup_files(ctx, image, vm_id, force)
    await forget_image(ctx.state, vm_id, image_id)
    return image_id


async def _remove_image_file(ctx: Context, image: Image) -> None:
    """The file of an image in an image datastore, unless a VM's disk still is that file."""
    datastore = ctx.state.datastores.find(image.datastore_id)
    if datastore is None or not is_image_datastore(datastore) or not image.source or ctx.links is None:
        return
    users = [vm.id for vm in ctx.state.vms.all() if any(disk.get("SOURCE") == image.source
                                                        for disk in vm.template.vectors("DISK"))]
    if users:
        raise ActionError(f"Cannot delete image {image.id}: VM(s) {', '.join(map(str, users))} use its file "
                          f"{image.source}")
    host = bridge_host(ctx.state, datastore) or this_machine()
    await ctx.links.runner(host).run(["rm", "-f", "--", image.source], timeout=60)


async def _remove_backup_files(ctx: Context, image: Image, vm_id: int, force: bool) -> None:
    sources = image.sources
    datastore = ctx.state.datastores.find(image.datastore_id)
    if not sources or datastore is None or ctx.links is None:
        return
    try:
        await open_datastore(datastore, ctx.links.pool).rm(vm_id, sources)
    except NotFound:
        log.warning("backup image %s: its files were gone already", image.id)
    except (DriverError, ValidationError) as exc:
        if not force:
            raise ActionError(f"cannot remove the files of backup image {image.id}: {exc}; "
                              "delete with force to drop the record anyway") from exc
        log.warning("backup image %s: record removed by force, files left: %s", image.id, exc)


@registry.method("one.image.restore", Param("id", int), Param("ds_id", int), Param("options", str, ""))
async def restore(ctx: Context, caller: Caller, image_id: int, ds_id: int, options: str) -> str:
    """New images (and a VM template, unless DISK_ID) from a backup (spec §8.1-8.3):
    ``"<template_id> <image_id> ..."``. See scheduler.restore.to_images."""
    image = ctx.state.images.get(image_id)
    require(caller, image.ownership.uid, Right.USE, "IMAGE", image_id, "restore")
    datastore = ctx.state.datastores.get(ds_id)
    require(caller, datastore.ownership.uid, Right.USE, "DATASTORE", ds_id, "restore into")
    return await image_restore.restore(ctx, caller.ownership, image_id, ds_id, options)


@registry.method("one.imagepool.info", Param("filter", int, -2), Param("start", int, -1), Param("end", int, -1))
async def pool_info(ctx: Context, caller: Caller, pool_filter: int, start: int, end: int) -> str:
    return xml_string(pool_element(KIND, pool_slice(caller, ctx.state.images.all(), pool_filter, start, end)))
