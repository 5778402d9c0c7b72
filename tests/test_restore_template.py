"""The restored VM template (spec §8.3 cleaning rules) and the restored libvirt domain XML."""

from __future__ import annotations

import pytest
from lxml import etree

from scheduler.errors import ValidationError
from scheduler.model.template import Template
from scheduler.restore.template import backed_up_template, clean_vm_template, restored_domain_xml

NEW_UUID = "3f2b8c1e-0d4a-4c55-9a7e-2b1d6e0f9a10"


def vm_xml(template: str, user_template: str = "") -> str:
    """A backed-up vm.xml whose TEMPLATE / USER_TEMPLATE hold these templates (text form)."""
    root = etree.Element("VM")
    etree.SubElement(root, "ID").text = "42"
    etree.SubElement(root, "NAME").text = "web"
    root.append(Template.parse(template).to_xml("TEMPLATE"))
    root.append(Template.parse(user_template).to_xml("USER_TEMPLATE"))
    backups = etree.SubElement(root, "BACKUPS")
    etree.SubElement(backups, "BACKUP_CONFIG")
    return etree.tostring(root, encoding="unicode")


def clean(template: str, user_template: str = "", *, image_ids: dict[int, int] | None = None,
          no_nic: bool = False, no_ip: bool = False) -> Template:
    return clean_vm_template(vm_xml(template, user_template), name="restored", image_ids=image_ids or {},
                             no_nic=no_nic, no_ip=no_ip)


def vectors(template: Template, name: str) -> list[dict[str, str]]:
    return [dict(v.items()) for v in template.vectors(name)]


# ---- DISK -------------------------------------------------------------------------------------------

DISK_REMOVED = (
    "ALLOW_ORPHANS CLONE CLONE_TARGET CLUSTER_ID DATASTORE DATASTORE_ID DISK_SNAPSHOT_TOTAL_SIZE DISK_TYPE "
    "DRIVER IMAGE IMAGE_STATE IMAGE_UID IMAGE_UNAME LN_TARGET OPENNEBULA_MANAGED ORIGINAL_SIZE PERSISTENT "
    "READONLY SAVE SOURCE TARGET TM_MAD FORMAT"
).split()


def disk(**pairs: str) -> str:
    return "DISK = [ " + ", ".join(f'{k} = "{v}"' for k, v in pairs.items()) + " ]\n"


DISKS = [
    # (case, DISK pairs, restored image ids, the DISK vector after cleaning)
    ("a file disk points at its restored image; TYPE, SIZE, DISK_ID go; others stay",
     dict(DISK_ID="0", TYPE="FILE", SIZE="64", IMAGE_ID="3", DEV_PREFIX="vd", CACHE="none"), {0: 17},
     {"IMAGE_ID": "17", "DEV_PREFIX": "vd", "CACHE": "none"}),
    ("every listed key is removed",
     dict(DISK_ID="1", TYPE="BLOCK", **{key: "x" for key in DISK_REMOVED}), {1: 5}, {"IMAGE_ID": "5"}),
    ("a backed-up volatile FS disk becomes its restored image",
     dict(DISK_ID="2", TYPE="fs", SIZE="1024", FS="ext4", IMAGE_ID="9"), {2: 8}, {"IMAGE_ID": "8", "FS": "ext4"}),
    ("a volatile FS disk not backed up stays volatile: TYPE and SIZE kept, IMAGE_ID dropped",
     dict(DISK_ID="2", TYPE="FS", SIZE="1024", IMAGE_ID="9"), {0: 8}, {"TYPE": "FS", "SIZE": "1024"}),
    ("a volatile SWAP disk not backed up stays volatile too",
     dict(DISK_ID="3", TYPE="swap", SIZE="512"), {}, {"TYPE": "swap", "SIZE": "512"}),
    ("a CD-ROM keeps its original image",
     dict(DISK_ID="4", TYPE="CDROM", SIZE="1", IMAGE_ID="2", TARGET="hdc"), {}, {"IMAGE_ID": "2"}),
    ("an RBD CD-ROM keeps its original image, even when an image was restored for its id",
     dict(DISK_ID="4", TYPE="RBD_CDROM", IMAGE_ID="2"), {4: 99}, {"IMAGE_ID": "2"}),
    ("a disk without DISK_ID is only stripped of the listed keys",
     dict(TYPE="FILE", SIZE="10", SOURCE="/x", IMAGE_ID="6"), {0: 1}, {"TYPE": "FILE", "SIZE": "10", "IMAGE_ID": "6"}),
    ("a disk whose TYPE is missing is treated as an image disk",
     dict(DISK_ID="0", SIZE="10"), {0: 12}, {"IMAGE_ID": "12"}),
]


