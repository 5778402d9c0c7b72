"""A tiny real Linux guest running the QEMU guest agent, for tests of agent freeze/thaw and in-guest writes.

**Image** (:func:`ensure_image`, cached in ``DIR/agent-guest``): Debian's ``linux-image-amd64`` kernel and a
~4 MB initramfs holding busybox-static, Debian's ``qemu-ga`` with the host's copies of its libraries, the
virtio/ext4 modules and the init scripts of ``tests/realenv/guest_init``. Packages are fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x``; nothing is installed. The kernel is booted as the
uncompressed ``vmlinux`` through its PVH entry, which skips SeaBIOS and the in-guest decompression. The
image is rebuilt only when missing or when :data:`RECIPE_VERSION` or the init scripts change.

**Guest** (:class:`AgentGuest`): a TCG domain (KVM cannot run a kernel in this sandbox) with one or more
ext4 qcow2 data disks, mounted by the guest on ``/mnt/vda``, ``/mnt/vdb``...; the serial console is logged to
``console.log`` in the guest's directory. Every call on the agent has a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import libvirt
import libvirt_qemu

from tests.realenv.errors import RealEnvError
from tests.realenv.procs import run, wait_until

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the build below changes (the init scripts are fingerprinted by content)
GUEST_INIT = Path(__file__).with_name("guest_init")
KERNEL_META_PACKAGE = "linux-image-amd64"
PACKAGES = ("qemu-guest-agent", "busybox-static")
# Loaded in this order; each one's ``depends=`` must name only modules before it (checked at build time).
# crc32c_generic is ext4's and jbd2's soft dependency (``softdep=pre: crypto-crc32c``).
MODULES = ("virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio", "virtio_pci", "virtio_blk",
           "virtio_console", "crc32c_generic", "jbd2", "mbcache", "crc16", "ext4")
CMDLINE = "console=ttyS0 quiet panic=-1 cryptomgr.notests mitigations=off tsc=reliable no_timer_check"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
NAME_PREFIX = "vmsched-ag-"
DISK_LABEL = "agentdata"
BUILD_INFO = "build-info.json"
# qemu-ga marks its frozen state with this file in its state directory (``-t /run/qemu-ga``, a tmpfs).
FROZEN_MARKER = "/run/qemu-ga/qga.state.isfrozen"
UNDEFINE_FLAGS = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA


# ------------------------------------------------------------------------------------------------ the image


@dataclass(frozen=True)
class GuestImage:
    """A built image: the PVH kernel, the initramfs and what they were built from."""

    directory: Path
    vmlinux: Path
    initrd: Path
    info: dict[str, Any]


def recipe_fingerprint(init_dir: Path = GUEST_INIT) -> str:
    """The recipe version plus a digest of the init scripts: a change of either means a rebuild (pure)."""
    digest = hashlib.sha256()
    for path in sorted(init_dir.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{RECIPE_VERSION}-{digest.hexdigest()[:16]}"


def ensure_image(directory: Path) -> GuestImage:
    """The image in ``directory``, built first when missing or made by another recipe (locked, idempotent)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        image = _cached(directory)
        if image is None:
            started = time.monotonic()
            image = _build(directory)
            log.info("agent guest image built in %.1f s: %s", time.monotonic() - started, directory)
        return image


def _cached(directory: Path) -> GuestImage | None:
    try:
        info = json.loads((directory / BUILD_INFO).read_text())
    except (FileNotFoundError, ValueError):
        return None
    image = GuestImage(directory, directory / "vmlinux", directory / "initrd.img", info)
    if info.get("recipe") != recipe_fingerprint() or not (image.vmlinux.exists() and image.initrd.exists()):
        return None
    return image


