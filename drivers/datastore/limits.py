"""How hard a backup may push the machines: the ``<DS_MAD>_NICE``, ``<DS_MAD>_IONICE`` and
``<DS_MAD>_BWLIMIT`` attributes of a datastore (spec §11), one reading for every driver.

The limits hold for the datastore's own transfers and for the heavy commands a backup into it runs on
the hypervisor (``qemu-img convert``), so that a backup is throttled end to end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from drivers.datastore.base import int_attribute
from scheduler.errors import ValidationError
from scheduler.model.objects.datastore import Datastore

BWLIMIT = re.compile(r"[0-9]+(\.[0-9]+)?[KkMmGg]?\Z")  # rsync's --bwlimit syntax
_UNITS = {"": 1024, "K": 1024, "M": 1024**2, "G": 1024**3}


@dataclass(frozen=True)
class IoLimits:
    nice: int | None  # of the heavy commands; None: inherited
    ionice: int | None  # best-effort class level 0-7; None: inherited
    rate: int  # bytes/s per transfer; 0: unlimited


def checked_bwlimit(datastore: Datastore, prefix: str) -> str:
    """``<prefix>_BWLIMIT`` as written ("" when unset), refused unless it reads like 500 or 10M."""
    value = (datastore.template.get(f"{prefix}_BWLIMIT") or "").strip()
    if value and not BWLIMIT.match(value):
        raise ValidationError(f"datastore {datastore.id}: {prefix}_BWLIMIT must be a rate like 500 or 10M, "
                              f"got {value!r}")
    return value


def bwlimit_bytes(datastore: Datastore, prefix: str) -> int:
    """``<prefix>_BWLIMIT`` in bytes per second (rsync's units: a bare number is KiB/s), 0 when unset."""
    value = checked_bwlimit(datastore, prefix)
    if not value:
        return 0
    number, unit = (value[:-1], value[-1].upper()) if value[-1].isalpha() else (value, "")
    return max(1, int(float(number) * _UNITS[unit]))


def priority(datastore: Datastore, prefix: str) -> tuple[int | None, int | None]:
    """``<prefix>_NICE`` and ``<prefix>_IONICE`` (spec §11)."""
    return (int_attribute(datastore, f"{prefix}_NICE", -20, 19), int_attribute(datastore, f"{prefix}_IONICE", 0, 7))


def io_limits(datastore: Datastore) -> IoLimits:
    """The limits of a backup into (or a restore from) ``datastore``, read from its DS_MAD's attributes."""
    prefix = datastore.ds_mad.upper()
    nice, ionice = priority(datastore, prefix)
    return IoLimits(nice, ionice, bwlimit_bytes(datastore, prefix))


__all__ = ["BWLIMIT", "IoLimits", "bwlimit_bytes", "checked_bwlimit", "io_limits", "priority"]
