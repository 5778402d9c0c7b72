"""OpenNebula's numeric codes (spec §1.6, the 7.0 XSD comments), with a strict parser for each.

Templates and API arguments give these either by name (``BACKUP_DS``) or by number (``3``);
``parse_code`` accepts both, plus the enum member itself, and refuses anything else with a message
that lists the valid codes.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TypeVar

from scheduler.errors import ValidationError


class VmState(IntEnum):
    """VM ``STATE``."""

    INIT = 0
    PENDING = 1
    HOLD = 2
    ACTIVE = 3
    STOPPED = 4
    SUSPENDED = 5
    DONE = 6
    POWEROFF = 8
    UNDEPLOYED = 9
    CLONING = 10
    CLONING_FAILURE = 11


class LcmState(IntEnum):
    """VM ``LCM_STATE`` (meaningful while ``STATE`` is ACTIVE; also the backup sub-states)."""

    LCM_INIT = 0
    PROLOG = 1
    BOOT = 2
    RUNNING = 3
    MIGRATE = 4
    SAVE_STOP = 5
    SAVE_SUSPEND = 6
    SAVE_MIGRATE = 7
    PROLOG_MIGRATE = 8
    PROLOG_RESUME = 9
    EPILOG_STOP = 10
    EPILOG = 11
    SHUTDOWN = 12
    CLEANUP_RESUBMIT = 15
    UNKNOWN = 16
    HOTPLUG = 17
    SHUTDOWN_POWEROFF = 18
    BOOT_UNKNOWN = 19
    BOOT_POWEROFF = 20
    BOOT_SUSPENDED = 21
    BOOT_STOPPED = 22
    CLEANUP_DELETE = 23
    HOTPLUG_SNAPSHOT = 24
    HOTPLUG_NIC = 25
    HOTPLUG_SAVEAS = 26
    HOTPLUG_SAVEAS_POWEROFF = 27
    HOTPLUG_SAVEAS_SUSPENDED = 28
    SHUTDOWN_UNDEPLOY = 29
    EPILOG_UNDEPLOY = 30
    PROLOG_UNDEPLOY = 31
    BOOT_UNDEPLOY = 32
    HOTPLUG_PROLOG_POWEROFF = 33
    HOTPLUG_EPILOG_POWEROFF = 34
    BOOT_MIGRATE = 35
    BOOT_FAILURE = 36
    BOOT_MIGRATE_FAILURE = 37
    PROLOG_MIGRATE_FAILURE = 38
    PROLOG_FAILURE = 39
    EPILOG_FAILURE = 40
    EPILOG_STOP_FAILURE = 41
    EPILOG_UNDEPLOY_FAILURE = 42
    PROLOG_MIGRATE_POWEROFF = 43
    PROLOG_MIGRATE_POWEROFF_FAILURE = 44
    PROLOG_MIGRATE_SUSPEND = 45
    PROLOG_MIGRATE_SUSPEND_FAILURE = 46
    BOOT_UNDEPLOY_FAILURE = 47
    BOOT_STOPPED_FAILURE = 48
    PROLOG_RESUME_FAILURE = 49
    PROLOG_UNDEPLOY_FAILURE = 50
    DISK_SNAPSHOT_POWEROFF = 51
    DISK_SNAPSHOT_REVERT_POWEROFF = 52
    DISK_SNAPSHOT_DELETE_POWEROFF = 53
    DISK_SNAPSHOT_SUSPENDED = 54
    DISK_SNAPSHOT_REVERT_SUSPENDED = 55
    DISK_SNAPSHOT_DELETE_SUSPENDED = 56
    DISK_SNAPSHOT = 57
    DISK_SNAPSHOT_DELETE = 59
    PROLOG_MIGRATE_UNKNOWN = 60
    PROLOG_MIGRATE_UNKNOWN_FAILURE = 61
    DISK_RESIZE = 62
    DISK_RESIZE_POWEROFF = 63
    DISK_RESIZE_UNDEPLOYED = 64
    HOTPLUG_NIC_POWEROFF = 65
    HOTPLUG_RESIZE = 66
    HOTPLUG_SAVEAS_UNDEPLOYED = 67
    HOTPLUG_SAVEAS_STOPPED = 68
    BACKUP = 69
    BACKUP_POWEROFF = 70
    RESTORE = 71


class HostState(IntEnum):
    """Host ``STATE`` (host.xsd)."""

    INIT = 0
    MONITORING_MONITORED = 1
    MONITORED = 2
    ERROR = 3
    DISABLED = 4
    MONITORING_ERROR = 5
    MONITORING_INIT = 6
    MONITORING_DISABLED = 7
    OFFLINE = 8


class DatastoreType(IntEnum):
    """Datastore ``TYPE``."""

    IMAGE_DS = 0
    SYSTEM_DS = 1
    FILE_DS = 2
    BACKUP_DS = 3


class DatastoreState(IntEnum):
    """Datastore ``STATE`` (datastore.xsd: 0 ready, 1 disabled)."""

    READY = 0
    DISABLED = 1


class ImageType(IntEnum):
    """Image ``TYPE``."""

    OS = 0
    CDROM = 1
    DATABLOCK = 2
    KERNEL = 3
    RAMDISK = 4
    CONTEXT = 5
    BACKUP = 6


class ImageState(IntEnum):
    """Image ``STATE`` (image.xsd)."""

    INIT = 0
    READY = 1
    USED = 2
    DISABLED = 3
    LOCKED = 4
    ERROR = 5
    CLONE = 6
    DELETE = 7
    USED_PERS = 8
    LOCKED_USED = 9
    LOCKED_USED_PERS = 10


class DiskType(IntEnum):
    """Image and datastore ``DISK_TYPE``."""

    FILE = 0
    CD_ROM = 1
    BLOCK = 2
    RBD = 3
    RBD_CDROM = 4


class HistoryAction(IntEnum):
    """The ``ACTION`` of a VM history record (vm.xsd comment, plus the backup actions of spec §1.5)."""

    NONE = 0
    MIGRATE = 1
    LIVE_MIGRATE = 2
    SHUTDOWN = 3
    SHUTDOWN_HARD = 4
    UNDEPLOY = 5
    UNDEPLOY_HARD = 6
    HOLD = 7
    RELEASE = 8
    STOP = 9
    SUSPEND = 10
    RESUME = 11
    BOOT = 12
    DELETE = 13
    DELETE_RECREATE = 14
    REBOOT = 15
    REBOOT_HARD = 16
    RESCHED = 17
    UNRESCHED = 18
    POWEROFF = 19
    POWEROFF_HARD = 20
    DISK_ATTACH = 21
    DISK_DETACH = 22
    NIC_ATTACH = 23
    NIC_DETACH = 24
    DISK_SNAPSHOT_CREATE = 25
    DISK_SNAPSHOT_DELETE = 26
    TERMINATE = 27
    TERMINATE_HARD = 28
    DISK_RESIZE = 29
    DEPLOY = 30
    CHOWN = 31
    CHMOD = 32
    UPDATECONF = 33
    RENAME = 34
    RESIZE = 35
    UPDATE = 36
    SNAPSHOT_CREATE = 37
    SNAPSHOT_DELETE = 38
    SNAPSHOT_REVERT = 39
    DISK_SAVEAS = 40
    DISK_SNAPSHOT_REVERT = 41
    RECOVER = 42
    RETRY = 43
    MONITOR = 44
    DISK_SNAPSHOT_RENAME = 45
    ALIAS_ATTACH = 46
    ALIAS_DETACH = 47
    BACKUP = 50
    BACKUP_CANCEL = 52
    RESTORE = 60


_LABELS: dict[type[IntEnum], str] = {
    VmState: "VM STATE",
    LcmState: "VM LCM_STATE",
    HostState: "host STATE",
    DatastoreType: "datastore TYPE",
    DatastoreState: "datastore STATE",
    ImageType: "image TYPE",
    ImageState: "image STATE",
    DiskType: "DISK_TYPE",
    HistoryAction: "history ACTION",
}

E = TypeVar("E", bound=IntEnum)


def parse_code(kind: type[E], value: object) -> E:
    """A member of ``kind`` from a member, an int, a decimal string or a name (any case)."""
    if isinstance(value, kind):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return _by_number(kind, value, value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return _by_number(kind, int(text), value)
        member = kind.__members__.get(text.upper())
        if member is not None:
            return member
    raise ValidationError(_bad(kind, value))


def _by_number(kind: type[E], number: int, shown: object) -> E:
    try:
        return kind(number)
    except ValueError:
        raise ValidationError(_bad(kind, shown)) from None


def _bad(kind: type[IntEnum], value: object) -> str:
    label = _LABELS.get(kind, kind.__name__)
    choices = ", ".join(f"{member.name} ({member.value})" for member in kind)
    return f"{label} {value!r} is not valid; expected one of: {choices}"
