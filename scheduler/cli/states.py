"""State and type codes of OpenNebula objects, with the long and short names its CLI prints."""

from __future__ import annotations

VM_STATES = (
    "INIT", "PENDING", "HOLD", "ACTIVE", "STOPPED", "SUSPENDED", "DONE", "FAILED", "POWEROFF",
    "UNDEPLOYED", "CLONING", "CLONING_FAILURE",
)  # fmt: skip

VM_STATE_SHORT = {
    "INIT": "init", "PENDING": "pend", "HOLD": "hold", "ACTIVE": "actv", "STOPPED": "stop",
    "SUSPENDED": "susp", "DONE": "done", "FAILED": "fail", "POWEROFF": "poff", "UNDEPLOYED": "unde",
    "CLONING": "clon", "CLONING_FAILURE": "fail",
}  # fmt: skip

# Index = LCM_STATE code; None marks codes OpenNebula no longer uses.
LCM_STATES = (
    "LCM_INIT", "PROLOG", "BOOT", "RUNNING", "MIGRATE", "SAVE_STOP", "SAVE_SUSPEND", "SAVE_MIGRATE",
    "PROLOG_MIGRATE", "PROLOG_RESUME", "EPILOG_STOP", "EPILOG", "SHUTDOWN", None, None,
    "CLEANUP_RESUBMIT", "UNKNOWN", "HOTPLUG", "SHUTDOWN_POWEROFF", "BOOT_UNKNOWN", "BOOT_POWEROFF",
    "BOOT_SUSPENDED", "BOOT_STOPPED", "CLEANUP_DELETE", "HOTPLUG_SNAPSHOT", "HOTPLUG_NIC",
    "HOTPLUG_SAVEAS", "HOTPLUG_SAVEAS_POWEROFF", "HOTPLUG_SAVEAS_SUSPENDED", "SHUTDOWN_UNDEPLOY",
    "EPILOG_UNDEPLOY", "PROLOG_UNDEPLOY", "BOOT_UNDEPLOY", "HOTPLUG_PROLOG_POWEROFF",
    "HOTPLUG_EPILOG_POWEROFF", "BOOT_MIGRATE", "BOOT_FAILURE", "BOOT_MIGRATE_FAILURE",
    "PROLOG_MIGRATE_FAILURE", "PROLOG_FAILURE", "EPILOG_FAILURE", "EPILOG_STOP_FAILURE",
    "EPILOG_UNDEPLOY_FAILURE", "PROLOG_MIGRATE_POWEROFF", "PROLOG_MIGRATE_POWEROFF_FAILURE",
    "PROLOG_MIGRATE_SUSPEND", "PROLOG_MIGRATE_SUSPEND_FAILURE", "BOOT_UNDEPLOY_FAILURE",
    "BOOT_STOPPED_FAILURE", "PROLOG_RESUME_FAILURE", "PROLOG_UNDEPLOY_FAILURE", "DISK_SNAPSHOT_POWEROFF",
    "DISK_SNAPSHOT_REVERT_POWEROFF", "DISK_SNAPSHOT_DELETE_POWEROFF", "DISK_SNAPSHOT_SUSPENDED",
    "DISK_SNAPSHOT_REVERT_SUSPENDED", "DISK_SNAPSHOT_DELETE_SUSPENDED", "DISK_SNAPSHOT", None,
    "DISK_SNAPSHOT_DELETE", "PROLOG_MIGRATE_UNKNOWN", "PROLOG_MIGRATE_UNKNOWN_FAILURE", "DISK_RESIZE",
    "DISK_RESIZE_POWEROFF", "DISK_RESIZE_UNDEPLOYED", "HOTPLUG_NIC_POWEROFF", "HOTPLUG_RESIZE",
    "HOTPLUG_SAVEAS_UNDEPLOYED", "HOTPLUG_SAVEAS_STOPPED", "BACKUP", "BACKUP_POWEROFF", "RESTORE",
)  # fmt: skip

# The STAT column's short names: any *_FAILURE is "fail", otherwise the first matching prefix.
_LCM_SHORT_PREFIXES = (
    ("LCM_INIT", "init"), ("RUNNING", "runn"), ("UNKNOWN", "unkn"), ("CLEANUP", "clea"),
    ("BACKUP", "back"), ("RESTORE", "rest"), ("DISK_RESIZE", "drsz"), ("DISK_SNAPSHOT", "snap"),
    ("HOTPLUG_SNAPSHOT", "snap"), ("HOTPLUG", "hotp"), ("SAVE", "save"), ("BOOT", "boot"),
    ("PROLOG_MIGRATE", "migr"), ("PROLOG", "prol"), ("EPILOG", "epil"), ("SHUTDOWN", "shut"),
    ("MIGRATE", "migr"),
)  # fmt: skip

HOST_STATES = (
    "INIT", "MONITORING_MONITORED", "MONITORED", "ERROR", "DISABLED", "MONITORING_ERROR",
    "MONITORING_INIT", "MONITORING_DISABLED", "OFFLINE",
)  # fmt: skip
HOST_STATE_SHORT = ("init", "update", "on", "err", "dsbl", "retry", "init", "dsbl", "off")

DATASTORE_TYPES = ("IMAGE", "SYSTEM", "FILE", "BACKUP")
DATASTORE_TYPE_SHORT = ("img", "sys", "fil", "bck")
DATASTORE_STATES = ("READY", "DISABLED")
DATASTORE_STATE_SHORT = ("on", "off")

IMAGE_TYPES = ("OS", "CDROM", "DATABLOCK", "KERNEL", "RAMDISK", "CONTEXT", "BACKUP")
IMAGE_TYPE_SHORT = ("OS", "CD", "DB", "KL", "RD", "CX", "BK")
IMAGE_STATES = (
    "INIT", "READY", "USED", "DISABLED", "LOCKED", "ERROR", "CLONE", "DELETE", "USED_PERS",
    "LOCKED_USED", "LOCKED_USED_PERS",
)  # fmt: skip
IMAGE_STATE_SHORT = ("init", "rdy", "used", "disa", "lock", "err", "clon", "dele", "used", "lock", "lock")

VM_ACTIVE = 3


def name_of(names: tuple[str | None, ...], code: str | int) -> str:
    """``names[code]``, or the code itself when it is not a known one."""
    try:
        index = int(code)
    except (TypeError, ValueError):
        return str(code) or "-"
    name = names[index] if 0 <= index < len(names) else None
    return name if name is not None else str(code)


def lcm_short(name: str) -> str:
    if name.endswith("_FAILURE"):
        return "fail"
    for prefix, short in _LCM_SHORT_PREFIXES:
        if name.startswith(prefix):
            return short
    return name[:4].lower()


def vm_stat(state: str | int, lcm_state: str | int) -> str:
    """The STAT column: the LCM state's short name for ACTIVE VMs, the VM state's otherwise."""
    state_name = name_of(VM_STATES, state)
    if str(state) == str(VM_ACTIVE):
        return lcm_short(name_of(LCM_STATES, lcm_state))
    return VM_STATE_SHORT.get(state_name, state_name.lower())
