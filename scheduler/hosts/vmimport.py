"""What a libvirt domain becomes when vmsched imports it: the pieces of a VM template (pure).

``read_domain`` reads a domain XML into :class:`DomainFacts`; ``import_template`` turns those facts
(plus disk sizes found on the host) into the VM TEMPLATE, refreshing a previous one on re-import;
``vm_states`` maps the domain state to the VM's STATE/LCM_STATE. Nothing here talks to a host.

Choices, per spec §1.5/§1.6:

* DISK_ID is stable per target device: a target seen in the previous template keeps its id, a new
  target gets one more than the highest id ever given in that template (ids of unplugged disks are
  not handed to other disks while they are still listed; backups name their files by DISK_ID).
* TYPE is CDROM for cdrom devices, RBD for Ceph network disks, BLOCK for block devices, FILE for
  files; TM_MAD is ``qcow2`` for file disks and ``ceph`` for RBD disks (others get none). Imported
  disks are used in place: CLONE=NO.
* running (and "shutting down") -> ACTIVE/RUNNING; shut off -> POWEROFF; paused or pm-suspended ->
  SUSPENDED, which is how OpenNebula's monitor treats a guest paused behind its back (its suspend
  also leaves the guest not running); crashed or unknown -> ACTIVE/UNKNOWN.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lxml import etree

from drivers.tm.plan import parse_snapshot_overlay
from drivers.vmm.domainxml import Disk, parse_disks
from drivers.vmm.states import DomainState
from scheduler.errors import ValidationError
from scheduler.model.objects.states import LcmState, VmState
from scheduler.model.template import Template, Vector

MIB = 1 << 20
# TEMPLATE names an import writes; every other name of a previous template is kept on re-import.
IMPORTED_NAMES = ("CPU", "VCPU", "MEMORY", "DISK", "NIC", "IMPORTED")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=True)
_MEMORY_UNITS = {
    "b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": MIB, "mib": MIB, "mb": 1000**2,
    "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3, "t": 1 << 40, "tib": 1 << 40, "tb": 1000**4,
}  # fmt: skip


@dataclass(frozen=True)
class Nic:
    mac: str | None = None
    bridge: str | None = None
    model: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class DomainFacts:
    """What an import takes from a domain XML."""

    name: str
    uuid: str
    vcpu: int
    memory_mb: int
    disks: tuple[Disk, ...]
    nics: tuple[Nic, ...]


def _root(xml: str) -> etree._Element:
    try:
        return etree.fromstring(xml.encode(), _PARSER)
    except etree.XMLSyntaxError as exc:
        raise ValidationError(f"domain XML does not parse: {exc}") from exc


def _memory_mb(element: etree._Element | None) -> int:
    if element is None or not (element.text or "").strip().isdigit():
        return 0
    unit = _MEMORY_UNITS.get((element.get("unit") or "KiB").lower())
    if unit is None:
        raise ValidationError(f"domain memory has an unknown unit {element.get('unit')!r}")
    return int((element.text or "").strip()) * unit // MIB


def _nic(element: etree._Element) -> Nic:
    def attr(tag: str, name: str) -> str | None:
        child = element.find(tag)
        return child.get(name) if child is not None else None

    return Nic(mac=attr("mac", "address"), bridge=attr("source", "bridge"), model=attr("model", "type"),
               target=attr("target", "dev"))


def read_domain(xml: str) -> DomainFacts:
    """The name, UUID, CPUs, memory, disks and NICs of a domain XML."""
    root = _root(xml)
    name, uuid = (root.findtext("name") or "").strip(), (root.findtext("uuid") or "").strip()
    if not name or not uuid:
        raise ValidationError("domain XML has no name or no uuid")
    vcpu = (root.findtext("vcpu") or "1").strip()
    return DomainFacts(
        name=name,
        uuid=uuid.lower(),
        vcpu=int(vcpu) if vcpu.isdigit() else 1,
        memory_mb=_memory_mb(root.find("currentMemory")) or _memory_mb(root.find("memory")),
        disks=tuple(parse_disks(xml)),
        nics=tuple(_nic(element) for element in root.iterfind("devices/interface")),
    )


# ---- disks ----------------------------------------------------------------------------------------


def disk_type(disk: Disk) -> str:
    if disk.device == "cdrom":
        return "CDROM"
    if disk.type == "network" and disk.protocol == "rbd":
        return "RBD"
    if disk.type == "block":
        return "BLOCK"
    return "FILE" if disk.type in ("file", "volume") else disk.type.upper()


def _tm_mad(disk: Disk) -> str | None:
    if disk.type == "network" and disk.protocol == "rbd":
        return "ceph"
    return "qcow2" if disk.type == "file" else None


def size_mb(virtual_bytes: int) -> int:
    """A virtual size in MB as OpenNebula's DISK/SIZE holds it (rounded up)."""
    return -(-virtual_bytes // MIB)


def _ceph_pairs(disk: Disk) -> list[tuple[str, str | None]]:
    hosts = " ".join(f"{h.name}:{h.port}" if h.port else h.name for h in disk.hosts)
    return [
        ("POOL_NAME", disk.pool),
        ("CEPH_HOST", hosts or None),
        ("CEPH_USER", disk.auth_username),
        ("CEPH_SECRET", disk.secret_uuid),
        ("CEPH_SECRET_USAGE", disk.secret_usage),
        ("CEPH_SECRET_TYPE", disk.secret_type),
    ]


def disk_source(disk: Disk) -> str | None:
    """SOURCE: the file or device path (the disk file of an INCREMENT_MODE=SNAPSHOT overlay the domain runs
    on), or ``pool/image`` for RBD and volume disks."""
    if disk.path:
        overlay = parse_snapshot_overlay(disk.path)
        return disk.path if overlay is None else overlay[0]
    return f"{disk.pool}/{disk.image}" if disk.pool and disk.image else disk.image


def disk_vector(disk: Disk, disk_id: int, size: int | None) -> Vector:
    """One DISK vector; ``size`` in MB when known."""
    pairs: list[tuple[str, str | None]] = [
        ("DISK_ID", str(disk_id)),
        ("TARGET", disk.target),
        ("TYPE", disk_type(disk)),
        ("FORMAT", disk.format),
        ("SOURCE", disk_source(disk)),
        ("TM_MAD", _tm_mad(disk)),
        ("SIZE", None if size is None else str(size)),
        ("DEV_PREFIX", disk.target[:2] if len(disk.target) > 2 else None),
        ("READONLY", "YES" if disk.readonly else None),
        ("CLONE", "NO" if disk.has_source else None),
    ]
    if disk.type == "network" and disk.protocol == "rbd":
        pairs += _ceph_pairs(disk)
    return Vector((key, value) for key, value in pairs if value)


def assign_disk_ids(targets: Sequence[str], previous: Iterable[Vector]) -> list[int]:
    """A DISK_ID for each target: its previous id when the target was seen before, else the next free one."""
    known: dict[str, int] = {}
    highest = -1
    for vector in previous:
        raw = (vector.get("DISK_ID") or "").strip()
        if raw.isdigit():
            highest = max(highest, int(raw))
            if vector.get("TARGET"):
                known.setdefault(vector["TARGET"], int(raw))
    ids: list[int] = []
    for target in targets:
        if target in known and known[target] not in ids:
            ids.append(known[target])
        else:
            highest += 1
            ids.append(highest)
    return ids


def nic_vector(nic: Nic, nic_id: int) -> Vector:
    pairs = [("NIC_ID", str(nic_id)), ("MAC", nic.mac), ("BRIDGE", nic.bridge), ("MODEL", nic.model),
             ("TARGET", nic.target)]
    return Vector((key, value) for key, value in pairs if value)


# ---- the template ---------------------------------------------------------------------------------


def import_template(facts: DomainFacts, sizes: Mapping[str, int | None], previous: Template | None = None) -> Template:
    """The VM TEMPLATE of an imported domain; ``sizes`` maps a disk target to its size in MB.

    On re-import (``previous`` given) the names an import owns are rewritten, OS/UUID is set, and every
    other attribute (SNAPSHOT records, CONTEXT, TM_MAD_SYSTEM, OS keys...) is kept as it was."""
    template = previous.copy() if previous is not None else Template()
    old_disks = template.vectors("DISK")
    for name in IMPORTED_NAMES:
        template.remove(name)
    os_vector = template.get_vector("OS")
    if os_vector is None:
        os_vector = Vector()
        template.add("OS", os_vector)
    os_vector["UUID"] = facts.uuid
    template.add("CPU", str(facts.vcpu))
    template.add("VCPU", str(facts.vcpu))
    template.add("MEMORY", str(facts.memory_mb))
    ids = assign_disk_ids([disk.target for disk in facts.disks], old_disks)
    for disk, disk_id in sorted(zip(facts.disks, ids, strict=True), key=lambda pair: pair[1]):
        template.add("DISK", disk_vector(disk, disk_id, sizes.get(disk.target)))
    for nic_id, nic in enumerate(facts.nics):
        template.add("NIC", nic_vector(nic, nic_id))
    template.add("IMPORTED", "YES")
    return template


def unique_name(wanted: str, taken: Iterable[str]) -> str:
    """``wanted``, or ``wanted-1``, ``wanted-2``... when another VM has that name."""
    used = set(taken)
    if wanted not in used:
        return wanted
    n = 1
    while f"{wanted}-{n}" in used:
        n += 1
    return f"{wanted}-{n}"


def vm_states(state: DomainState) -> tuple[VmState, LcmState]:
    """(STATE, LCM_STATE) of a VM whose domain is in ``state`` (choices in the module docstring)."""
    if state in (DomainState.RUNNING, DomainState.SHUTDOWN):
        return VmState.ACTIVE, LcmState.RUNNING
    if state == DomainState.SHUTOFF:
        return VmState.POWEROFF, LcmState.LCM_INIT
    if state in (DomainState.PAUSED, DomainState.PMSUSPENDED):
        return VmState.SUSPENDED, LcmState.LCM_INIT
    return VmState.ACTIVE, LcmState.UNKNOWN
