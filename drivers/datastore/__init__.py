"""Backup datastore drivers, by the datastore's DS_MAD (``rsync``, ``fs``, ``restic``).

``open_datastore(datastore, pool)`` returns the driver object for one datastore; ``pool`` (an
:class:`drivers.ssh.SshPool`) gives the runner for the backup server when the driver needs one.
"""

from __future__ import annotations

from typing import Protocol

from drivers.datastore.base import BackupDatastore, Capacity, UploadRequest, UploadResult
from drivers.datastore.fs import FsDatastore
from drivers.datastore.restic import ResticDatastore, sftp_target
from drivers.datastore.rsync import RsyncDatastore, RunnerFactory, server_target
from drivers.ssh import SshTarget
from scheduler.errors import ValidationError
from scheduler.model.objects.datastore import Datastore

__all__ = ["BackupDatastore", "Capacity", "UploadRequest", "UploadResult", "DRIVERS", "open_datastore", "server_of"]


class DriverClass(Protocol):
    def connect(self, datastore: Datastore, pool: RunnerFactory, **settings: float) -> BackupDatastore: ...


DRIVERS: dict[str, DriverClass] = {"rsync": RsyncDatastore, "fs": FsDatastore, "restic": ResticDatastore}


def open_datastore(datastore: Datastore, pool: RunnerFactory, **settings: float) -> BackupDatastore:
    """The driver for ``datastore``'s DS_MAD; ``settings``: ``command_timeout``, ``progress_interval``."""
    driver = DRIVERS.get(datastore.ds_mad)
    if driver is None:
        raise ValidationError(f"datastore {datastore.id}: no backup driver for DS_MAD {datastore.ds_mad!r} "
                              f"(known: {', '.join(sorted(DRIVERS))})")
    return driver.connect(datastore, pool, **settings)


def server_of(datastore: Datastore) -> SshTarget | None:
    """The SSH server a backup datastore keeps its backups on (the hypervisor connects to it for uploads);
    None for ``fs`` (this machine)."""
    if datastore.ds_mad == "rsync":
        return server_target(datastore)
    if datastore.ds_mad == "restic":
        return sftp_target(datastore)
    return None
