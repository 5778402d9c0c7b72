"""``vmsched.image.verify(image_id, increment=-1)``: re-read a backup where it is stored and check it.

The files are read on the datastore's server (the backup server over the pooled SSH connection for
``rsync``, out of the repository by ``restic dump`` on the SFTP server for ``restic``, this machine for ``fs``): their sha256 against the image's ``TEMPLATE/CHECKSUMS``, and ``qemu-img
check`` of each disk file; for a chain, every link up to the increment (:mod:`scheduler.backup.verify` says what the answers mean). Nothing is restored.
The outcome is recorded on the image (``VERIFIED``, ``VERIFY_TIME``, ``VERIFY_MESSAGE``) and returned as
``{OK, MESSAGE, FILES: [{FILE, SHA256_OK, CHECK}]}``; a failed verification is a result, not an error.
"""

from __future__ import annotations

import logging
from typing import Any

from drivers.commands import HostUnreachable
from drivers.datastore import DRIVERS, open_datastore
from scheduler.api.context import Context
from scheduler.api.permissions import Caller, Right, require
from scheduler.api.registry import registry
from scheduler.api.rpc import Param
from scheduler.backup import urls as backup_urls
from scheduler.backup import verify as verification
from scheduler.errors import ActionError, DriverError, NotFound
from scheduler.model.objects.image import Image

log = logging.getLogger(__name__)

KIND = "image"
HASH_TIMEOUT = 6 * 3600.0  # seconds: reading a large disk file once on the server


@registry.method("vmsched.image.verify", Param("id", int), Param("increment", int, -1))
async def verify(ctx: Context, caller: Caller, image_id: int, increment: int) -> dict[str, Any]:
    image = ctx.state.images.get(image_id)
    require(caller, image.ownership.uid, Right.USE, "IMAGE", image_id, "verify")
    backup_urls.check_backup_image(image)
    chain = backup_urls.chain_up_to(backup_urls.image_chain(image), increment)
    datastore = ctx.state.datastores.get(image.datastore_id)
    if datastore.ds_mad not in DRIVERS:
        raise ActionError(f"verifying backups in a {datastore.ds_mad!r} datastore is not supported yet "
                          f"({', '.join(DRIVERS)} are)")
    if ctx.links is None:
        raise ActionError("this daemon has no host connections; backups cannot be verified")
    store = open_datastore(datastore, ctx.links.pool)
    if not image.increments:
        result = await check_backup(store, image, chain[0][1])
    else:  # every link the increment is made of, each against its own checksums
        result = verification.of_chain([(source, await check_backup(store, image, source, n)) for n, source in chain])
    await _record(ctx, image_id, result)
    log.info("image %s verified: %s", image_id, result.message)
    return result.to_struct()


async def check_backup(store: Any, image: Image, source: str, increment_id: int | None = None) -> verification.Verification:
    """Hash and check the files of backup ``source`` (increment ``increment_id`` of a chain) on the
    datastore's server."""
    vm_id = backup_urls.image_vm_id(image)
    recorded = backup_urls.checksums(image, increment_id)
    try:
        present = await store.list_backup(vm_id, source)
    except NotFound:
        present = []
    names = verification.files_to_read(recorded, present)
    disks = [name for name in names if verification.is_disk_file(name)]
    try:
        digests, checks = await store.verify_files(vm_id, source, names, disks, HASH_TIMEOUT)
    except HostUnreachable:
        raise  # says nothing about the backup
    except DriverError as exc:  # a timeout, or restic unable to read the data back
        return verification.Verification(False, f"verification failed: {exc}")
    return verification.verdict(image.id, recorded, present, digests, checks)


async def _record(ctx: Context, image_id: int, result: verification.Verification) -> None:
    async with ctx.state.mutation() as m:
        if ctx.state.images.find(image_id) is None:  # deleted while it was being read
            return
        image = ctx.state.images.editable(image_id)
        m.put(KIND, verification.recorded_on(image, result, ctx.now()))
