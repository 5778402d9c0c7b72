"""KEEP_LAST (spec §7.1): the oldest backup images beyond it are removed, files first, then records.
"""

from __future__ import annotations

import logging

from drivers.datastore import (
    open_datastore,
)
from scheduler.errors import NotFound
from scheduler.hosts.links import HostLinks
from scheduler.model import backup_config as backups
from scheduler.store.state import State

log = logging.getLogger(__name__)


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
    if image is not None and image.sources:
        datastore = state.datastores.get(image.datastore_id)
        try:
            await open_datastore(datastore, links.pool).rm(vm_id, image.sources)
        except NotFound:
            log.warning("VM %s: files of backup image %s were gone already", vm_id, image_id)
    await forget_image(state, vm_id, image_id)


async def forget_image(state: State, vm_id: int, image_id: int) -> None:
    """Remove an image record, from its datastore's IMAGES and from the VM's BACKUP_IDS (and its chain
    pointers when it held the VM's chain)."""
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
        chain = vm is not None and backups.incremental_backup_id(vm.backup_config) == image_id
        if vm is not None and (image_id in vm.backup_ids or chain):
            vm = state.vms.editable(vm_id)
            vm.backup_ids = backups.del_backup_id(vm.backup_ids, image_id)
            if chain:  # the chain went with its image: the next backup is a new base (spec §6.2)
                vm.backup_config = backups.reset_chain(vm.backup_config)
            m.put("vm", vm)
