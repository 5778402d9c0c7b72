"""drivers.vmm.domainxml: reading a domain's disks and writing snapshot requests (pure, table-driven)."""

from __future__ import annotations

import pytest
from lxml import etree

from drivers.vmm import domainxml
from drivers.vmm.domainxml import (
    INTERNAL_SNAPSHOT_REASON,
    Disk,
    NetworkHost,
    disk_by_target,
    disk_only_snapshot_xml,
    domain_name,
    internal_snapshot_blocker,
    internal_snapshot_xml,
    parse_disks,
)
from scheduler.errors import ValidationError


def domain(*disks: str) -> str:
    devices = "".join(disks) + "<interface type='network'/>"
    return f"<domain type='kvm'><name>web1</name><devices>{devices}</devices></domain>"


QCOW2_FILE = ("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
              "<source file='/var/lib/one/datastores/0/7/disk.0' index='2'/><target dev='vda' bus='virtio'/></disk>")
RAW_FILE = ("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            "<source file='/d/disk.1'/><target dev='vdb' bus='virtio'/></disk>")
CDROM = ("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/d/ctx.iso'/>"
         "<target dev='hdc' bus='ide'/><readonly/></disk>")
EMPTY_CDROM = ("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
               "<target dev='hdd' bus='ide'/><readonly/></disk>")
BLOCK = ("<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>"
         "<source dev='/dev/vg0/lv-7'/><target dev='sda' bus='scsi'/></disk>")
RBD = ("<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
       "<source protocol='rbd' name='one/one-5-7-0'><host name='10.0.0.1' port='6789'/><host name='mon2'/>"
       "<auth username='libvirt'><secret type='ceph' uuid='0d9b9c2e-4a71-4b3e-9f4e-2f2c1a1a1a1a'/></auth></source>"
       "<target dev='vdc' bus='virtio'/></disk>")
RBD_OUTER_AUTH = ("<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
                  "<auth username='admin'><secret type='ceph' usage='client.admin'/></auth>"
                  "<source protocol='rbd' name='rbd/ns/img'/><target dev='vdd' bus='virtio'/></disk>")
VOLUME = ("<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>"
          "<source pool='default' volume='v1.qcow2'/><target dev='vde' bus='sata'/></disk>")
NO_DRIVER = "<disk type='file' device='disk'><source file='/d/x'/><target dev='vdf'/></disk>"
FLOPPY = "<disk type='file' device='floppy'><source file='/d/f.img'/><target dev='fda' bus='fdc'/></disk>"


@pytest.mark.parametrize(("xml", "expected"), [
    (QCOW2_FILE, Disk("vda", "disk", "file", "qcow2", "virtio", False, "/var/lib/one/datastores/0/7/disk.0")),
    (RAW_FILE, Disk("vdb", "disk", "file", "raw", "virtio", False, "/d/disk.1")),
    (CDROM, Disk("hdc", "cdrom", "file", "raw", "ide", True, "/d/ctx.iso")),
    (EMPTY_CDROM, Disk("hdd", "cdrom", "file", "raw", "ide", True, None)),
    (BLOCK, Disk("sda", "disk", "block", "raw", "scsi", False, "/dev/vg0/lv-7")),
    (RBD, Disk("vdc", "disk", "network", "raw", "virtio", False, None, "rbd", "one", "one-5-7-0",
               (NetworkHost("10.0.0.1", 6789), NetworkHost("mon2", None)), "libvirt", "ceph",
               "0d9b9c2e-4a71-4b3e-9f4e-2f2c1a1a1a1a", None)),
    (RBD_OUTER_AUTH, Disk("vdd", "disk", "network", "raw", "virtio", False, None, "rbd", "rbd", "ns/img", (),
                          "admin", "ceph", None, "client.admin")),
    (VOLUME, Disk("vde", "disk", "volume", "qcow2", "sata", False, None, None, "default", "v1.qcow2")),
    (NO_DRIVER, Disk("vdf", "disk", "file", None, None, False, "/d/x")),
    (FLOPPY, Disk("fda", "floppy", "file", None, "fdc", False, "/d/f.img")),
], ids=["qcow2", "raw", "cdrom", "empty-cdrom", "block", "rbd", "rbd-outer-auth", "volume", "no-driver", "floppy"])
def test_parse_one_disk(xml: str, expected: Disk) -> None:
    assert parse_disks(domain(xml)) == [expected]


def test_parse_keeps_document_order_and_skips_other_devices() -> None:
    disks = parse_disks(domain(RAW_FILE, CDROM, QCOW2_FILE))
    assert [d.target for d in disks] == ["vdb", "hdc", "vda"]
    assert parse_disks(domain()) == []
    assert domain_name(domain()) == "web1"


@pytest.mark.parametrize(("disk", "has_source", "writable"), [
    (Disk("vda", path="/d/a"), True, True),
    (Disk("hdc", device="cdrom", readonly=True, path="/d/c.iso"), True, False),
    (Disk("hdd", device="cdrom", readonly=True), False, False),
    (Disk("vdb", readonly=True, path="/d/b"), True, False),
    (Disk("vdc", type="network", pool="one", image="img"), True, True),
    (Disk("sdb", device="lun", type="block", path="/dev/sdb"), True, True),
])
def test_disk_properties(disk: Disk, has_source: bool, writable: bool) -> None:
    assert (disk.has_source, disk.writable_disk) == (has_source, writable)


def test_parse_rejects_broken_xml() -> None:
    with pytest.raises(ValidationError, match="does not parse"):
        parse_disks("<domain><devices>")


def test_disk_by_target_names_the_known_disks() -> None:
    disks = parse_disks(domain(QCOW2_FILE, RAW_FILE))
    assert disk_by_target(disks, "vdb").path == "/d/disk.1"
    with pytest.raises(ValidationError, match=r"no disk 'vdz' \(disks: vda, vdb\)"):
        disk_by_target(disks, "vdz")


def snapshot_disks(xml: str) -> dict[str, tuple[str | None, str | None, str | None]]:
    """target -> (snapshot mode, overlay driver type, overlay file) of a <domainsnapshot>."""
    def attr(element: etree._Element, child: str, name: str) -> str | None:
        found = element.find(child)
        return found.get(name) if found is not None else None

    return {d.get("name"): (d.get("snapshot"), attr(d, "driver", "type"), attr(d, "source", "file"))
            for d in etree.fromstring(xml).iterfind("disks/disk")}


def test_disk_only_snapshot_lists_every_disk() -> None:
    disks = parse_disks(domain(QCOW2_FILE, RAW_FILE, CDROM, RBD))
    xml = disk_only_snapshot_xml(disks, {"vda": "/d/vda.ov", "vdb": "/d/vdb.ov"}, name="vmsched-run-7")
    root = etree.fromstring(xml)
    assert root.tag == "domainsnapshot" and root.findtext("name") == "vmsched-run-7"
    assert snapshot_disks(xml) == {
        "vda": ("external", "qcow2", "/d/vda.ov"),
        "vdb": ("external", "qcow2", "/d/vdb.ov"),
        "hdc": ("no", None, None),
        "vdc": ("no", None, None),
    }
    assert etree.fromstring(disk_only_snapshot_xml(disks, {"vdb": "/o"})).find("name") is None


@pytest.mark.parametrize(("overlays", "message"), [
    ({}, "at least one disk"),
    ({"vdz": "/o"}, "no disk 'vdz'"),
    ({"hdc": "/o"}, "read-only cdrom"),
    ({"vdc": "/o"}, "network disk"),
])
def test_disk_only_snapshot_refuses(overlays: dict[str, str], message: str) -> None:
    disks = parse_disks(domain(QCOW2_FILE, CDROM, RBD))
    with pytest.raises(ValidationError, match=message):
        disk_only_snapshot_xml(disks, overlays)


def test_internal_snapshot_xml() -> None:
    root = etree.fromstring(internal_snapshot_xml("before-upgrade", "a & b"))
    assert (root.tag, root.findtext("name"), root.findtext("description")) == (
        "domainsnapshot", "before-upgrade", "a & b")
    assert root.find("disks") is None and root.find("memory") is None


@pytest.mark.parametrize(("disks", "blocker"), [
    ([QCOW2_FILE], None),
    ([QCOW2_FILE, CDROM, EMPTY_CDROM], None),  # read-only media are not snapshotted
    ([QCOW2_FILE, RAW_FILE], f"disk vdb is raw; {INTERNAL_SNAPSHOT_REASON}"),
    ([RBD], f"disk vdc is a network disk; {INTERNAL_SNAPSHOT_REASON}"),
    ([NO_DRIVER], f"disk vdf is of unknown format; {INTERNAL_SNAPSHOT_REASON}"),
    ([BLOCK.replace("type='raw'", "type='qcow2'")], None),
])
def test_internal_snapshot_blocker(disks: list[str], blocker: str | None) -> None:
    assert internal_snapshot_blocker(parse_disks(domain(*disks))) == blocker


def test_with_disk_file_points_one_file_disk_at_a_new_file() -> None:
    xml = ("<domain><name>d</name><devices>"
           "<disk type='file' device='disk'><driver type='qcow2'/><source file='/d/a.vmsched-snap.1.2'/>"
           "<backingStore type='file'><source file='/d/a'/></backingStore><target dev='vda'/></disk>"
           "<disk type='file' device='disk'><source file='/d/b'/><target dev='vdb'/></disk>"
           "<disk type='network' device='disk'><source protocol='rbd' name='p/i'/><target dev='vdc'/></disk>"
           "</devices></domain>")
    changed = domainxml.with_disk_file(xml, "vda", "/d/a.vmsched-snap.1.3")
    disks = {d.target: d for d in domainxml.parse_disks(changed)}
    assert disks["vda"].path == "/d/a.vmsched-snap.1.3" and disks["vdb"].path == "/d/b"
    assert "backingStore" not in changed and disks["vda"].format == "qcow2"
    with pytest.raises(ValidationError, match="network disk"):
        domainxml.with_disk_file(xml, "vdc", "/d/c")
    with pytest.raises(ValidationError, match="no disk 'vdz'"):
        domainxml.with_disk_file(xml, "vdz", "/d/c")
