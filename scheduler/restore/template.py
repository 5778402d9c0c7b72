"""What a restored VM is made of: a VM template from the backed-up ``vm.xml`` and a libvirt domain XML
from the backed-up ``domain.xml`` (pure; spec §8.2 step 5, §8.3).

``clean_vm_template`` follows OpenNebula 6.10/7.0's cleaning rules (spec §8.3) exactly, including two
quirks kept on purpose because admins' templates may rely on them:

* CONTEXT keys are dropped when they merely *contain* ``ETH`` or ``PCI`` (the unanchored patterns
  ``ETH[0-9]?`` / ``PCI[0-9]?``): ``ETH0_IP`` and ``PCI0_MAC`` go, and so do ``METHOD`` or ``EPCI_MODE``;
* a NIC keeps one addressing hint only: an ``IP`` drops ``MAC`` and the IPv6 addresses, else an ``IP6``
  drops ``MAC``.

Where vmsched departs: a volatile ``SWAP`` disk is treated like a volatile ``FS`` disk (OpenNebula
lets it through to a missing image id and fails); a disk that was neither restored nor volatile nor a
CD-ROM makes the call fail with a ValidationError naming it (OpenNebula's driver crashes there);
vmsched's transient ``SCHED_MESSAGE`` is dropped like ``ERROR``; a vector left with no pairs is dropped.

``restored_domain_xml`` gives the libvirt definition the same meaning: a new name and UUID, the disks
named in ``disk_paths`` re-pointed at the restored files (no backing chain), the interfaces' generated
device names dropped, MAC and IP addresses dropped with ``no_ip``, interfaces dropped with ``no_nic``,
PCI host devices, NUMA placement (``numatune``, ``cpu/numa``) and CPU pinning (``cputune`` pins) dropped,
fixed graphics ports replaced by automatic ones, and what tied the character devices to the source VM's files
undone (its console would write the source's log, its agent socket collide with the source's): ``<log>`` of
serial, console, parallel and channel devices dropped, a unix channel's explicit socket path dropped (libvirt
makes one per domain), a file-backed serial or console made a pty. Everything else is kept as it was.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Mapping

from lxml import etree

from scheduler.errors import ValidationError
from scheduler.model.template import Template, Vector, from_element

DISK_REMOVED = (
    "ALLOW_ORPHANS", "CLONE", "CLONE_TARGET", "CLUSTER_ID", "DATASTORE", "DATASTORE_ID",
    "DISK_SNAPSHOT_TOTAL_SIZE", "DISK_TYPE", "DRIVER", "IMAGE", "IMAGE_STATE", "IMAGE_UID", "IMAGE_UNAME",
    "LN_TARGET", "OPENNEBULA_MANAGED", "ORIGINAL_SIZE", "PERSISTENT", "READONLY", "SAVE", "SOURCE", "TARGET",
    "TM_MAD", "FORMAT",
)  # fmt: skip
NIC_REMOVED = (
    "AR_ID", "BRIDGE", "BRIDGE_TYPE", "CLUSTER_ID", "NAME", "NETWORK_ID", "NIC_ID", "TARGET", "VLAN_ID",
    "VN_MAD", "VLAN_TAGGED_ID", "PHYDEV",
)  # fmt: skip
NIC_ADDRESSES = ("IP", "IP6", "IP6_ULA", "IP6_GLOBAL", "MAC")
PCI_REMOVED = NIC_REMOVED + (
    "ADDRESS", "BUS", "DOMAIN", "FUNCTION", "NUMA_NODE", "PCI_ID", "SLOT", "VM_ADDRESS", "VM_BUS",
    "VM_DOMAIN", "VM_FUNCTION", "VM_SLOT", "SHORT_ADDRESS",
)  # fmt: skip
NUMA_NODE_REMOVED = ("CPUS", "MEMORY_NODE_ID", "NODE_ID")
OS_REMOVED = ("UUID",)
GRAPHICS_REMOVED = ("PORT",)
CONTEXT_REMOVED = ("DISK_ID",)
CONTEXT_PATTERN = re.compile(r"ETH[0-9]?|PCI[0-9]?")  # searched, not matched: unanchored (spec §8.3)
TOP_REMOVED = (
    "AUTOMATIC_DS_REQUIREMENTS", "AUTOMATIC_NIC_REQUIREMENTS", "AUTOMATIC_REQUIREMENTS", "VMID",
    "TEMPLATE_ID", "TM_MAD_SYSTEM", "SECURITY_GROUP_RULE", "ERROR", "SCHED_MESSAGE",
)  # fmt: skip
VOLATILE_TYPES = ("FS", "SWAP")
CDROM_TYPES = ("CDROM", "RBD_CDROM")

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def _root(xml: str, what: str) -> etree._Element:
    try:
        root = etree.fromstring(xml.encode(), _PARSER)
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise ValidationError(f"{what} does not parse: {exc}") from None
    if root.getroottree().docinfo.doctype:  # type: ignore[union-attr]  # lxml-stubs 0.5 lacks DocInfo.doctype
        raise ValidationError(f"{what} has a DOCTYPE; it is not accepted")
    return root


# ---- the VM template (spec §8.3) ------------------------------------------------------------------


def backed_up_template(vm_xml: str) -> Template:
    """TEMPLATE merged with USER_TEMPLATE (a USER_TEMPLATE attribute replaces TEMPLATE's of that name)."""
    root = _root(vm_xml, "backed-up vm.xml")
    if root.tag != "VM":
        raise ValidationError(f"backed-up vm.xml holds <{root.tag}>, not <VM>")
    template = _section(root, "TEMPLATE")
    template.merge(_section(root, "USER_TEMPLATE"))
    return template


def _section(root: etree._Element, tag: str) -> Template:
    element = root.find(tag)
    return Template() if element is None else from_element(element, f"vm.xml {tag}")


def _drop_keys(vectors: list[Vector], keys: tuple[str, ...]) -> None:
    for vector in vectors:
        for key in keys:
            vector.pop(key)


def _clean_context(vectors: list[Vector]) -> None:
    for vector in vectors:
        for key in vector.keys():
            if key in CONTEXT_REMOVED or CONTEXT_PATTERN.search(key):
                del vector[key]


def _clean_disk(disk: Vector, image_ids: Mapping[int, int]) -> None:
    """One DISK after DISK_REMOVED: drop its id, point it at its restored image (spec §8.3)."""
    raw_id = disk.pop("DISK_ID")
    if raw_id is None:
        return  # no id: nothing tells which backed-up disk it was; left as it is
    disk_id = int(raw_id) if raw_id.strip().isdigit() else None
    restored = image_ids.get(disk_id) if disk_id is not None else None
    disk_type = (disk.get("TYPE") or "").upper()
    if disk_type in VOLATILE_TYPES:
        disk.pop("IMAGE_ID")
        if restored is None:
            return  # not in the backup: TYPE and SIZE stay, a fresh volatile disk is made
    disk.pop("TYPE")
    disk.pop("SIZE")
    if disk_type in CDROM_TYPES:
        return  # a CD-ROM keeps its original image
    if restored is None:
        raise ValidationError(f"DISK_ID {raw_id} of the backed-up VM has no restored image "
                              f"(restored disks: {', '.join(map(str, sorted(image_ids))) or 'none'})")
    disk["IMAGE_ID"] = str(restored)


def _clean_nics(template: Template, *, no_nic: bool, no_ip: bool) -> None:
    if no_nic:
        template.remove("NIC")
        return
    removed = NIC_REMOVED + (NIC_ADDRESSES if no_ip else ())
    for nic in template.vectors("NIC"):
        for key in removed:
            nic.pop(key)
        _one_address(nic)


def _one_address(nic: Vector) -> None:
    """A NIC keeps one addressing hint: IP wins over IPv6 and MAC, IP6 over MAC."""
    if "IP" in nic:
        for key in ("MAC", "IP6", "IP6_ULA", "IP6_GLOBAL"):
            nic.pop(key)
    elif "IP6" in nic:
        nic.pop("MAC")


def _without_empty(template: Template) -> Template:
    """Empty single values, empty pairs, and vectors left with no pair are dropped."""
    kept = Template()
    for name, value in template.attributes:
        if isinstance(value, Vector):
            value = Vector((key, sub) for key, sub in value.items() if sub != "")
        if len(value):
            kept.attributes.append((name, value))
    return kept


def clean_vm_template(vm_xml: str, *, name: str, image_ids: Mapping[int, int], no_nic: bool,
                      no_ip: bool) -> Template:
    """The VM template a restore creates from a backed-up ``vm.xml`` (spec §8.2 step 5, §8.3).

    ``image_ids`` maps a backed-up DISK_ID to the id of the image restored from it. The result's NAME is
    ``name``. A non-volatile, non-CD-ROM disk missing from ``image_ids`` raises ValidationError.
    """
    if not name.strip():
        raise ValidationError("the restored template needs a name")
    template = backed_up_template(vm_xml)
    disks = template.vectors("DISK")
    _drop_keys(disks, DISK_REMOVED)
    for name_removed in TOP_REMOVED:
        template.remove(name_removed)
    _clean_context(template.vectors("CONTEXT"))
    _drop_keys(template.vectors("GRAPHICS"), GRAPHICS_REMOVED)
    _drop_keys(template.vectors("NUMA_NODE"), NUMA_NODE_REMOVED)
    _drop_keys(template.vectors("OS"), OS_REMOVED)
    _drop_keys(template.vectors("PCI"), PCI_REMOVED)
    for disk in disks:
        _clean_disk(disk, image_ids)
    _clean_nics(template, no_nic=no_nic, no_ip=no_ip)
    template = _without_empty(template)
    template.set("NAME", name)
    return template


# ---- the libvirt domain ---------------------------------------------------------------------------


def _check_uuid(text: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise ValidationError(f"{text!r} is not a UUID") from None


def _set_child_text(root: etree._Element, tag: str, text: str) -> None:
    child = root.find(tag)
    if child is None:
        child = etree.SubElement(root, tag)
    child.text = text


def _remove(element: etree._Element) -> None:
    parent = element.getparent()
    if parent is not None:
        parent.remove(element)


def _repoint_disk(disk: etree._Element, path: str, disk_format: str) -> None:
    """A file disk on ``path`` in ``disk_format``, with no backing chain and no network settings."""
    disk.set("type", "file")
    for tag in ("source", "backingStore", "auth"):
        for old in disk.findall(tag):
            _remove(old)
    source = etree.Element("source", file=path)
    driver = disk.find("driver")
    if driver is None:
        driver = etree.Element("driver", name="qemu")
        disk.insert(0, driver)
    driver.set("type", disk_format)
    driver.addnext(source)


def _repoint_disks(devices: etree._Element, disk_paths: Mapping[str, str],
                   disk_formats: Mapping[str, str]) -> None:
    found = set()
    for disk in devices.iterfind("disk"):
        target = disk.find("target")
        dev = (target.get("dev") if target is not None else None) or ""
        if dev in disk_paths:
            _repoint_disk(disk, disk_paths[dev], disk_formats.get(dev, "qcow2"))
            found.add(dev)
    missing = sorted(set(disk_paths) - found)
    if missing:
        raise ValidationError(f"the backed-up domain has no disk with target {', '.join(missing)}")


def _clean_interfaces(devices: etree._Element, *, no_nic: bool, no_ip: bool) -> None:
    for interface in devices.findall("interface"):
        if no_nic:
            _remove(interface)
            continue
        for tag in ("target",) + (("mac", "ip", "route") if no_ip else ()):
            for child in interface.findall(tag):
                _remove(child)


def _free_graphics(devices: etree._Element) -> None:
    for graphics in devices.iterfind("graphics"):
        if graphics.get("port") or graphics.get("tlsPort"):
            for attribute in ("port", "tlsPort"):
                graphics.attrib.pop(attribute, "")
            graphics.set("autoport", "yes")


def _own_character_devices(devices: etree._Element) -> None:
    for device in devices:
        if device.tag not in ("serial", "console", "parallel", "channel"):
            continue
        for log in device.findall("log"):
            _remove(log)
        source = device.find("source")
        if device.tag == "channel" and device.get("type") == "unix" and source is not None:
            source.attrib.pop("path", "")
        if device.tag in ("serial", "console") and device.get("type") == "file":
            device.set("type", "pty")
            if source is not None:
                _remove(source)


def _unpin(root: etree._Element) -> None:
    for path in ("numatune", "cpu/numa", "cputune/vcpupin", "cputune/emulatorpin", "cputune/iothreadpin"):
        for element in root.findall(path):
            _remove(element)
    cputune = root.find("cputune")
    if cputune is not None and len(cputune) == 0:
        _remove(cputune)


def restored_domain_xml(domain_xml: str, *, name: str, uuid: str, disk_paths: Mapping[str, str], no_nic: bool,
                        no_ip: bool, disk_formats: Mapping[str, str] | None = None) -> str:
    """The backed-up libvirt ``domain_xml`` for a restored VM (see the module docstring).

    ``disk_paths`` maps a disk target (``vda``) to the restored file; ``disk_formats`` its format
    (``qcow2`` when not given). Every target named must be a disk of the domain.
    """
    if not name.strip():
        raise ValidationError("the restored domain needs a name")
    root = _root(domain_xml, "backed-up domain.xml")
    if root.tag != "domain":
        raise ValidationError(f"backed-up domain.xml holds <{root.tag}>, not <domain>")
    _set_child_text(root, "name", name)
    _set_child_text(root, "uuid", _check_uuid(uuid))
    devices = root.find("devices")
    if devices is None:
        if disk_paths:
            raise ValidationError("the backed-up domain has no devices")
    else:
        _repoint_disks(devices, disk_paths, disk_formats or {})
        _clean_interfaces(devices, no_nic=no_nic, no_ip=no_ip)
        for hostdev in devices.findall("hostdev"):
            if hostdev.get("type") == "pci":
                _remove(hostdev)
        _free_graphics(devices)
        _own_character_devices(devices)
    _unpin(root)
    return etree.tostring(root, encoding="unicode")
