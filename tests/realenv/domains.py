"""Tiny QEMU domains on a realenv host, driven through that host's libvirt over ``qemu+ssh://``.

A tiny domain is TCG (``type='qemu'``), has no OS (it sits in SeaBIOS), 64 MiB of RAM, a qcow2 ``vda``
and a raw ``vdb`` in a per-test directory, an optional cdrom, a guest-agent channel (no agent answers)
and no graphics. ``virsh shutdown`` does nothing without an OS: stop it with ``destroy``.
Guest writes are made with QEMU's ``qemu-io`` through the HMP monitor on the disk's virtio backend.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

import libvirt
import libvirt_qemu

from tests.realenv.errors import RealEnvError
from tests.realenv.model import HostInfo
from tests.realenv.procs import run

NAME_PREFIX = "vmsched-t-"
DISK_DEVICES = {"vda": "virtio-disk0", "vdb": "virtio-disk1", "vdc": "virtio-disk2"}  # libvirt's disk aliases
UNDEFINE_FLAGS = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate", libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


@dataclass(frozen=True)
class TinyDomain:
    """A domain created by this module: its name, the host it is defined on and its files."""

    name: str
    host: str
    directory: Path
    vda: Path
    vdb: Path
    cdrom: Path | None = None


def new_name() -> str:
    return NAME_PREFIX + secrets.token_hex(4)


def domain_xml(name: str, vda: Path, vdb: Path, cdrom: Path | None = None, memory_mib: int = 64,
               vdb_format: str = "raw") -> str:
    """The domain XML of a tiny domain (pure)."""
    cdrom_xml = ("" if cdrom is None else
                 "    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
                 f"<source file={quoteattr(str(cdrom))}/><target dev='hdc' bus='ide'/><readonly/></disk>\n")
    return f"""\
<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file={quoteattr(str(vda))}/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='{vdb_format}'/><source file={quoteattr(str(vdb))}/><target dev='vdb' bus='virtio'/></disk>
{cdrom_xml}    <controller type='usb' model='none'/>
    <serial type='pty'/><console type='pty'/>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def make_disks(directory: Path, *, vda_mib: int = 64, vdb_mib: int = 32, cdrom: bool = False,
               vdb_format: str = "raw") -> tuple[Path, Path, Path | None]:
    """Create the qcow2 vda, the vdb (raw unless asked) and (if asked) a 1 MiB blank cdrom image in
    ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vda, vdb = directory / "vda.qcow2", directory / f"vdb.{vdb_format}"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(vda), f"{vda_mib}M"])
    run(["qemu-img", "create", "-q", "-f", vdb_format, str(vdb), f"{vdb_mib}M"])
    iso = None
    if cdrom:
        iso = directory / "cdrom.iso"
        with open(iso, "wb") as f:
            f.truncate(1 << 20)
    return vda, vdb, iso


def disk_sources(xml: str) -> dict[str, Path]:
    """Source file of each file-backed disk target in a domain XML (pure)."""
    sources = {}
    for disk in ElementTree.fromstring(xml).iterfind("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None and source.get("file"):
            sources[target.get("dev", "")] = Path(source.get("file", ""))
    return sources


def hmp_qemu_io(disk: str, command: str) -> str:
    """The HMP line that runs one qemu-io ``command`` on ``disk``'s virtio backend (pure)."""
    device = f"/machine/peripheral/{DISK_DEVICES[disk]}/virtio-backend"
    return f'qemu-io -d {device} "{command}"'


def virsh_argv(host: HostInfo, args: list[str]) -> list[str]:
    """A local virsh argv against ``host``'s libvirt over ssh."""
    return ["virsh", "-q", "-c", host.libvirt_uri, *args]


class Hypervisor:
    """One host's libvirt (``qemu+ssh://`` through the realenv ssh wrapper, host keys checked)."""

    def __init__(self, host: HostInfo) -> None:
        self.host = host
        try:
            self.conn = libvirt.open(host.libvirt_uri)
        except libvirt.libvirtError as exc:
            raise RealEnvError(f"{host.name}: cannot open {host.libvirt_uri}: {exc}") from exc

    def close(self) -> None:
        self.conn.close()

    def names(self) -> list[str]:
        return sorted(d.name() for d in self.conn.listAllDomains())

    def lookup(self, dom: TinyDomain) -> libvirt.virDomain:
        return self.conn.lookupByName(dom.name)

    def define(self, directory: Path, *, name: str | None = None, cdrom: bool = False,
               start: bool = False, vdb_format: str = "raw") -> TinyDomain:
        name = name or new_name()
        vda, vdb, iso = make_disks(directory / name, cdrom=cdrom, vdb_format=vdb_format)
        dom = TinyDomain(name=name, host=self.host.name, directory=directory / name, vda=vda, vdb=vdb, cdrom=iso)
        self.conn.defineXML(domain_xml(name, vda, vdb, iso, vdb_format=vdb_format))
        if start:
            self.start(dom)
        return dom

    def start(self, dom: TinyDomain) -> None:
        self.lookup(dom).create()

    def state(self, dom: TinyDomain) -> str:
        return STATE_NAMES.get(self.lookup(dom).state()[0], "unknown")

    def destroy(self, dom: TinyDomain) -> None:
        domain = self.lookup(dom)
        if domain.isActive():
            domain.destroy()

    def undefine(self, dom: TinyDomain) -> None:
        self.lookup(dom).undefineFlags(UNDEFINE_FLAGS)

    def remove(self, dom: TinyDomain) -> None:
        """Destroy and undefine ``dom`` if it still exists (cleanup: tolerates a domain already gone)."""
        try:
            self.destroy(dom)
            self.undefine(dom)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise

    def disk_sources(self, dom: TinyDomain) -> dict[str, Path]:
        """Current source file of each disk target (changes with snapshots and pivots)."""
        return disk_sources(self.lookup(dom).XMLDesc())

    def checkpoints(self, dom: TinyDomain) -> list[str]:
        """The domain's libvirt checkpoints, by name."""
        return sorted(checkpoint.getName() for checkpoint in self.lookup(dom).listAllCheckpoints())

    def delete_checkpoint(self, dom: TinyDomain, name: str) -> None:
        """Delete one checkpoint as an operator would with ``virsh checkpoint-delete`` (its bitmaps too)."""
        self.lookup(dom).checkpointLookupByName(name).delete()

    def qemu_io(self, dom: TinyDomain, disk: str, command: str) -> str:
        line = hmp_qemu_io(disk, command)
        return libvirt_qemu.qemuMonitorCommand(self.lookup(dom), line,
                                               libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)

    def write_pattern(self, dom: TinyDomain, disk: str = "vda", *, pattern: int = 0x5A, offset: str = "8M",
                      length: str = "2M") -> None:
        """Write ``pattern`` bytes into the running guest's ``disk`` as the guest would, then flush."""
        self.qemu_io(dom, disk, f"write -P {pattern:#x} {offset} {length}")
        self.qemu_io(dom, disk, "flush")
