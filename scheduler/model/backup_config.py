"""BACKUP_CONFIG and BACKUP_IDS semantics: parsing, defaults, increments, retention (spec §4.4, §6, §7.1, §10.5).

Pure functions over ``Vector`` values; nothing here reads or writes state. The VM object stores its
``BACKUP_CONFIG`` as a ``Vector`` and its ``BACKUP_IDS`` as a sorted ``list[int]``; every function
returns new values and leaves its arguments untouched.

A VM that was never configured stores an empty vector (``<BACKUP_CONFIG/>``); the accessors below read
missing keys as their defaults, so callers never need to special-case it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Literal

from scheduler.errors import ValidationError
from scheduler.model.template import Vector

Mode = Literal["FULL", "INCREMENT"]
FsFreeze = Literal["NONE", "AGENT", "SUSPEND"]
IncrementMode = Literal["CBT", "SNAPSHOT"]

# Keys the core maintains; a user's BACKUP_CONFIG can never set them (spec §10.5).
READ_ONLY_KEYS: frozenset[str] = frozenset(
    {
        "LAST_DATASTORE_ID",
        "LAST_BACKUP_ID",
        "LAST_BACKUP_SIZE",
        "LAST_BACKUP_FORMAT",
        "LAST_BRIDGE",
        "LAST_INCREMENT_ID",
        "INCREMENTAL_BACKUP_ID",
        "ACTIVE_FLATTEN",
        "BACKUP_JOB_ID",
    }
)
# The keys a user may set; any other key of a user's BACKUP_CONFIG is ignored.
USER_KEYS: tuple[str, ...] = ("KEEP_LAST", "BACKUP_VOLATILE", "FS_FREEZE", "MODE", "INCREMENT_MODE")

# Child order of VM/BACKUPS/BACKUP_CONFIG in the OpenNebula 7.0 vm.xsd (a closed xs:sequence: keys
# outside this list, such as ACTIVE_FLATTEN or LAST_BACKUP_FORMAT, do not validate).
BACKUP_CONFIG_ORDER: tuple[str, ...] = (
    "BACKUP_JOB_ID",
    "BACKUP_VOLATILE",
    "FS_FREEZE",
    "INCREMENTAL_BACKUP_ID",
    "INCREMENT_MODE",
    "KEEP_LAST",
    "LAST_BACKUP_ID",
    "LAST_BACKUP_SIZE",
    "LAST_BRIDGE",
    "LAST_DATASTORE_ID",
    "LAST_INCREMENT_ID",
    "MODE",
)

FS_FREEZE_MODES: tuple[FsFreeze, ...] = ("NONE", "AGENT", "SUSPEND")
NO_CHAIN = -1

REFUSED_SYSTEM_SNAPSHOTS = "VM cannot use backup increment mode, it has snapshots."
REFUSED_DISKS = "VM cannot use backup increment mode, it has disks snapshots or disks are not qcow2."

_INTEGER = re.compile(r"[+-]?[0-9]+")
_INT32_MAX = 2**31 - 1
# Disk TYPEs that are never part of a backup (spec §4.4); FS disks only with BACKUP_VOLATILE=YES.
_NEVER_BACKED_UP = frozenset({"SWAP", "CDROM", "RBD_CDROM"})


# ---- parsing a user's BACKUP_CONFIG (Backups::parse) ---------------------------------------------


def parse_backup_config(current: Vector, user: Vector | None, *, can_increment: bool, append: bool) -> Vector:
    """The VM's new BACKUP_CONFIG after applying ``user`` (spec §10.5, §6.2, §6.3).

    ``user`` is the BACKUP_CONFIG of the submitted template, ``None`` when it has none (then nothing
    changes). With ``append`` (merge) a key absent from ``user`` keeps its current value; without it,
    the key goes back to its default. Only ``USER_KEYS`` are read from ``user``.
    """
    config = current.copy()
    if user is None:
        return config
    _apply_keep_last(config, user, append)
    _apply_backup_volatile(config, user, append)
    _apply_fs_freeze(config, user, append)
    if can_increment:
        _apply_mode(config, user, append)
    else:
        _force_full(config)
    return config


def default_backup_config(*, can_increment: bool = False) -> Vector:
    """What a template with an empty ``BACKUP_CONFIG = [ ]`` stores on a fresh VM."""
    return parse_backup_config(Vector(), Vector(), can_increment=can_increment, append=False)


def _given(user: Vector, key: str) -> str | None:
    """A user value, or None when absent or empty (OpenNebula treats both as "not given")."""
    value = user.get(key)
    return value if value else None


def _apply_keep_last(config: Vector, user: Vector, append: bool) -> None:
    raw = _given(user, "KEEP_LAST")
    if raw is None:
        if not append:
            config.pop("KEEP_LAST")
        return
    config["KEEP_LAST"] = str(max(0, _parse_keep_last(raw)))


def _parse_keep_last(raw: str) -> int:
    text = raw.strip()
    if not _INTEGER.fullmatch(text):
        raise ValidationError(f"BACKUP_CONFIG/KEEP_LAST must be an integer, got {raw!r}")
    value = int(text)
    if value > _INT32_MAX:
        raise ValidationError(f"BACKUP_CONFIG/KEEP_LAST is out of range: {raw!r}")
    return value


def _apply_backup_volatile(config: Vector, user: Vector, append: bool) -> None:
    raw = _given(user, "BACKUP_VOLATILE")
    if raw is not None:
        config["BACKUP_VOLATILE"] = _yes_no(raw.upper() == "YES")
    elif not append:
        config["BACKUP_VOLATILE"] = "NO"


def _apply_fs_freeze(config: Vector, user: Vector, append: bool) -> None:
    raw = _given(user, "FS_FREEZE")
    if raw is not None:
        config["FS_FREEZE"] = _fs_freeze_value(raw)
    elif not append:
        config["FS_FREEZE"] = "NONE"


def _force_full(config: Vector) -> None:
    """A VM that cannot take increments: FULL, no chain, no INCREMENT_MODE (spec §6.2)."""
    _set_chain(config, NO_CHAIN, NO_CHAIN)
    config["MODE"] = "FULL"
    config.pop("INCREMENT_MODE")


def _apply_mode(config: Vector, user: Vector, append: bool) -> None:
    """MODE and INCREMENT_MODE for an increment-capable VM.

    As in OpenNebula, INCREMENT_MODE is only looked at when MODE is given (or in replace mode): a
    merge carrying INCREMENT_MODE alone leaves the stored one unchanged. A change of INCREMENT_MODE also
    starts a new chain (OpenNebula keeps the pointers and lets the driver fail over).
    """
    raw = _given(user, "MODE")
    if raw is None and append:
        return
    new_mode = _mode_value(raw or "")
    if new_mode != "INCREMENT" or mode(config) != "INCREMENT":
        _set_chain(config, NO_CHAIN, NO_CHAIN)
    config["MODE"] = new_mode
    raw_increment = _given(user, "INCREMENT_MODE")
    before = increment_mode(config)
    if raw_increment is not None:
        config["INCREMENT_MODE"] = _increment_mode_value(raw_increment)
    elif not append:
        config["INCREMENT_MODE"] = "CBT"
    if increment_mode(config) != before:  # a chain of checkpoints cannot go on with overlays, nor the reverse
        _set_chain(config, NO_CHAIN, NO_CHAIN)


# ---- reading a stored BACKUP_CONFIG ---------------------------------------------------------------


def mode(config: Vector) -> Mode:
    return _mode_value(config.get("MODE") or "")


def fs_freeze(config: Vector) -> FsFreeze:
    return _fs_freeze_value(config.get("FS_FREEZE") or "NONE")


def increment_mode(config: Vector) -> IncrementMode:
    return _increment_mode_value(config.get("INCREMENT_MODE") or "CBT")


def backup_volatile(config: Vector) -> bool:
    return (config.get("BACKUP_VOLATILE") or "").upper() == "YES"


def active_flatten(config: Vector) -> bool:
    return (config.get("ACTIVE_FLATTEN") or "").upper() == "YES"


def keep_last(config: Vector) -> int | None:
    """KEEP_LAST, or None when unset (keep everything). Stored negatives read as 0."""
    value = _stored_int(config, "KEEP_LAST")
    return None if value is None else max(0, value)


def incremental_backup_id(config: Vector) -> int:
    """Image holding the current increment chain; -1 when there is none."""
    value = _stored_int(config, "INCREMENTAL_BACKUP_ID")
    return NO_CHAIN if value is None else value


def last_increment_id(config: Vector) -> int:
    """Last increment of the chain; -1 means the next backup is a full base."""
    value = _stored_int(config, "LAST_INCREMENT_ID")
    return NO_CHAIN if value is None else value


def backup_job_id(config: Vector) -> int | None:
    return _stored_int(config, "BACKUP_JOB_ID")


def member_of_job(config: Vector) -> int | None:
    """The backup job the VM belongs to (which then schedules its backups), None when it is in none."""
    job = backup_job_id(config)
    return job if job is not None and job != -1 else None


def reset_chain(config: Vector) -> Vector:
    """A copy with both chain pointers at -1: the next INCREMENT backup starts a new image."""
    return with_chain(config, NO_CHAIN, NO_CHAIN)


def with_chain(config: Vector, image_id: int, increment_id: int) -> Vector:
    """A copy whose chain is image ``image_id`` ending at increment ``increment_id`` (spec §6.2)."""
    result = config.copy()
    _set_chain(result, image_id, increment_id)
    return result


def ordered_items(config: Vector) -> list[tuple[str, str]]:
    """Known keys in vm.xsd order, then any others sorted by name."""
    known = [(key, config[key]) for key in BACKUP_CONFIG_ORDER if key in config]
    others = [(key, value) for key, value in config.items() if key not in BACKUP_CONFIG_ORDER]
    return known + others


def _stored_int(config: Vector, key: str) -> int | None:
    """An integer attribute, None when absent or not an integer (as OpenNebula's failed get)."""
    raw = (config.get(key) or "").strip()
    return int(raw) if _INTEGER.fullmatch(raw) else None


def _mode_value(raw: str) -> Mode:
    return "INCREMENT" if raw.upper() == "INCREMENT" else "FULL"


def _fs_freeze_value(raw: str) -> FsFreeze:
    upper = raw.upper()
    for known in FS_FREEZE_MODES:
        if upper == known:
            return known
    return "NONE"


def _increment_mode_value(raw: str) -> IncrementMode:
    return "SNAPSHOT" if raw.upper() == "SNAPSHOT" else "CBT"


def _yes_no(flag: bool) -> str:
    return "YES" if flag else "NO"


def _set_chain(config: Vector, image_id: int, increment_id: int) -> None:
    config["INCREMENTAL_BACKUP_ID"] = str(image_id)
    config["LAST_INCREMENT_ID"] = str(increment_id)


# ---- disks: which are backed up, can the VM take increments ---------------------------------------


def backup_disk_ids(disks: Iterable[Vector], backup_volatile: bool) -> list[int]:
    """DISK_IDs a backup includes, ascending (spec §4.4)."""
    return sorted(_disk_id(disk) for disk in disks if _is_backed_up(disk, backup_volatile))


def increment_refusal(
    disks: Iterable[Vector],
    has_system_snapshots: bool,
    backup_volatile: bool,
    *,
    snapshot_disk_ids: Collection[int] = (),
) -> str | None:
    """Why the VM cannot use INCREMENT mode, or None when it can (spec §6.1, 7.0 rules).

    ``snapshot_disk_ids`` lists the disks that have disk snapshots (the VM's ``SNAPSHOTS/DISK_ID``).
    Only disks a backup would include are checked, so CDROMs never block increments.
    """
    if has_system_snapshots:
        return REFUSED_SYSTEM_SNAPSHOTS
    snapshotted = frozenset(snapshot_disk_ids)
    for disk in disks:
        if _is_backed_up(disk, backup_volatile) and not _disk_takes_increments(disk, snapshotted):
            return REFUSED_DISKS
    return None


def can_increment(
    disks: Iterable[Vector],
    has_system_snapshots: bool,
    backup_volatile: bool,
    *,
    snapshot_disk_ids: Collection[int] = (),
) -> bool:
    return increment_refusal(disks, has_system_snapshots, backup_volatile, snapshot_disk_ids=snapshot_disk_ids) is None


def _disk_type(disk: Vector) -> str:
    return (disk.get("TYPE") or "").upper()


def _is_backed_up(disk: Vector, backup_volatile: bool) -> bool:
    kind = _disk_type(disk)
    if kind in _NEVER_BACKED_UP:
        return False
    return kind != "FS" or backup_volatile


def _disk_takes_increments(disk: Vector, snapshotted: frozenset[int]) -> bool:
    if _disk_type(disk) == "RBD":  # Ceph increments use rbd snapshots (7.0)
        return True
    return (disk.get("FORMAT") or "").upper() == "QCOW2" and _disk_id(disk) not in snapshotted


def _disk_id(disk: Vector) -> int:
    raw = (disk.get("DISK_ID") or "").strip()
    if not _INTEGER.fullmatch(raw):
        raise ValidationError(f"DISK without a valid DISK_ID: {raw!r}")
    return int(raw)


# ---- BACKUP_IDS and KEEP_LAST (spec §7.1) ---------------------------------------------------------


def add_backup_id(ids: Iterable[int], new: int) -> list[int]:
    return sorted({*ids, new})


def del_backup_id(ids: Iterable[int], old: int) -> list[int]:
    return sorted(set(ids) - {old})


def remove_last(backup_ids: Iterable[int], keep_last: int | None) -> list[int]:
    """Image ids to delete so that at most ``keep_last`` remain: the lowest (oldest) first.

    ``None`` or ``0`` keeps everything; a negative value counts as 0.
    """
    if not keep_last or keep_last < 0:
        return []
    ids = sorted(set(backup_ids))
    return ids[: max(0, len(ids) - keep_last)]
