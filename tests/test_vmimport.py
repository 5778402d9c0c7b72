"""scheduler.hosts.vmimport and drivers.vmm.imageinfo: a domain XML becomes VM template pieces (pure)."""

from __future__ import annotations

import json

import pytest

from drivers.vmm import Disk, DomainState, NetworkHost
from drivers.vmm.imageinfo import InternalSnapshot, parse_image_info
from scheduler.errors import DriverError, ValidationError
from scheduler.hosts.vmimport import (
    assign_disk_ids,
    disk_vector,
    import_template,
    read_domain,
    size_mb,
    unique_name,
    vm_states,
)
from scheduler.model.objects.states import LcmState, VmState
from scheduler.model.template import Template, Vector

UUID = "6F1C1D52-6B7A-4E3B-9C55-0A1B2C3D4E5F"
DOMAIN = f"""<domain type='kvm'>
  <name>web1</name><uuid>{UUID}</uuid>
  <memory unit='KiB'>2097152</memory><currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/vms/web1.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='network' device='disk'><driver name='qemu' type='raw'/>
      <auth username='libvirt'><secret type='ceph' uuid='0b1c2d3e-0000-4000-8000-000000000001'/></auth>
      <source protocol='rbd' name='one/one-7-1'><host name='mon1' port='6789'/><host name='mon2'/></source>
      <target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/></disk>
    <interface type='bridge'><mac address='52:54:00:aa:bb:cc'/><source bridge='br0'/>
      <target dev='vnet3'/><model type='virtio'/></interface>
    <interface type='network'><mac address='52:54:00:aa:bb:cd'/><source network='default'/></interface>
  </devices>
</domain>"""


def test_read_domain_takes_identity_cpu_memory_disks_nics() -> None:
    facts = read_domain(DOMAIN)
    assert (facts.name, facts.uuid, facts.vcpu, facts.memory_mb) == ("web1", UUID.lower(), 2, 1024)
    assert [d.target for d in facts.disks] == ["vda", "vdb", "hdc"]
    assert [(n.mac, n.bridge, n.model) for n in facts.nics] == [
        ("52:54:00:aa:bb:cc", "br0", "virtio"), ("52:54:00:aa:bb:cd", None, None)]


