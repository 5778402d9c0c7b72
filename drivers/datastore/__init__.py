"""Backup datastore drivers, by the datastore's DS_MAD (``rsync``, ``fs``, ``restic``).

``open_datastore(datastore, pool)`` returns the driver object for one datastore; ``pool`` (an
:class:`drivers.ssh.SshPool`) gives the runner for the backup server when the driver needs one. The
registry also answers what each kind needs without opening one: the tools a backup runs on the
hypervisor, the attributes a new datastore must have, where its server is, the path a backup URL names,
and what a killed command of a run leaves behind. A new driver is its own module plus one line here.
"""

from __future__ import annotations

from typing import Protocol

from drivers.commands import Runner
from drivers.datastore.base import (
    BackupDatastore,
    Capacity,
    FetchRequest,
    FlattenRequest,
    UploadRequest,
    UploadResult,
    run_label,
)
from drivers.datastore.fs import FsDatastore
from drivers.datastore.restic import ResticDatastore, sftp_target
from drivers.datastore.rsync import RsyncDatastore, RunnerFactory, server_target
from drivers.sshtarget import SshTarget
from scheduler.errors import ValidationError
from scheduler.model.objects.datastore import Datastore
from scheduler.model.template import Template

__all__ = [
    "DRIVERS", "BackupDatastore", "shared_upload_connection", "Capacity", "FetchRequest", "FlattenRequest", "check_backup_template", "check_ports", "server_attributes", "UploadRequest", "UploadResult", "driver_of",
    "all_hypervisor_tools", "hypervisor_tools", "open_datastore", "remove_leftovers", "run_label", "server_of", "url_path",
]  # fmt: skip


class DriverClass(Protocol):
    """What the registry asks of a driver's class."""

    @property
    def HYPERVISOR_TOOLS(self) -> tuple[str, ...]: ...  # the class constants
    @property
    def REQUIRED_ATTRIBUTES(self) -> tuple[str, ...]: ...
    @property
    def PORT_ATTRIBUTES(self) -> tuple[str, ...]: ...
    @property
    def SERVER_ATTRIBUTES(self) -> tuple[str, ...]: ...
    @property
    def SHARED_UPLOAD_CONNECTION(self) -> bool: ...

    def connect(self, datastore: Datastore, pool: RunnerFactory, **settings: float) -> BackupDatastore: ...

    def url_path(self, datastore: Datastore, vm_id: int, backup_id: str, name: str) -> str: ...

    async def remove_leftovers(self, runner: Runner, label: str, timeout: float) -> None: ...  # noqa: ASYNC109


DRIVERS: dict[str, DriverClass] = {"fs": FsDatastore, "rsync": RsyncDatastore, "restic": ResticDatastore}


def check_backup_template(template: Template) -> None:
    """A BACKUP_DS template: a DS_MAD vmsched has a driver for, with the attributes that driver cannot work
    without (OpenNebula's DS_MAD_CONF REQUIRED_ATTRS, spec §3.4)."""
    ds_mad = template.get("DS_MAD", "") or ""
    driver = DRIVERS.get(ds_mad)
    if driver is None:
        raise ValidationError(f"DS_MAD of a BACKUP_DS must be one of {', '.join(DRIVERS)}, got {ds_mad!r}")
    for key in driver.REQUIRED_ATTRIBUTES:
        if not template.get(key):
            raise ValidationError(f"datastore driver {ds_mad} needs the attribute {key}")


def server_attributes() -> tuple[str, ...]:
    """Every template attribute that says where some driver's backup server is."""
    return tuple(dict.fromkeys(key for driver in DRIVERS.values() for key in driver.SERVER_ATTRIBUTES))


def check_ports(template: Template) -> None:
    """Every driver's port attribute that is set holds a TCP port."""
    for key in dict.fromkeys(key for driver in DRIVERS.values() for key in driver.PORT_ATTRIBUTES):
        port = template.get(key)
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValidationError(f"{key} must be a TCP port (1-65535), got {port!r}")


def driver_of(datastore: Datastore) -> DriverClass:
    driver = DRIVERS.get(datastore.ds_mad)
    if driver is None:
        raise ValidationError(f"datastore {datastore.id}: no backup driver for DS_MAD {datastore.ds_mad!r} "
                              f"(known: {', '.join(sorted(DRIVERS))})")
    return driver


def open_datastore(datastore: Datastore, pool: RunnerFactory, **settings: float) -> BackupDatastore:
    """The driver for ``datastore``'s DS_MAD; ``settings``: ``command_timeout``, ``progress_interval``."""
    return driver_of(datastore).connect(datastore, pool, **settings)


def hypervisor_tools(datastore: Datastore) -> tuple[str, ...]:
    """The commands a backup into ``datastore`` runs on the hypervisor."""
    return driver_of(datastore).HYPERVISOR_TOOLS


def shared_upload_connection(datastore: Datastore) -> bool:
    """Whether uploads into ``datastore`` from one hypervisor may share one ssh connection to its server."""
    return driver_of(datastore).SHARED_UPLOAD_CONNECTION


def all_hypervisor_tools() -> tuple[str, ...]:
    """What a backup into any kind of datastore may run on a hypervisor (what host monitoring looks for)."""
    return tuple(dict.fromkeys(tool for driver in DRIVERS.values() for tool in driver.HYPERVISOR_TOOLS))


def url_path(datastore: Datastore, vm_id: int, backup_id: str, name: str) -> str:
    """The path a backup URL names for file ``name`` of backup ``backup_id`` of VM ``vm_id``."""
    return driver_of(datastore).url_path(datastore, vm_id, backup_id, name)


async def remove_leftovers(runner: Runner, label: str, timeout: float) -> None:  # noqa: ASYNC109
    """What killed datastore commands of the run ``label`` (see ``run_label``) left on the machine of
    ``runner``; every driver is asked, since the datastore of the run may not be known any more."""
    for driver in DRIVERS.values():
        await driver.remove_leftovers(runner, label, timeout)


def server_of(datastore: Datastore) -> SshTarget | None:
    """The SSH server a backup datastore keeps its backups on (the hypervisor connects to it for uploads);
    None for ``fs`` (this machine)."""
    if datastore.ds_mad == "rsync":
        return server_target(datastore)
    if datastore.ds_mad == "restic":
        return sftp_target(datastore)
    return None