def _build(directory: Path) -> GuestImage:
    started = time.monotonic()
    (directory / BUILD_INFO).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=directory) as tmp:
        work = Path(tmp)
        debs = download_packages(work / "debs")
        unpacked = work / "unpacked"
        for deb in debs.values():
            run(["dpkg-deb", "-x", str(deb), str(unpacked)], timeout=300)
        kernel_release = _kernel_release(unpacked)
        tree = work / "initramfs"
        populate_initramfs(tree, unpacked, kernel_release)
        (work / "initrd.img").write_bytes(gzip.compress(cpio_newc(tree_entries(tree)), 6, mtime=0))
        (work / "vmlinux").write_bytes(vmlinux_from_bzimage((unpacked / f"boot/vmlinuz-{kernel_release}").read_bytes()))
        for name in ("vmlinux", "initrd.img"):
            (work / name).replace(directory / name)
    info = {"recipe": recipe_fingerprint(), "kernel": kernel_release, "packages": {p: d.name for p, d in debs.items()},
            "build_seconds": round(time.monotonic() - started, 1)}
    (directory / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return GuestImage(directory, directory / "vmlinux", directory / "initrd.img", info)


def _apt(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # apt-get download writes into the working directory, which procs.run does not take.
    try:
        return subprocess.run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", *argv], cwd=cwd, text=True,
                              capture_output=True, timeout=600, stdin=subprocess.DEVNULL,
                              env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired as exc:
        raise RealEnvError(f"apt-get {' '.join(argv)}: no answer within 600 s") from exc


def download_packages(target: Path) -> dict[str, Path]:
    """``apt-get download`` the kernel (resolved from its meta package) and :data:`PACKAGES`; name -> .deb."""
    target.mkdir(parents=True)
    depends = run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
    kernel = next((m.group(1) for m in re.finditer(r"Depends: (linux-image-\S+)", depends)), None)
    if kernel is None:
        raise RealEnvError(f"apt-cache depends {KERNEL_META_PACKAGE} names no kernel: {depends!r}")
    names = [kernel, *PACKAGES]
    done = _apt(["download", *names], target)
    if done.returncode != 0:  # stale package lists: the pool file moved on
        _apt(["update"], target)
        done = _apt(["download", *names], target)
    if done.returncode != 0:
        raise RealEnvError(f"apt-get download {' '.join(names)} failed: {done.stderr.strip()[-2000:]}")
    debs = {name: next(target.glob(f"{name}_*.deb"), None) for name in names}
    missing = [name for name, deb in debs.items() if deb is None]
    if missing:
        raise RealEnvError(f"apt-get download left no .deb for {', '.join(missing)}")
    return {name: deb for name, deb in debs.items() if deb is not None}


def _kernel_release(unpacked: Path) -> str:
    kernels = sorted(unpacked.glob("boot/vmlinuz-*"))
    if len(kernels) != 1:
        raise RealEnvError(f"expected one kernel in the unpacked packages, found {kernels}")
    return kernels[0].name.removeprefix("vmlinuz-")


def populate_initramfs(tree: Path, unpacked: Path, kernel_release: str) -> None:
    """The initramfs tree: busybox and its applets, qemu-ga and its libraries, modules, init scripts."""
    for sub in ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "etc/agent-guest", "lib/modules", "sbin"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    busybox = unpacked / "bin/busybox"
    _install(busybox, tree / "bin/busybox")
    for applet in run([str(busybox), "--list-full"]).stdout.split():
        link = tree / applet
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(tree / "bin/busybox", link.parent))
    (tree / "init").symlink_to("bin/busybox")
    qemu_ga = unpacked / "usr/sbin/qemu-ga"
    _install(qemu_ga, tree / "usr/sbin/qemu-ga")
    for library in shared_libraries(run(["ldd", str(qemu_ga)]).stdout):
        _install(library, tree / library.relative_to("/"))
    modules = _copy_modules(unpacked / "lib/modules" / kernel_release, tree / "lib/modules")
    (tree / "etc/agent-guest/modules").write_text("".join(m + "\n" for m in modules))
    for script in ("rcS", "rc.shutdown"):
        _install(GUEST_INIT / script, tree / "etc/agent-guest" / script, 0o755)
    _install(GUEST_INIT / "shutdown", tree / "sbin/shutdown", 0o755)
    _install(GUEST_INIT / "inittab", tree / "etc/inittab", 0o644)


def _install(source: Path, target: Path, mode: int | None = None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)  # busybox --list-full may already have put an applet link here
    shutil.copyfile(source, target)
    target.chmod(mode if mode is not None else stat.S_IMODE(source.stat().st_mode) or 0o755)


def shared_libraries(ldd_output: str) -> list[Path]:
    """Absolute library paths named by ``ldd`` output, the dynamic loader included (pure); RealEnvError when
    a library is missing on this machine."""
    missing = re.findall(r"^\s*(\S+) => not found", ldd_output, re.MULTILINE)
    if missing:
        raise RealEnvError(f"qemu-ga needs libraries this machine lacks: {', '.join(missing)}")
    found = []
    for line in ldd_output.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            found.append(Path(match.group(1)))
    return found


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list of a kernel module's .modinfo section (pure)."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d for d in match.group(1).decode().split(",") if d] if match else []


def check_module_order(order: Iterable[str], depends: dict[str, list[str]]) -> None:
    """Raise RealEnvError unless every module's dependencies come before it (pure)."""
    loaded: set[str] = set()
    for name in order:
        missing = [d for d in depends.get(name, []) if d not in loaded]
        if missing:
            raise RealEnvError(f"module {name} needs {', '.join(missing)} loaded before it")
        loaded.add(name)


def _copy_modules(source: Path, target: Path) -> list[str]:
    found = {p.name.removesuffix(".ko"): p for p in source.rglob("*.ko")}
    missing = [m for m in MODULES if m not in found]
    if missing:
        raise RealEnvError(f"kernel modules not in {source}: {', '.join(missing)}")
    check_module_order(MODULES, {m: module_depends(found[m].read_bytes()) for m in MODULES})
    for name in MODULES:
        shutil.copyfile(found[name], target / f"{name}.ko")
    return list(MODULES)


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def tree_entries(tree: Path) -> Iterator[CpioEntry]:
    """Every directory, file and symlink under ``tree`` (parents first) plus ``dev/console``, the stdio of
    init before devtmpfs is mounted."""
    for path in sorted(tree.rglob("*")):
        st = path.lstat()
        name = str(path.relative_to(tree))
        if stat.S_ISLNK(st.st_mode):
            yield CpioEntry(name, st.st_mode, os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            yield CpioEntry(name, st.st_mode)
        else:
            yield CpioEntry(name, st.st_mode, path.read_bytes())
    yield CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A ``newc`` cpio archive (the initramfs format) of ``entries``, uid/gid 0, mtime 0 (pure)."""
    out = bytearray()
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
        out += _pad4(b"070701" + "".join(f"{f:08x}" for f in fields).encode() + name)
        out += _pad4(entry.data)
    return bytes(out)


def bzimage_payload(bzimage: bytes) -> bytes:
    """The compressed kernel inside a bzImage, located by the setup header's payload fields (pure)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise RealEnvError("not a bzImage: no HdrS setup header")
    setup_sectors = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    return bzimage[start:start + length]


def vmlinux_from_bzimage(bzimage: bytes) -> bytes:
    """The ELF ``vmlinux`` (bootable through PVH) from an xz-compressed bzImage."""
    payload = bzimage_payload(bzimage)
    if not payload.startswith(b"\xfd7zXZ\0"):
        raise RealEnvError(f"kernel payload is not xz (starts with {payload[:6]!r})")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)  # one stream; trailing size ignored
    if not elf.startswith(b"\x7fELF"):
        raise RealEnvError("decompressed kernel payload is not an ELF file")
    return elf


# ----------------------------------------------------------------------------------------- disks and XML


def make_data_disk(path: Path, size_mib: int = 128, label: str = DISK_LABEL) -> Path:
    """A qcow2 holding a fresh ext4 (inode tables and journal initialised now, so the guest does not dirty
    blocks in the background later)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_name(path.name + ".raw.tmp")
    try:
        with open(raw, "wb") as f:
            f.truncate(size_mib << 20)
        run(["mkfs.ext4", "-q", "-F", "-L", label, "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw)])
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    finally:
        raw.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def raw_copy(disk: Path, scratch: Path) -> Iterator[Path]:
    """A temporary sparse raw copy of the qcow2 ``disk`` in ``scratch`` (e2fsck and debugfs read only raw)."""
    raw = scratch / (disk.name + f".{secrets.token_hex(4)}.raw")
    try:
        run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(raw)])
        yield raw
    finally:
        raw.unlink(missing_ok=True)


def check_filesystem(disk: Path, scratch: Path) -> str:
    """``e2fsck -fn`` on the ext4 in the (stopped guest's) qcow2 ``disk``; returns its summary line."""
    with raw_copy(disk, scratch) as raw:
        done = run(["e2fsck", "-fn", str(raw)], check=False)
    if done.returncode != 0:
        raise RealEnvError(f"e2fsck -fn {disk} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


def read_disk_file(disk: Path, path: str, scratch: Path) -> bytes | None:
    """The content of ``path`` (relative to the filesystem root) in the ext4 of the qcow2 ``disk``, read with
    ``debugfs`` on the host; None when there is no such file."""
    with raw_copy(disk, scratch) as raw:
        if not run(["debugfs", "-R", f"stat {path}", str(raw)]).stdout:  # debugfs exits 0 either way
            return None
        done = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True, timeout=120,
                              stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise RealEnvError(f"debugfs cat {path} on {disk} exited with {done.returncode}: {done.stderr!r}")
    return done.stdout


def domain_xml(name: str, image: GuestImage, disks: list[Path], console_log: Path, *, memory_mib: int = 128,
               domain_type: str = "qemu") -> str:
    """The domain XML of an agent guest: direct kernel boot, qcow2 disks vda.., agent channel (pure)."""
    disk_xml = "".join(
        f"    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file={quoteattr(str(d))}/>"
        f"<target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>\n" for i, d in enumerate(disks))
    return f"""\
<domain type={quoteattr(domain_type)}>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.vmlinux))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(CMDLINE)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disk_xml}    <controller type='usb' model='none'/>
    <serial type='pty'><log file={quoteattr(str(console_log))} append='off'/></serial>
    <console type='pty'/>
    <channel type='unix'><target type='virtio' name='{AGENT_CHANNEL}'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>
"""


# ----------------------------------------------------------------------------------------------- the guest


@dataclass(frozen=True)
class ExecResult:
    """A finished ``guest-exec``: exit code (None when killed by a signal), signal, decoded output."""

    exitcode: int | None
    signal: int | None
    out: bytes
    err: bytes


def exec_result(status: dict[str, Any]) -> ExecResult | None:
    """The result in a ``guest-exec-status`` reply, or None while the process runs (pure)."""
    if not status.get("exited"):
        return None
    return ExecResult(exitcode=status.get("exitcode"), signal=status.get("signal"),
                      out=base64.b64decode(status.get("out-data", "")),
                      err=base64.b64decode(status.get("err-data", "")))


def agent_request(execute: str, arguments: dict[str, Any] | None = None) -> str:
    """The JSON text of one agent command (pure)."""
    return json.dumps({"execute": execute, **({"arguments": arguments} if arguments is not None else {})})


class AgentGuest:
    """A defined agent guest on one host's libvirt: its domain, files and agent."""

    def __init__(self, conn: libvirt.virConnect, host: str, name: str, directory: Path, disks: list[Path]) -> None:
        self.conn, self.host, self.name, self.directory, self.disks = conn, host, name, directory, disks
        self.console_log = directory / "console.log"
        self.boot_seconds: float | None = None  # of the last start: from create() to the agent's first answer

    @classmethod
    def define(cls, conn: libvirt.virConnect, host: str, image: GuestImage, directory: Path, *,
               name: str | None = None, disk_count: int = 1, disk_mib: int = 128) -> AgentGuest:
        """Create ``disk_count`` ext4 qcow2 disks in ``directory/NAME`` and define the domain (not started)."""
        name = name or NAME_PREFIX + secrets.token_hex(4)
        own = directory / name
        disks = [make_data_disk(own / f"vd{chr(ord('a') + i)}.qcow2", disk_mib) for i in range(disk_count)]
        guest = cls(conn, host, name, own, disks)
        conn.defineXML(domain_xml(name, image, disks, guest.console_log))
        return guest

    @property
    def dom(self) -> libvirt.virDomain:
        return self.conn.lookupByName(self.name)

    def start(self, timeout: float = 60) -> float:
        """Start the domain and wait for the agent; returns seconds from start to the first answer."""
        started = time.monotonic()
        self.dom.create()
        self.wait_agent(timeout, started)
        self.boot_seconds = time.monotonic() - started
        return self.boot_seconds

    def wait_agent(self, timeout: float = 60, started: float | None = None) -> None:
        """Poll ``guest-ping`` every 50 ms until the agent answers (RealEnvError with the console at timeout)."""
        deadline = (started or time.monotonic()) + timeout
        while True:
            try:
                libvirt_qemu.qemuAgentCommand(self.dom, agent_request("guest-ping"), 1, 0)
                return
            except libvirt.libvirtError as exc:
                if time.monotonic() > deadline:
                    raise RealEnvError(f"{self.name}: agent silent after {timeout:g} s ({exc}); console:\n"
                                       f"{self.console()[-3000:]}") from exc
            time.sleep(0.05)

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, text: str, timeout: float = 30) -> str:
        """Wait until the serial console log contains ``text``; returns the log."""
        wait_until(lambda: text in self.console(), timeout, f"{text!r} on {self.name}'s console", interval=0.05)
        return self.console()

    def command(self, execute: str, arguments: dict[str, Any] | None = None, timeout: int = 10) -> Any:
        """One agent command; returns its ``return`` value (RealEnvError when the agent refuses or is silent)."""
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.dom, agent_request(execute, arguments), timeout, 0)
        except libvirt.libvirtError as exc:
            raise RealEnvError(f"{self.name}: {execute} failed: {exc}") from exc
        return json.loads(reply)["return"]

    def spawn(self, argv: list[str], stdin: bytes | None = None, capture: bool = True) -> int:
        """Start ``argv`` in the guest (``argv[0]`` absolute or found in PATH); returns the guest pid."""
        arguments: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": capture}
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        return int(self.command("guest-exec", arguments)["pid"])

    def exec_status(self, pid: int) -> ExecResult | None:
        return exec_result(self.command("guest-exec-status", {"pid": pid}))

    def wait_exec(self, pid: int, timeout: float = 30) -> ExecResult:
        deadline = time.monotonic() + timeout
        while (result := self.exec_status(pid)) is None:
            if time.monotonic() > deadline:
                raise RealEnvError(f"{self.name}: guest process {pid} still running after {timeout:g} s")
            time.sleep(0.02)
        return result

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float = 30, check: bool = True) -> ExecResult:
        """Run ``argv`` in the guest to its end; with ``check``, a non-zero exit raises RealEnvError."""
        result = self.wait_exec(self.spawn(argv, stdin), timeout)
        if check and result.exitcode != 0:
            raise RealEnvError(f"{self.name}: {argv} exited with {result.exitcode} (signal {result.signal}): "
                               f"{result.err.decode(errors='replace')[-2000:]}")
        return result

    def write_file(self, path: str, data: bytes, timeout: float = 30) -> None:
        """Write ``data`` to ``path`` in the guest and ``sync`` (the bytes travel in one agent message)."""
        self.run(["/bin/sh", "-c", 'cat > "$1" && sync', "sh", path], stdin=data, timeout=timeout)

    def sha256(self, path: str, timeout: float = 30) -> str:
        return self.run(["sha256sum", path], timeout=timeout).out.decode().split()[0]

    def start_write_on_freeze(self, path: str, text: str, tag: str = "vmsched-writer", hold: float = 1.0) -> int:
        """Start a guest process that waits until the agent is frozen, then writes ``text`` to ``path`` and
        syncs; returns its guest pid.

        It prints ``TAG: writing`` on the console just before the write, ``TAG: waited`` ``hold`` seconds
        later and ``TAG: done`` once the write and sync returned, so ``waited`` before ``done`` shows that
        the freeze held the write back. It waits for the agent's frozen marker, which qemu-ga creates just
        before it freezes the filesystems, plus 0.2 s for the freeze itself.
        """
        script = f"""\
say() {{ echo "{tag}: $1 [$(cut -d' ' -f1 /proc/uptime)]" > /dev/console; }}
while [ ! -e {FROZEN_MARKER} ]; do usleep 20000; done
usleep 200000
say writing
( printf %s "$2" > "$1" && sync && say done ) &
sleep {hold:g}
say waited
wait $!
"""
        return self.spawn(["/bin/sh", "-c", script, "sh", path, text])

    def fsfreeze_status(self) -> str:
        """``frozen`` or ``thawed`` (``guest-fsfreeze-status``; answered even while frozen)."""
        return str(self.command("guest-fsfreeze-status"))

    def destroy(self) -> None:
        dom = self.dom
        if dom.isActive():
            dom.destroy()

    def remove(self) -> None:
        """Destroy and undefine the domain if it still exists, then delete the guest's files."""
        try:
            self.destroy()
            self.dom.undefineFlags(UNDEFINE_FLAGS)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
        shutil.rmtree(self.directory, ignore_errors=True)