@pytest.mark.parametrize(("case", "pairs", "image_ids", "expected"), DISKS, ids=[c[0] for c in DISKS])
def test_disk_cleaning(case: str, pairs: dict[str, str], image_ids: dict[int, int], expected: dict) -> None:
    assert vectors(clean(disk(**pairs), image_ids=image_ids), "DISK") == [expected]


def test_each_disk_gets_its_own_image_and_order_is_kept() -> None:
    text = disk(DISK_ID="1", TYPE="FILE", TARGET="vdb") + disk(DISK_ID="0", TYPE="FILE", TARGET="vda")
    assert vectors(clean(text, image_ids={0: 10, 1: 11}), "DISK") == [{"IMAGE_ID": "11"}, {"IMAGE_ID": "10"}]


def test_a_disk_with_no_restored_image_is_refused_with_its_id() -> None:
    with pytest.raises(ValidationError, match=r"DISK_ID 1 .*no restored image.*restored disks: 0"):
        clean(disk(DISK_ID="0", TYPE="FILE") + disk(DISK_ID="1", TYPE="FILE"), image_ids={0: 3})


# ---- NIC --------------------------------------------------------------------------------------------

NIC_REMOVED = "AR_ID BRIDGE BRIDGE_TYPE CLUSTER_ID NAME NETWORK_ID NIC_ID TARGET VLAN_ID VN_MAD VLAN_TAGGED_ID PHYDEV"
ALL_ADDRESSES = dict(IP="10.0.0.5", IP6="fd00::5", IP6_ULA="fd00::6", IP6_GLOBAL="2001:db8::5", MAC="02:00:0a:00:00:05")


def nic(**pairs: str) -> str:
    return "NIC = [ " + ", ".join(f'{k} = "{v}"' for k, v in pairs.items()) + " ]\n"


NICS = [
    # (case, NIC pairs, no_ip, the NIC vector after cleaning)
    ("network placement keys go, MODEL stays",
     dict(MODEL="virtio", **{key: "x" for key in NIC_REMOVED.split()}), False, {"MODEL": "virtio"}),
    ("an IP wins: MAC and every IPv6 address go", dict(MODEL="virtio", **ALL_ADDRESSES), False,
     {"MODEL": "virtio", "IP": "10.0.0.5"}),
    ("without IP, an IP6 wins over the MAC",
     dict(IP6="fd00::5", IP6_ULA="fd00::6", MAC="02:00:0a:00:00:05"), False, {"IP6": "fd00::5", "IP6_ULA": "fd00::6"}),
    ("a MAC alone stays", dict(MAC="02:00:0a:00:00:05", NETWORK_ID="0"), False, {"MAC": "02:00:0a:00:00:05"}),
    ("an IP6_GLOBAL alone does not drop the MAC (only IP and IP6 count)",
     dict(IP6_GLOBAL="2001:db8::5", MAC="02:00:0a:00:00:05"), False,
     {"IP6_GLOBAL": "2001:db8::5", "MAC": "02:00:0a:00:00:05"}),
    ("NO_IP drops every address", dict(MODEL="e1000", **ALL_ADDRESSES), True, {"MODEL": "e1000"}),
]


@pytest.mark.parametrize(("case", "pairs", "no_ip", "expected"), NICS, ids=[c[0] for c in NICS])
def test_nic_cleaning(case: str, pairs: dict[str, str], no_ip: bool, expected: dict) -> None:
    assert vectors(clean(nic(**pairs), no_ip=no_ip), "NIC") == [expected]


def test_no_nic_drops_every_nic_and_nothing_else() -> None:
    text = nic(MAC="02:00:00:00:00:01") + nic(IP="10.0.0.2") + 'NIC_DEFAULT = [ MODEL = "virtio" ]\nMEMORY = "64"\n'
    cleaned = clean(text, no_nic=True)
    assert "NIC" not in cleaned
    assert (vectors(cleaned, "NIC_DEFAULT"), cleaned.get("MEMORY")) == ([{"MODEL": "virtio"}], "64")


