"""Changed-block tracking on libvirt (pure parts): vmsched's checkpoint names, the checkpoint and push-mode
backup XML, and the persistent dirty bitmaps ``qemu-img info`` reports in a qcow2 file.

A checkpoint of an increment is ``vmsched-<vm_id>-<increment_id>``: one persistent bitmap of that name in
every qcow2 disk that is backed up. The backup job of increment ``n`` copies what changed since checkpoint
``n-1`` (all of the disk for the base) into one qcow2 target per disk and, atomically with its start,
creates checkpoint ``n``. Checkpoints whose names are not vmsched's are never touched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lxml import etree

from drivers.vmm.domainxml import Disk, disk_by_target
from scheduler.errors import ValidationError

PREFIX = "vmsched-"
_NAME = re.compile(r"vmsched-(\d+)-(\d+)\Z")


def checkpoint_name(vm_id: int, increment_id: int) -> str:
    if vm_id < 0 or increment_id < 0:
        raise ValidationError(f"no checkpoint for VM {vm_id}, increment {increment_id}")
    return f"{PREFIX}{vm_id}-{increment_id}"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """(VM id, increment id) of one of vmsched's checkpoints; None for any other name."""
    match = _NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _check_targets(disks: Sequence[Disk], targets: Iterable[str]) -> None:
    for target in targets:
        disk = disk_by_target(disks, target)
        if disk.type != "file" or disk.format != "qcow2" or not disk.writable_disk:
            raise ValidationError(f"disk {target!r} is not a writable qcow2 file disk: it cannot carry a dirty "
                                  f"bitmap ({disk.type}, {disk.format or 'no format'})")


def checkpoint_xml(name: str, disks: Sequence[Disk], tracked: Iterable[str]) -> str:
    """A ``<domaincheckpoint>`` with a persistent bitmap in each ``tracked`` disk; every other disk of the
    domain is listed with ``checkpoint='no'`` (a raw disk cannot carry one)."""
    tracked = set(tracked)
    _check_targets(disks, tracked)
    root = etree.Element("domaincheckpoint")
    etree.SubElement(root, "name").text = name
    element = etree.SubElement(root, "disks")
    for disk in disks:
        if disk.device == "disk" or disk.target in tracked:
            etree.SubElement(element, "disk", name=disk.target, checkpoint="bitmap" if disk.target in tracked else "no")
    return etree.tostring(root, encoding="unicode")


def backup_xml(disks: Sequence[Disk], targets: Mapping[str, str], incremental: str | None) -> str:
    """A push-mode ``<domainbackup>``: each disk in ``targets`` (disk target -> qcow2 file to write, which
    must not exist) gets what changed since checkpoint ``incremental`` (None: the whole disk); every other
    disk is left out."""
    _check_targets(disks, targets)
    root = etree.Element("domainbackup", mode="push")
    if incremental is not None:
        etree.SubElement(root, "incremental").text = incremental
    element = etree.SubElement(root, "disks")
    for disk in disks:
        if disk.target in targets:
            entry = etree.SubElement(element, "disk", name=disk.target, backup="yes", type="file")
            etree.SubElement(entry, "target", file=targets[disk.target])
            etree.SubElement(entry, "driver", type="qcow2")
        elif disk.device == "disk":
            etree.SubElement(element, "disk", name=disk.target, backup="no")
    return etree.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class Bitmap:
    """A persistent dirty bitmap of a qcow2 file, as ``qemu-img info`` reports it."""

    name: str
    granularity: int  # bytes per bit
    flags: tuple[str, ...]  # "auto" (tracking), "in-use" (not closed cleanly), ...

    @property
    def sound(self) -> bool:
        """Usable as the base of an increment: closed cleanly, not marked inconsistent, still recording."""
        return not {"in-use", "inconsistent", "not-recording"} & set(self.flags)


def parse_bitmaps(info_json: bytes | str) -> list[Bitmap]:
    """The bitmaps of ``qemu-img info --output=json`` of one qcow2 file (none for other formats)."""
    try:
        info = json.loads(info_json)
        found = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        return [Bitmap(str(b["name"]), int(b["granularity"]), tuple(str(f) for f in b.get("flags", ())))
                for b in found]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValidationError(f"cannot read the bitmaps of qemu-img info: {exc}") from None


def parse_node_bitmaps(reply: str | bytes) -> dict[str, list[Bitmap]]:
    """``{image file: its bitmaps}`` of the qcow2 nodes in QMP's ``query-named-block-nodes`` reply (a running
    QEMU's view: ``inconsistent`` and not ``recording`` become flags, as ``qemu-img info`` would say)."""
    try:
        nodes = json.loads(reply)["return"]
        found: dict[str, list[Bitmap]] = {}
        for node in nodes:
            if node.get("drv") != "qcow2" or not node.get("file"):
                continue
            bitmaps = [Bitmap(str(b["name"]), int(b["granularity"]),
                              tuple(flag for flag, on in (("inconsistent", b.get("inconsistent", False)),
                                                          ("not-recording", not b.get("recording", True)),
                                                          ("busy", b.get("busy", False))) if on))
                       for b in node.get("dirty-bitmaps", [])]
            found.setdefault(str(node["file"]), []).extend(bitmaps)
        return found
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValidationError(f"cannot read the bitmaps of query-named-block-nodes: {exc}") from None


def redefine_xml(name: str, parent: str | None, created: int, targets: Iterable[str]) -> str:
    """The ``<domaincheckpoint>`` that gives libvirt back its record of checkpoint ``name`` whose bitmaps are
    in the disks ``targets`` (libvirt lost it: a redefined domain, another host sharing the disks)."""
    root = etree.Element("domaincheckpoint")
    etree.SubElement(root, "name").text = name
    if parent is not None:
        etree.SubElement(etree.SubElement(root, "parent"), "name").text = parent
    etree.SubElement(root, "creationTime").text = str(int(created))
    element = etree.SubElement(root, "disks")
    for target in targets:
        etree.SubElement(element, "disk", name=target, checkpoint="bitmap", bitmap=name)
    return etree.tostring(root, encoding="unicode")


__all__ = [
    "PREFIX", "Bitmap", "backup_xml", "checkpoint_name", "checkpoint_xml", "parse_bitmaps", "parse_checkpoint_name",
    "parse_node_bitmaps", "redefine_xml",
]  # fmt: skip