@pytest.mark.parametrize(("xml", "message"), [
    ("<domain><name>x</name></domain>", "no name or no uuid"),
    ("<domain", "does not parse"),
    (f"<domain><name>x</name><uuid>{UUID}</uuid><memory unit='furlong'>3</memory></domain>", "unknown unit"),
])
def test_read_domain_refuses(xml: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        read_domain(xml)


@pytest.mark.parametrize(("memory", "mb"), [
    ("<memory>524288</memory>", 512),
    ("<memory unit='MiB'>64</memory>", 64),
    ("<memory unit='G'>2</memory>", 2048),
    ("<memory unit='b'>1048576</memory>", 1),
])
def test_memory_units(memory: str, mb: int) -> None:
    assert read_domain(f"<domain><name>x</name><uuid>{UUID}</uuid>{memory}</domain>").memory_mb == mb


RBD = Disk(target="vdb", type="network", format="raw", protocol="rbd", pool="one", image="one-7-1",
           hosts=(NetworkHost("mon1", 6789), NetworkHost("mon2")), auth_username="libvirt", secret_type="ceph",
           secret_uuid="0b1c")


@pytest.mark.parametrize(("disk", "size", "expected"), [
    (Disk(target="vda", format="qcow2", path="/v/a.qcow2"), 64,
     [("DISK_ID", "0"), ("TARGET", "vda"), ("TYPE", "FILE"), ("FORMAT", "qcow2"), ("SOURCE", "/v/a.qcow2"),
      ("TM_MAD", "qcow2"), ("SIZE", "64"), ("DEV_PREFIX", "vd"), ("CLONE", "NO")]),
    # a domain running on an INCREMENT_MODE=SNAPSHOT overlay: SOURCE stays the disk file
    (Disk(target="vda", format="qcow2", path="/v/a.qcow2.vmsched-snap.4.2"), 64,
     [("DISK_ID", "0"), ("TARGET", "vda"), ("TYPE", "FILE"), ("FORMAT", "qcow2"), ("SOURCE", "/v/a.qcow2"),
      ("TM_MAD", "qcow2"), ("SIZE", "64"), ("DEV_PREFIX", "vd"), ("CLONE", "NO")]),
    (Disk(target="vdb", format="raw", path="/v/b.raw"), None,
     [("DISK_ID", "0"), ("TARGET", "vdb"), ("TYPE", "FILE"), ("FORMAT", "raw"), ("SOURCE", "/v/b.raw"),
      ("TM_MAD", "qcow2"), ("DEV_PREFIX", "vd"), ("CLONE", "NO")]),
    (Disk(target="sda", type="block", format="raw", path="/dev/vg/lv"), 1024,
     [("DISK_ID", "0"), ("TARGET", "sda"), ("TYPE", "BLOCK"), ("FORMAT", "raw"), ("SOURCE", "/dev/vg/lv"),
      ("SIZE", "1024"), ("DEV_PREFIX", "sd"), ("CLONE", "NO")]),
    (Disk(target="hdc", device="cdrom", format="raw", readonly=True), None,
     [("DISK_ID", "0"), ("TARGET", "hdc"), ("TYPE", "CDROM"), ("FORMAT", "raw"), ("TM_MAD", "qcow2"),
      ("DEV_PREFIX", "hd"), ("READONLY", "YES")]),
    (Disk(target="hdc", device="cdrom", format="raw", readonly=True, path="/iso/a.iso"), 1,
     [("DISK_ID", "0"), ("TARGET", "hdc"), ("TYPE", "CDROM"), ("FORMAT", "raw"), ("SOURCE", "/iso/a.iso"),
      ("TM_MAD", "qcow2"), ("SIZE", "1"), ("DEV_PREFIX", "hd"), ("READONLY", "YES"), ("CLONE", "NO")]),
    (RBD, 10240,
     [("DISK_ID", "0"), ("TARGET", "vdb"), ("TYPE", "RBD"), ("FORMAT", "raw"), ("SOURCE", "one/one-7-1"),
      ("TM_MAD", "ceph"), ("SIZE", "10240"), ("DEV_PREFIX", "vd"), ("CLONE", "NO"), ("POOL_NAME", "one"),
      ("CEPH_HOST", "mon1:6789 mon2"), ("CEPH_USER", "libvirt"), ("CEPH_SECRET", "0b1c"),
      ("CEPH_SECRET_TYPE", "ceph")]),
])
def test_disk_vector(disk: Disk, size: int | None, expected: list[tuple[str, str]]) -> None:
    assert sorted(disk_vector(disk, 0, size).items()) == sorted(expected)


@pytest.mark.parametrize(("targets", "previous", "expected"), [
    (["vda", "vdb", "hdc"], [], [0, 1, 2]),
    (["vda", "vdb"], [("vdb", "0"), ("vda", "1")], [1, 0]),  # ids follow targets, not positions
    (["vda", "vdc", "vdb"], [("vda", "0"), ("vdb", "1")], [0, 2, 1]),  # hot-plugged vdc: next free id
    (["vda", "vdc"], [("vda", "0"), ("vdb", "4")], [0, 5]),  # after the highest id, even one of a gone disk
    (["vdb"], [("vda", "0"), ("vdb", "1")], [1]),
    (["vda"], [("vda", "x")], [0]),
])
def test_disk_ids_are_stable_per_target(targets: list[str], previous: list[tuple[str, str]],
                                        expected: list[int]) -> None:
    vectors = [Vector([("TARGET", target), ("DISK_ID", disk_id)]) for target, disk_id in previous]
    assert assign_disk_ids(targets, vectors) == expected


def test_import_template_from_scratch() -> None:
    template = import_template(read_domain(DOMAIN), {"vda": 10240, "vdb": 20480})
    assert template.get_vector("OS").items() == [("UUID", UUID.lower())]
    assert (template.get("CPU"), template.get("VCPU"), template.get("MEMORY"), template.get("IMPORTED")) == (
        "2", "2", "1024", "YES")
    disks = template.vectors("DISK")
    assert [(d["DISK_ID"], d["TARGET"], d["TYPE"], d.get("SIZE")) for d in disks] == [
        ("0", "vda", "FILE", "10240"), ("1", "vdb", "RBD", "20480"), ("2", "hdc", "CDROM", None)]
    assert [(n["NIC_ID"], n["MAC"], n.get("BRIDGE")) for n in template.vectors("NIC")] == [
        ("0", "52:54:00:aa:bb:cc", "br0"), ("1", "52:54:00:aa:bb:cd", None)]


def test_reimport_keeps_ids_and_foreign_attributes() -> None:
    previous = Template.parse(
        'OS = [ ARCH = "x86_64", UUID = "old" ]\nCPU = "9"\nTM_MAD_SYSTEM = "ssh"\n'
        'DISK = [ DISK_ID = "3", TARGET = "hdc" ]\nDISK = [ DISK_ID = "0", TARGET = "vda" ]\n'
        'SNAPSHOT = [ SNAPSHOT_ID = "0", NAME = "s", HYPERVISOR_ID = "vmsched-snap-0", TIME = "1", '
        'SYSTEM_DISK_SIZE = "0" ]\n'
    )
    template = import_template(read_domain(DOMAIN), {}, previous)
    assert [(d["TARGET"], d["DISK_ID"]) for d in template.vectors("DISK")] == [("vda", "0"), ("hdc", "3"),
                                                                             ("vdb", "4")]
    assert template.get_vector("OS").items() == [("ARCH", "x86_64"), ("UUID", UUID.lower())]
    assert (template.get("CPU"), template.get("TM_MAD_SYSTEM")) == ("2", "ssh")
    assert template.get_vector("SNAPSHOT")["HYPERVISOR_ID"] == "vmsched-snap-0"
    assert previous.get("CPU") == "9"  # the previous template is not changed in place


@pytest.mark.parametrize(("wanted", "taken", "name"), [
    ("web", [], "web"),
    ("web", ["web"], "web-1"),
    ("web", ["web", "web-1", "web-2"], "web-3"),
    ("web", ["web-1"], "web"),
])
def test_unique_name(wanted: str, taken: list[str], name: str) -> None:
    assert unique_name(wanted, taken) == name


@pytest.mark.parametrize(("state", "expected"), [
    (DomainState.RUNNING, (VmState.ACTIVE, LcmState.RUNNING)),
    (DomainState.SHUTDOWN, (VmState.ACTIVE, LcmState.RUNNING)),
    (DomainState.SHUTOFF, (VmState.POWEROFF, LcmState.LCM_INIT)),
    (DomainState.PAUSED, (VmState.SUSPENDED, LcmState.LCM_INIT)),
    (DomainState.PMSUSPENDED, (VmState.SUSPENDED, LcmState.LCM_INIT)),
    (DomainState.CRASHED, (VmState.ACTIVE, LcmState.UNKNOWN)),
    (DomainState.UNKNOWN, (VmState.ACTIVE, LcmState.UNKNOWN)),
])
def test_vm_states(state: DomainState, expected: tuple[VmState, LcmState]) -> None:
    assert vm_states(state) == expected


@pytest.mark.parametrize(("size", "mb"), [(0, 0), (1, 1), (1 << 20, 1), ((1 << 20) + 1, 2), (64 << 20, 64)])
def test_size_mb_rounds_up(size: int, mb: int) -> None:
    assert size_mb(size) == mb


def test_parse_image_info() -> None:
    text = json.dumps({"virtual-size": 67108864, "format": "qcow2", "snapshots": [
        {"id": "1", "name": "a", "vm-state-size": 0}, {"id": "3", "name": "b"}]})
    info = parse_image_info(text)
    assert (info.virtual_size, info.format) == (67108864, "qcow2")
    assert info.snapshots == (InternalSnapshot(1, "a"), InternalSnapshot(3, "b"))
    assert info.snapshot(3) == InternalSnapshot(3, "b") and info.snapshot(2) is None
    assert info.named("a") == [InternalSnapshot(1, "a")]


@pytest.mark.parametrize("text", ["", "{}", "[1]", '{"virtual-size": "x"}'])
def test_parse_image_info_refuses_garbage(text: str) -> None:
    with pytest.raises(DriverError, match="unreadable answer"):
        parse_image_info(text, "h:/x")