def test_a_nic_left_with_nothing_is_dropped() -> None:
    assert "NIC" not in clean(nic(NETWORK_ID="0", BRIDGE="br0", MAC="02:00:00:00:00:01"), no_ip=True)


# ---- PCI, NUMA_NODE, OS, GRAPHICS, CONTEXT ----------------------------------------------------------

PCI_ADDRESS_KEYS = ("ADDRESS BUS DOMAIN FUNCTION NUMA_NODE PCI_ID SLOT VM_ADDRESS VM_BUS VM_DOMAIN VM_FUNCTION VM_SLOT "
                    "SHORT_ADDRESS").split()

VECTORS = [
    # (case, attribute, pairs before, no_ip, pairs after)
    ("PCI: addresses and network placement go, the model stays (devices are chosen again by model)",
     "PCI", dict(VENDOR="8086", DEVICE="0a0c", CLASS="0403", **{k: "x" for k in PCI_ADDRESS_KEYS + NIC_REMOVED.split()}),
     False, {"VENDOR": "8086", "DEVICE": "0a0c", "CLASS": "0403"}),
    ("PCI: NO_IP does not reach PCI NICs (their MAC and IP stay)",
     "PCI", dict(TYPE="NIC", MAC="02:00:00:00:00:09", IP="10.0.0.9", BUS="01"), True,
     {"TYPE": "NIC", "MAC": "02:00:00:00:00:09", "IP": "10.0.0.9"}),
    ("NUMA_NODE: host placement goes, the guest shape stays",
     "NUMA_NODE", dict(CPUS="0,1", MEMORY_NODE_ID="0", NODE_ID="1", TOTAL_CPUS="2", MEMORY="1024"), False,
     {"TOTAL_CPUS": "2", "MEMORY": "1024"}),
    ("OS: the old domain's UUID goes", "OS", dict(UUID="0f0e", ARCH="x86_64", BOOT="disk0"), False,
     {"ARCH": "x86_64", "BOOT": "disk0"}),
    ("GRAPHICS: the port goes", "GRAPHICS", dict(TYPE="VNC", PORT="5942", LISTEN="0.0.0.0"), False,
     {"TYPE": "VNC", "LISTEN": "0.0.0.0"}),
    ("CONTEXT: DISK_ID and ETH/PCI keys go",
     "CONTEXT", dict(DISK_ID="3", ETH0_IP="10.0.0.5", ETH0_MAC="02:00", PCI0_MAC="02:01", ETH_DNS="1.1.1.1",
                     NETWORK="YES", SSH_PUBLIC_KEY="ssh-ed25519 AAA", SET_HOSTNAME="web", TOKEN="YES"), False,
     {"NETWORK": "YES", "SSH_PUBLIC_KEY": "ssh-ed25519 AAA", "SET_HOSTNAME": "web", "TOKEN": "YES"}),
    ("CONTEXT: the patterns are unanchored, so any key merely containing ETH or PCI goes",
     "CONTEXT", dict(METHOD="dhcp", NETHOST="x", EPCI_MODE="on", SPECIAL="kept", START_SCRIPT="echo"), False,
     {"SPECIAL": "kept", "START_SCRIPT": "echo"}),
]


@pytest.mark.parametrize(("case", "name", "pairs", "no_ip", "expected"), VECTORS, ids=[c[0] for c in VECTORS])
def test_vector_cleaning(case: str, name: str, pairs: dict[str, str], no_ip: bool, expected: dict) -> None:
    text = f"{name} = [ " + ", ".join(f'{k} = "{v}"' for k, v in pairs.items()) + " ]\n"
    assert vectors(clean(text, no_ip=no_ip), name) == [expected]


def test_every_pci_device_is_cleaned() -> None:
    text = 'PCI = [ VENDOR = "1", SLOT = "2" ]\nPCI = [ VENDOR = "3", BUS = "4" ]\n'
    assert vectors(clean(text), "PCI") == [{"VENDOR": "1"}, {"VENDOR": "3"}]


# ---- top level, USER_TEMPLATE, empties, NAME --------------------------------------------------------

