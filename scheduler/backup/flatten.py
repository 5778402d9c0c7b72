"""KEEP_LAST for increment chains (spec §6.5): the oldest links merged into a new base, so that exactly
K restore points remain.

After an increment is recorded and the chain holds more than K links, the oldest ``n - K + 1`` are merged on
the datastore's server into a NEW backup (the links themselves are not touched while that runs). One
transaction then makes it the chain's base and drops the older links from the image; only after that are
their backups removed. So at every moment each recorded increment's parent exists.

While it runs the VM carries ``ACTIVE_FLATTEN = YES`` (no backup of it starts) and the image is LOCKED (no
restore, no delete). The image keeps what is under way in ``TEMPLATE/FLATTEN``: ``NEW`` (the merged backup,
removed again when it was not recorded) and then ``DROP`` (the old links' backups, removed once nothing
records them); :func:`recover` finishes that at start-up after a crash. A failed merge changes nothing but
``TEMPLATE/ERROR`` on the image; the next increment tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from drivers.commands import shielded
from drivers.datastore import BackupDatastore, FlattenRequest, open_datastore
from scheduler.backup.chain import FLATTEN, flatten_cut, flattened
from scheduler.errors import NotFound
from scheduler.faults import crash_point
from scheduler.hosts.links import HostLinks
from scheduler.model import backup_config as backups
from scheduler.model.objects.states import ImageState
from scheduler.model.template import Vector
from scheduler.store.state import State

log = logging.getLogger(__name__)

ACTIVE_FLATTEN = "ACTIVE_FLATTEN"
FLATTEN_TIMEOUT = 6 * 3600.0


async def keep_last_links(state: State, links: HostLinks, vm_id: int, image_id: int, keep_last: int | None,
                          now: float, timeout: float = FLATTEN_TIMEOUT) -> str:  # noqa: ASYNC109
    """Flatten chain image ``image_id`` down to ``keep_last`` links; what was done, for the run's message
    ("" when nothing was to do). Errors are logged and kept on the image, never raised."""
    image = state.images.get(image_id)
    merged = flatten_cut(image, keep_last)
    if not merged:
        return ""
    log.info("VM %s: Removing %d backup increments of image %s (KEEP_LAST %s)", vm_id, len(merged) - 1, image_id,
             keep_last)
    store = open_datastore(state.datastores.get(image.datastore_id), links.pool)
    try:
        backup_id = await store.new_backup_id(vm_id)
        await _begin(state, vm_id, image_id, backup_id)
        try:
            result = await store.flatten(FlattenRequest(vm_id, merged, image.backup_disk_ids, backup_id, timeout))
            crash_point("flatten-merged")
            await _switch(state, vm_id, image_id, merged, backup_id, result.size_mb, result.sha256, now)
            crash_point("flatten-switched")
        except BaseException:
            await shielded(_undo(state, store, vm_id, image_id, backup_id))
            raise
    except Exception as exc:  # noqa: BLE001 - OpenNebula only records flatten errors on the image
        log.error("VM %s: cannot merge the oldest increments of image %s: %s", vm_id, image_id, exc)
        await _note_error(state, image_id, f"flatten failed: {exc}")
        return f"; merging its oldest increments failed: {exc}"
    await _drop(state, store, vm_id, image_id)
    return f"; KEEP_LAST merged increments {merged[0][0]}-{merged[-1][0]} into a new base"


async def recover(state: State, links: HostLinks) -> list[int]:
    """At start-up: finish or undo each flatten a crash interrupted; the images handled."""
    done = []
    for image in state.images.all():
        pending = image.template.get_vector(FLATTEN)
        if pending is None or not image.vms:
            continue
        vm_id = image.vms[0]
        try:
            store = open_datastore(state.datastores.get(image.datastore_id), links.pool)
            new = pending.get("NEW") or ""
            if new and new not in image.sources:
                await _rm(store, vm_id, [new])
                log.warning("image %s: the merged backup %s of an interrupted flatten was not recorded: removed",
                            image.id, new)
            await _drop(state, store, vm_id, image.id)
            done.append(image.id)
        except Exception as exc:  # noqa: BLE001 - one image's trouble must not stop the daemon
            log.error("image %s: cannot finish an interrupted flatten: %s (tried again at the next start)",
                      image.id, exc)
    return done


async def _begin(state: State, vm_id: int, image_id: int, backup_id: str) -> None:
    async with state.mutation() as m:
        vm = state.vms.editable(vm_id)
        vm.backup_config = _flag(vm.backup_config, True)
        image = state.images.editable(image_id)
        image.template.set(FLATTEN, Vector([("NEW", backup_id)]))
        image.prev_state, image.state = image.state, ImageState.LOCKED
        m.put("vm", vm)
        m.put("image", image)


async def _switch(state: State, vm_id: int, image_id: int, merged: Sequence[tuple[int, str]], backup_id: str,
                  size_mb: int, sha256: dict[str, str], now: float) -> None:
    """One transaction: the merged backup is the chain's base; the merged links' backups are to go."""
    async with state.mutation() as m:
        chain = state.images.get(image_id)
        image = flattened(chain, state.datastores.get(chain.datastore_id), merged, backup_id, size_mb, sha256, now)
        image.template.set(FLATTEN, Vector([("DROP", " ".join(source for _, source in merged))]))
        image.template.remove("ERROR")
        image.state = ImageState.READY
        m.put("image", image)
        vm = state.vms.find(vm_id)
        if vm is not None:
            vm = state.vms.editable(vm_id)
            vm.backup_config = _flag(vm.backup_config, False)
            m.put("vm", vm)


async def _undo(state: State, store: BackupDatastore, vm_id: int, image_id: int, backup_id: str) -> None:
    try:
        await _rm(store, vm_id, [backup_id])
    finally:
        await _end(state, vm_id, image_id)


async def _drop(state: State, store: BackupDatastore, vm_id: int, image_id: int) -> None:
    """Remove the backups a flatten left to drop (unless an image records them), then end it."""
    image = state.images.find(image_id)
    pending = None if image is None else image.template.get_vector(FLATTEN)
    drop = (pending.get("DROP") or "").split() if pending is not None else []
    recorded = {source for other in state.images.all() for source in other.sources}
    doomed = [source for source in drop if source not in recorded]
    if doomed:
        await _rm(store, vm_id, doomed)
    await _end(state, vm_id, image_id)


async def _rm(store: BackupDatastore, vm_id: int, sources: list[str]) -> None:
    try:
        await store.rm(vm_id, sources)
    except NotFound:
        pass  # gone already


async def _end(state: State, vm_id: int, image_id: int) -> None:
    async with state.mutation() as m:
        image = state.images.find(image_id)
        if image is not None and (FLATTEN in image.template or image.state == ImageState.LOCKED):
            image = state.images.editable(image_id)
            image.template.remove(FLATTEN)
            image.state = ImageState.READY
            m.put("image", image)
        vm = state.vms.find(vm_id)
        if vm is not None and backups.active_flatten(vm.backup_config):
            vm = state.vms.editable(vm_id)
            vm.backup_config = _flag(vm.backup_config, False)
            m.put("vm", vm)


async def _note_error(state: State, image_id: int, message: str) -> None:
    async with state.mutation() as m:
        image = state.images.find(image_id)
        if image is not None:
            image = state.images.editable(image_id)
            image.template.set("ERROR", message[:1000])
            m.put("image", image)


def _flag(config: Vector, on: bool) -> Vector:
    result = config.copy()
    if on:
        result[ACTIVE_FLATTEN] = "YES"
    else:
        result.pop(ACTIVE_FLATTEN)
    return result
