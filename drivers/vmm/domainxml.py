"""Pure reading and writing of libvirt XML: a domain's disks, snapshot requests.

Nothing here talks to libvirt; the functions take and return strings and dataclasses, so they are tested
table-driven without a hypervisor (tests/test_domainxml.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lxml import etree

from scheduler.errors import ValidationError

INTERNAL_SNAPSHOT_REASON = "libvirt 9.0 cannot revert external snapshots and internal ones need qcow2"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=True)


@dataclass(frozen=True)
class NetworkHost:
    """One monitor/server of a network disk (``<source><host name= port=/>``)."""

    name: str
    port: int | None = None


@dataclass(frozen=True)
class Disk:
    """One ``<disk>`` of a domain, as far as snapshots and backups care.

    ``path`` is the file or block device; network (rbd) and volume disks have ``pool`` and ``image``
    instead (an rbd name ``pool/image`` or ``pool/namespace/image`` splits at the first slash).
    ``path``, ``pool`` and ``image`` are None for a disk without source (an empty cdrom drive).
    """

    target: str
    device: str = "disk"
    type: str = "file"
    format: str | None = None
    bus: str | None = None
    readonly: bool = False
    path: str | None = None
    protocol: str | None = None
    pool: str | None = None
    image: str | None = None
    hosts: tuple[NetworkHost, ...] = ()
    auth_username: str | None = None
    secret_type: str | None = None
    secret_uuid: str | None = None
    secret_usage: str | None = None

    @property
    def has_source(self) -> bool:
        return self.path is not None or self.image is not None

    @property
    def writable_disk(self) -> bool:
        """A guest disk the guest can write (not a cdrom/floppy, not read-only)."""
        return self.device in ("disk", "lun") and not self.readonly


def _root(xml: str) -> etree._Element:
    try:
        return etree.fromstring(xml.encode(), _PARSER)
    except etree.XMLSyntaxError as exc:
        raise ValidationError(f"domain XML does not parse: {exc}") from exc


def _port(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _network_source(source: etree._Element) -> dict[str, object]:
    name = source.get("name") or ""
    pool, _, image = name.partition("/")
    auth = source.find("auth")
    parent = source.getparent()
    if auth is None and parent is not None:
        auth = parent.find("auth")  # libvirt accepts <auth> beside <source> too
    secret = auth.find("secret") if auth is not None else None
    return {
        "protocol": source.get("protocol"),
        "pool": pool or None,
        "image": image or None,
        "hosts": tuple(NetworkHost(h.get("name", ""), _port(h.get("port"))) for h in source.iterfind("host")),
        "auth_username": auth.get("username") if auth is not None else None,
        "secret_type": secret.get("type") if secret is not None else None,
        "secret_uuid": secret.get("uuid") if secret is not None else None,
        "secret_usage": secret.get("usage") if secret is not None else None,
    }


def _source_fields(disk_type: str, source: etree._Element | None) -> dict[str, object]:
    if source is None:
        return {}
    if disk_type == "network":
        return _network_source(source)
    if disk_type == "volume":
        return {"pool": source.get("pool"), "image": source.get("volume")}
    path = source.get("dev") if disk_type == "block" else source.get("file")
    return {"path": path or None}


def _disk(element: etree._Element) -> Disk:
    target, driver = element.find("target"), element.find("driver")
    disk_type = element.get("type", "file")
    return Disk(
        target=target.get("dev", "") if target is not None else "",
        device=element.get("device", "disk"),
        type=disk_type,
        format=driver.get("type") if driver is not None else None,
        bus=target.get("bus") if target is not None else None,
        readonly=element.find("readonly") is not None,
        **_source_fields(disk_type, element.find("source")),  # type: ignore[arg-type]
    )


def parse_disks(xml: str) -> list[Disk]:
    """The disks of a domain XML, in document order."""
    return [_disk(element) for element in _root(xml).iterfind("devices/disk")]


def disk_by_target(disks: Sequence[Disk], target: str) -> Disk:
    for disk in disks:
        if disk.target == target:
            return disk
    raise ValidationError(f"no disk {target!r} (disks: {', '.join(d.target for d in disks) or 'none'})")


def domain_name(xml: str) -> str:
    return _root(xml).findtext("name") or ""


def _snapshot_root(name: str | None, description: str | None = None) -> etree._Element:
    root = etree.Element("domainsnapshot")
    if name:
        etree.SubElement(root, "name").text = name
    if description:
        etree.SubElement(root, "description").text = description
    return root


def disk_only_snapshot_xml(disks: Iterable[Disk], overlays: Mapping[str, str], name: str | None = None) -> str:
    """A ``<domainsnapshot>`` for an external disk-only snapshot of the disks named in ``overlays``.

    ``overlays`` maps a disk target to the qcow2 overlay file to create; every other disk of the domain is
    listed with ``snapshot='no'`` so that libvirt never invents overlay names of its own.
    """
    disks = list(disks)
    if not overlays:
        raise ValidationError("a disk-only snapshot needs at least one disk")
    for target in overlays:
        disk = disk_by_target(disks, target)
        if not disk.writable_disk:
            raise ValidationError(f"disk {target!r} is a read-only {disk.device}: it cannot be snapshotted")
        if disk.type not in ("file", "block"):
            raise ValidationError(f"disk {target!r} is a {disk.type} disk: only file and block disks get overlays")
    root = _snapshot_root(name)
    element = etree.SubElement(root, "disks")
    for disk in disks:
        if disk.target in overlays:
            entry = etree.SubElement(element, "disk", name=disk.target, snapshot="external", type="file")
            etree.SubElement(entry, "driver", type="qcow2")
            etree.SubElement(entry, "source", file=overlays[disk.target])
        else:
            etree.SubElement(element, "disk", name=disk.target, snapshot="no")
    return etree.tostring(root, encoding="unicode")


def internal_snapshot_xml(name: str, description: str | None = None) -> str:
    """A ``<domainsnapshot>`` for an internal system snapshot (memory + every disk inside its qcow2)."""
    return etree.tostring(_snapshot_root(name, description), encoding="unicode")


def internal_snapshot_blocker(disks: Iterable[Disk]) -> str | None:
    """Why an internal system snapshot of a domain with these disks is impossible, or None when it is not."""
    for disk in disks:
        if not disk.writable_disk or not disk.has_source:
            continue
        if disk.type not in ("file", "block"):
            return f"disk {disk.target} is a {disk.type} disk; {INTERNAL_SNAPSHOT_REASON}"
        if disk.format != "qcow2":
            return f"disk {disk.target} is {disk.format or 'of unknown format'}; {INTERNAL_SNAPSHOT_REASON}"
    return None


def with_disk_file(xml: str, target: str, path: str) -> str:
    """``xml`` (a domain definition) with file disk ``target`` on ``path``: its ``<source file>`` replaced and
    its ``<backingStore>`` dropped (libvirt reads the new file's backing chain from its header)."""
    root = _root(xml)
    for element in root.iterfind("devices/disk"):
        found = element.find("target")
        if found is None or found.get("dev") != target:
            continue
        if element.get("type", "file") != "file":
            raise ValidationError(f"disk {target!r} is a {element.get('type')} disk, not a file disk")
        source = element.find("source")
        if source is None:
            source = etree.SubElement(element, "source")
        source.set("file", path)
        for backing in element.findall("backingStore"):
            element.remove(backing)
        return etree.tostring(root, encoding="unicode")
    raise ValidationError(f"the domain has no disk {target!r}")