TOP_REMOVED = ("AUTOMATIC_DS_REQUIREMENTS AUTOMATIC_NIC_REQUIREMENTS AUTOMATIC_REQUIREMENTS VMID TEMPLATE_ID "
               "TM_MAD_SYSTEM ERROR SCHED_MESSAGE").split()


@pytest.mark.parametrize("name", TOP_REMOVED)
def test_top_level_attributes_that_describe_the_old_vm_go(name: str) -> None:
    cleaned = clean(f'{name} = "x"\nMEMORY = "64"\n')
    assert name not in cleaned and cleaned.get("MEMORY") == "64"


def test_security_group_rules_go() -> None:
    assert "SECURITY_GROUP_RULE" not in clean('SECURITY_GROUP_RULE = [ PROTOCOL = "ALL" ]\nCPU = "1"\n')


def test_user_template_is_merged_and_cleaned_too() -> None:
    cleaned = clean('CPU = "1"\nLABELS = "old"\n', 'LABELS = "web"\nERROR = "boom"\nDESCRIPTION = "front"\n')
    assert (cleaned.get("CPU"), cleaned.get("LABELS"), cleaned.get("DESCRIPTION")) == ("1", "web", "front")
    assert "ERROR" not in cleaned


def test_user_template_attribute_replaces_every_template_value_of_its_name() -> None:
    cleaned = clean('FEATURES = [ ACPI = "yes" ]\n', 'FEATURES = [ APIC = "yes" ]\n')
    assert vectors(cleaned, "FEATURES") == [{"APIC": "yes"}]


def test_empty_values_and_vectors_left_empty_are_dropped() -> None:
    cleaned = clean('EMPTY = ""\nNUMA_NODE = [ CPUS = "0", NODE_ID = "0" ]\nOS = [ UUID = "x", BOOT = "" ]\nCPU = "1"\n')
    assert cleaned.names() == ["CPU", "NAME"]


def test_name_is_set_and_the_result_reads_back_from_its_text_form() -> None:
    text = (disk(DISK_ID="0", TYPE="FILE", SOURCE="/var/lib/a b.qcow2") + nic(IP="10.0.0.1", MODEL="virtio")
            + 'NAME = "web"\nCONTEXT = [ START_SCRIPT = "echo \\"hi\\"" ]\nMEMORY = "64"\n')
    cleaned = clean_vm_template(vm_xml(text), name="web-restored", image_ids={0: 7}, no_nic=False, no_ip=False)
    assert cleaned.get("NAME") == "web-restored" and cleaned.values("NAME") == ["web-restored"]
    assert Template.parse(cleaned.render()) == cleaned
    assert vectors(cleaned, "CONTEXT") == [{"START_SCRIPT": 'echo "hi"'}]


def test_the_input_is_the_merge_of_template_and_user_template() -> None:
    merged = backed_up_template(vm_xml('A = "1"\nB = "2"\n', 'B = "3"\n'))
    assert merged == Template([("A", "1"), ("B", "3")])


BAD_INPUT = [
    ("not XML", "<VM><TEMPLATE>", "does not parse"),
    ("not a VM", "<IMAGE><ID>1</ID></IMAGE>", "not <VM>"),
    ("a DOCTYPE", '<!DOCTYPE VM [<!ENTITY x "y">]><VM/>', "DOCTYPE"),
]


