"""The pure checks and choices of a backup: its target datastore, the VM's state, the disks and the room
they need, the tools on the host, the disk sources and the BACKUP image record (spec §4, §7.1).

One copy, used by the API (``one.vm.backup``), the scheduled action and the run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from drivers import tm
from drivers.datastore import (
    Capacity,
    UploadResult,
    hypervisor_tools,
)
from drivers.tm import rbdplan
from drivers.tm.rbdplan import RbdAccess, RbdSource
from drivers.vmm.domainxml import Disk
from scheduler.backup.urls import url_vectors
from scheduler.errors import ActionError, ValidationError
from scheduler.hosts.monitor import tool_key
from scheduler.model import backup_config as backups
from scheduler.model.objects.common import BACKUP_IMAGE_PERMISSIONS
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.image import Image
from scheduler.model.objects.states import DatastoreType, ImageState, ImageType, LcmState, VmState
from scheduler.model.objects.vm import Vm
from scheduler.model.template import Vector
from scheduler.store.state import State

log = logging.getLogger(__name__)


# ---- pure checks and choices ------------------------------------------------------------------------


def target_datastore(state: State, ds_id: int) -> Datastore:
    datastore = state.datastores.find(ds_id)
    if datastore is None:
        raise ValidationError(f"Error getting datastore [{ds_id}].")
    if datastore.type != DatastoreType.BACKUP_DS:
        raise ValidationError("Datastore needs to be of type BACKUP")
    return datastore


def state_name(vm: Vm) -> str:
    """OpenNebula's state string: the LCM state of an ACTIVE VM, the VM state otherwise."""
    return vm.lcm_state.name if vm.state == VmState.ACTIVE else vm.state.name


def backup_state(vm: Vm) -> LcmState:
    """BACKUP for a running VM, BACKUP_POWEROFF for a powered-off one (spec §4.2); else the error."""
    if vm.host is None:
        raise ActionError(f"VM {vm.id} is not bound to a host (import it or deploy it first): nothing to back up",
                          retryable=True)
    if (vm.state, vm.lcm_state) == (VmState.ACTIVE, LcmState.RUNNING):
        return LcmState.BACKUP
    if vm.state == VmState.POWEROFF:
        return LcmState.BACKUP_POWEROFF
    raise ActionError(f"Could not create a new backup for VM {vm.id}, wrong state {state_name(vm)}.", retryable=True)


def selected_disks(vm: Vm) -> list[Vector]:
    """The DISK vectors a backup includes (spec §4.4); an error when there are none."""
    disks = vm.template.vectors("DISK")
    ids = set(backups.backup_disk_ids(disks, backups.backup_volatile(vm.backup_config)))
    chosen = [disk for disk in disks if int(disk.get("DISK_ID") or -1) in ids]
    if not chosen:
        raise ActionError(f"VM {vm.id} has no disk to back up (CDROM, swap and volatile disks are not backed up)")
    return chosen


def reservation_mb(disks: Sequence[Vector]) -> int:
    return sum(int(d["SIZE"]) for d in disks if (d.get("SIZE") or "").strip().isdigit())


def capacity_check_on(datastore: Datastore, default: bool) -> bool:
    value = (datastore.template.get("DATASTORE_CAPACITY_CHECK") or "").strip().upper()
    return default if value not in ("YES", "NO") else value == "YES"


def check_space(capacity: Capacity, needed_mb: int) -> None:
    if capacity.free_mb < needed_mb:
        raise ActionError("Not enough free space on target datastore")


def disk_sources(vm: Vm, disks: Sequence[Vector], current: Sequence[Disk],
                 host: Any = None) -> tuple[list[tm.DiskSource], list[RbdSource]]:
    """What the domain runs each selected disk on now (matched by TARGET): a file, or an RBD image reached
    as the disk's CEPH_USER / CEPH_KEY / CEPH_CONF / CEPH_HOST say (else the host's, else libvirt's)."""
    by_target = {d.target: d for d in current}
    files, rbd = [], []
    for disk in disks:
        target = disk.get("TARGET") or ""
        now = by_target.get(target)
        disk_id = int(disk["DISK_ID"])
        if now is not None and now.type == "network" and now.protocol == "rbd":
            try:
                rbd.append(rbdplan.rbd_source(now, disk_id, ceph_access(disk, host)))
            except ValidationError as exc:
                raise ActionError(f"VM {vm.id}: disk {disk_id} ({target}): {exc}") from exc
            continue
        if now is None or now.type != "file" or not now.path:
            raise ActionError(f"VM {vm.id}: disk {disk_id} ({target or 'no TARGET'}) is not a file or RBD disk "
                              "of the domain; only file disks (qcow2, raw) and Ceph RBD disks are backed up")
        files.append(tm.DiskSource(disk_id, target, now.path, now.format or "raw"))
    return files, rbd


def ceph_access(disk: Vector, host: Any = None) -> RbdAccess:
    """How the hypervisor reaches a disk's cluster: the DISK's CEPH_* attributes, else the host's."""
    def value(key: str) -> str:
        own = (disk.get(key) or "").strip()
        return own or ((host.template.get(key) or "").strip() if host is not None else "")

    return rbdplan.access_from({key: value(key) for key in rbdplan.CEPH_KEYS})


def image_name(vm_id: int, when: float, tz: ZoneInfo) -> str:
    """``"<vm_id> <dd-Mon HH.MM.SS>"`` (spec §7.2), in the configured time zone."""
    return f"{vm_id} {datetime.fromtimestamp(when, tz).strftime('%d-%b %H.%M.%S')}"


def backup_image(image_id: int, vm: Vm, datastore: Datastore, backup_id: str, upload: UploadResult,
                 disk_ids: Sequence[int], now: float, tz: ZoneInfo,
                 virtual_sizes: Mapping[str, int] | None = None) -> Image:
    """The BACKUP image of one full backup (spec §7.2); each file's sha256 in TEMPLATE/CHECKSUMS, with a disk
    file's VIRTUAL_SIZE (bytes) from ``virtual_sizes`` (a restore of one disk then needs no vm.xml)."""
    image = Image(
        id=image_id, name=image_name(vm.id, now, tz), ownership=vm.ownership, permissions=BACKUP_IMAGE_PERMISSIONS,
        type=ImageType.BACKUP, regtime=int(now), modtime=int(now), source=backup_id, format="raw",
        size=upload.size_mb, state=ImageState.READY, prev_state=ImageState.READY, datastore_id=datastore.id,
        datastore=datastore.name, vms=[vm.id], backup_disk_ids=list(disk_ids),
    )  # fmt: skip
    for name, digest in sorted(upload.sha256.items()):
        size = (virtual_sizes or {}).get(name)
        image.template.add("CHECKSUMS", Vector([("FILE", name), ("SHA256", digest),
                                                *([("VIRTUAL_SIZE", str(size))] if size is not None else [])]))
    for vector in url_vectors(image, datastore):
        image.template.add("BACKUP_URL", vector)
    return image


def check_tools(host: Any, datastore: Datastore) -> None:
    """A host whose monitoring found a needed tool missing (``TOOL_<NAME> = NO``) cannot run the backup:
    say which and where, before anything starts. A host not monitored yet is not judged."""
    missing = [tool for tool in hypervisor_tools(datastore)
               if (host.template.get(tool_key(tool)) or "").upper() == "NO"]
    if missing:
        raise ActionError(f"host {host.name} has no {' and no '.join(missing)} (found by its monitoring): install "
                          f"{'them' if len(missing) > 1 else 'it'} there to back up into {datastore.ds_mad} "
                          f"datastore {datastore.id}")