@pytest.mark.parametrize(("case", "xml", "message"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_vm_xml_is_refused(case: str, xml: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        clean_vm_template(xml, name="x", image_ids={}, no_nic=False, no_ip=False)


def test_an_empty_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="name"):
        clean_vm_template(vm_xml('CPU = "1"'), name=" ", image_ids={}, no_nic=False, no_ip=False)


# ---- the libvirt domain -----------------------------------------------------------------------------

DOMAIN = """\
<domain type='kvm'>
  <name>web</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <title>front end</title>
  <memory unit='KiB'>65536</memory>
  <vcpu placement='static'>2</vcpu>
  <cputune><shares>2048</shares><vcpupin vcpu='0' cpuset='2'/><emulatorpin cpuset='3'/></cputune>
  <numatune><memory mode='strict' nodeset='0'/></numatune>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <cpu mode='host-model'><numa><cell id='0' cpus='0-1' memory='65536' unit='KiB'/></numa></cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/vms/web/vda.qcow2.overlay'/>
      <backingStore type='file'><format type='qcow2'/><source file='/var/lib/vms/web/vda.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <auth username='libvirt'><secret type='ceph' uuid='aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee'/></auth>
      <source protocol='rbd' name='one/one-7'><host name='mon1' port='6789'/></source>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/><source file='/isos/tools.iso'/><target dev='hdc' bus='ide'/><readonly/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:cc'/><source bridge='br0'/><target dev='vnet3'/><model type='virtio'/>
      <ip address='10.0.0.5' prefix='24'/>
    </interface>
    <interface type='network'><mac address='52:54:00:aa:bb:cd'/><source network='default'/></interface>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source>
    </hostdev>
    <hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/><product id='0xbeef'/></source></hostdev>
    <graphics type='vnc' port='5903' autoport='no' listen='127.0.0.1'/>
    <serial type='pty'/>
  </devices>
</domain>
"""
PATHS = {"vda": "/var/lib/restored/web-disk-0.qcow2", "vdb": "/var/lib/restored/web-disk-1.qcow2"}


def restore(*, no_nic: bool = False, no_ip: bool = False, paths: dict[str, str] | None = None,
            formats: dict[str, str] | None = None) -> etree._Element:
    xml = restored_domain_xml(DOMAIN, name="web-restored", uuid=NEW_UUID, disk_paths=PATHS if paths is None else paths,
                              no_nic=no_nic, no_ip=no_ip, disk_formats=formats)
    return etree.fromstring(xml.encode())


def disk_of(root: etree._Element, target: str) -> etree._Element:
    [found] = [d for d in root.iterfind("devices/disk") if d.find("target").get("dev") == target]
    return found


def test_domain_gets_the_new_name_and_uuid() -> None:
    root = restore()
    assert (root.findtext("name"), root.findtext("uuid")) == ("web-restored", NEW_UUID)


DISK_CASES = [
    # (case, target, formats, (disk type, driver type, source file, leftover children))
    ("a qcow2 overlay disk points at the restored file, without its backing chain", "vda", None,
     ("file", "qcow2", PATHS["vda"], ["driver", "source", "target"])),
    ("an RBD disk becomes a file disk, without auth or monitors", "vdb", None,
     ("file", "qcow2", PATHS["vdb"], ["driver", "source", "target"])),
    ("the format of a restored file can be given", "vdb", {"vdb": "raw"},
     ("file", "raw", PATHS["vdb"], ["driver", "source", "target"])),
]


@pytest.mark.parametrize(("case", "target", "formats", "expected"), DISK_CASES, ids=[c[0] for c in DISK_CASES])
def test_restored_disks(case: str, target: str, formats: dict | None, expected: tuple) -> None:
    found = disk_of(restore(formats=formats), target)
    source = found.find("source")
    assert (found.get("type"), found.find("driver").get("type"), source.get("file"),
            [child.tag for child in found]) == expected
    assert dict(source.attrib) == {"file": expected[2]}


def test_driver_options_are_kept_and_other_disks_untouched() -> None:
    root = restore()
    assert disk_of(root, "vda").find("driver").get("cache") == "none"
    cdrom = disk_of(root, "hdc")
    assert cdrom.find("source").get("file") == "/isos/tools.iso" and cdrom.find("readonly") is not None


def test_a_disk_without_a_driver_gets_one() -> None:
    xml = DOMAIN.replace("<driver name='qemu' type='qcow2' cache='none'/>", "")
    root = etree.fromstring(restored_domain_xml(xml, name="n", uuid=NEW_UUID, disk_paths={"vda": "/r/a"},
                                                no_nic=False, no_ip=False).encode())
    driver = disk_of(root, "vda").find("driver")
    assert (driver.get("name"), driver.get("type")) == ("qemu", "qcow2")


def test_an_unknown_disk_target_is_refused() -> None:
    with pytest.raises(ValidationError, match="no disk with target vdz"):
        restore(paths={"vdz": "/r/x"})


INTERFACES = [
    # (case, no_nic, no_ip, per interface: (mac, has <target>, has <ip>))
    ("kept with their MAC; the generated device name goes", False, False,
     [("52:54:00:aa:bb:cc", False, True), ("52:54:00:aa:bb:cd", False, False)]),
    ("NO_IP: MAC and IP addresses go", False, True, [(None, False, False), (None, False, False)]),
    ("NO_NIC: interfaces go", True, False, []),
    ("NO_NIC wins over NO_IP", True, True, []),
]


@pytest.mark.parametrize(("case", "no_nic", "no_ip", "expected"), INTERFACES, ids=[c[0] for c in INTERFACES])
def test_interfaces(case: str, no_nic: bool, no_ip: bool, expected: list) -> None:
    root = restore(no_nic=no_nic, no_ip=no_ip)
    found = [(i.find("mac").get("address") if i.find("mac") is not None else None, i.find("target") is not None,
              i.find("ip") is not None) for i in root.iterfind("devices/interface")]
    assert found == expected
    if not no_nic:
        assert [i.find("source").attrib for i in root.iterfind("devices/interface")] == [
            {"bridge": "br0"}, {"network": "default"}]


def test_pci_passthrough_numa_and_pinning_go_the_rest_stays() -> None:
    root = restore()
    assert [h.get("type") for h in root.iterfind("devices/hostdev")] == ["usb"]
    assert root.find("numatune") is None and root.find("cpu/numa") is None
    assert root.find("cpu").get("mode") == "host-model"
    assert [c.tag for c in root.find("cputune")] == ["shares"]
    assert (root.findtext("title"), root.findtext("memory"), root.find("vcpu").get("placement")) == (
        "front end", "65536", "static")
    assert root.find("os/boot").get("dev") == "hd" and root.find("devices/serial") is not None


def test_a_cputune_holding_only_pins_goes() -> None:
    xml = DOMAIN.replace("<shares>2048</shares>", "")
    root = etree.fromstring(restored_domain_xml(xml, name="n", uuid=NEW_UUID, disk_paths={}, no_nic=False,
                                                no_ip=False).encode())
    assert root.find("cputune") is None


def test_fixed_graphics_port_becomes_automatic() -> None:
    graphics = restore().find("devices/graphics")
    assert dict(graphics.attrib) == {"type": "vnc", "autoport": "yes", "listen": "127.0.0.1"}


CHARACTER_DEVICES = """\
<domain type='kvm'><name>web</name><uuid>11111111-2222-3333-4444-555555555555</uuid><devices>
  <serial type='pty'><log file='/var/lib/vms/web/console.log' append='off'/><target port='0'/></serial>
  <serial type='file'><source path='/var/lib/vms/web/serial1.log'/><target port='1'/></serial>
  <console type='file'><source path='/var/lib/vms/web/console2.log'/><target type='virtio'/></console>
  <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/web.agent'/>
    <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
  <parallel type='pty'><log file='/var/lib/vms/web/lpt.log'/></parallel>
</devices></domain>
"""


def test_character_devices_no_longer_write_to_the_source_vms_files() -> None:
    xml = restored_domain_xml(CHARACTER_DEVICES, name="web-restored", uuid=NEW_UUID, disk_paths={}, no_nic=False,
                              no_ip=False)
    devices = etree.fromstring(xml.encode()).find("devices")
    assert "/var/lib/vms/web" not in xml and "web.agent" not in xml
    assert [(d.tag, d.get("type")) for d in devices] == [
        ("serial", "pty"), ("serial", "pty"), ("console", "pty"), ("channel", "unix"), ("channel", "spicevmc"),
        ("parallel", "pty")]
    assert [d.find("target").attrib.get("port") for d in devices.findall("serial")] == ["0", "1"]  # the rest stays
    assert dict(devices.find("channel/source").attrib) == {"mode": "bind"}
    assert devices.find("channel/target").get("name") == "org.qemu.guest_agent.0"


DOMAIN_ERRORS = [
    ("bad UUID", dict(uuid="not-a-uuid"), "not a UUID"),
    ("empty name", dict(name=""), "name"),
    ("not a domain", dict(domain_xml="<VM/>"), "not <domain>"),
    ("not XML", dict(domain_xml="<domain>"), "does not parse"),
]


@pytest.mark.parametrize(("case", "change", "message"), DOMAIN_ERRORS, ids=[c[0] for c in DOMAIN_ERRORS])
def test_domain_errors(case: str, change: dict, message: str) -> None:
    args = dict(domain_xml=DOMAIN, name="n", uuid=NEW_UUID, disk_paths={}, no_nic=False, no_ip=False) | change
    with pytest.raises(ValidationError, match=message):
        restored_domain_xml(**args)

