"""The agent test guest: its pure build pieces (always) and a real guest answering its agent (marked realenv).

The realenv tests share one guest per module (the ``agent_guest`` fixture); each leaves it thawed.
"""

from __future__ import annotations

import base64
import hashlib
import lzma
import os
import stat
import struct
from pathlib import Path
from xml.etree import ElementTree

import libvirt
import pytest

from tests.realenv import agentguest
from tests.realenv.agentguest import AgentGuest, GuestImage
from tests.realenv.errors import RealEnvError

BOOT_DEADLINE = 30.0  # seconds from create() to the agent's first answer; ~3.5 s measured under TCG

# ---------------------------------------------------------------------------------------------- pure pieces


def test_recipe_fingerprint_changes_with_the_init_scripts(tmp_path: Path) -> None:
    (tmp_path / "rcS").write_text("echo one\n")
    first = agentguest.recipe_fingerprint(tmp_path)
    assert agentguest.recipe_fingerprint(tmp_path) == first
    assert first.startswith(f"{agentguest.RECIPE_VERSION}-")
    (tmp_path / "rcS").write_text("echo two\n")
    assert agentguest.recipe_fingerprint(tmp_path) != first


def test_shared_libraries_come_from_ldd_output() -> None:
    ldd = ("\tlinux-vdso.so.1 (0x00007ffd)\n"
           "\tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x00007f1)\n"
           "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n"
           "\t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n")
    assert agentguest.shared_libraries(ldd) == [Path("/lib/x86_64-linux-gnu/libglib-2.0.so.0"),
                                                Path("/lib/x86_64-linux-gnu/libc.so.6"),
                                                Path("/lib64/ld-linux-x86-64.so.2")]


def test_shared_libraries_refuses_a_missing_library() -> None:
    with pytest.raises(RealEnvError, match="liburing.so.2"):
        agentguest.shared_libraries("\tliburing.so.2 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n")


@pytest.mark.parametrize(("modinfo", "depends"), [
    (b"\0license=GPL\0depends=virtio_ring,virtio\0intree=Y\0", ["virtio_ring", "virtio"]),
    (b"\0softdep=pre: crypto-crc32c\0depends=\0name=jbd2\0", []),
    (b"\0name=crc16\0", []),
])
def test_module_depends_reads_modinfo(modinfo: bytes, depends: list[str]) -> None:
    assert agentguest.module_depends(b"\x7fELF..." + modinfo) == depends


@pytest.mark.parametrize(("order", "error"), [
    (["virtio_ring", "virtio", "virtio_blk"], None),
    (["virtio", "virtio_ring", "virtio_blk"], "virtio needs virtio_ring"),
    (["virtio_ring", "virtio_blk"], "virtio_blk needs virtio loaded"),
])
def test_check_module_order(order: list[str], error: str | None) -> None:
    depends = {"virtio": ["virtio_ring"], "virtio_blk": ["virtio", "virtio_ring"]}
    if error is None:
        agentguest.check_module_order(order, depends)
    else:
        with pytest.raises(RealEnvError, match=error):
            agentguest.check_module_order(order, depends)


def _read_newc(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    entries, pos = [], 0
    while True:
        assert archive[pos:pos + 6] == b"070701" and pos % 4 == 0
        fields = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name = archive[pos + 110:pos + 110 + namesize - 1].decode()
        start = pos + 110 + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            assert start == len(archive)
            return entries
        entries.append((name, mode, archive[start:start + size], rdev))
        pos = start + size + (-size % 4)


def test_cpio_newc_round_trips_files_links_and_devices(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/busybox").write_bytes(b"\x7fELF-odd-length")
    (tmp_path / "init").symlink_to("bin/busybox")
    archive = agentguest.cpio_newc(agentguest.tree_entries(tmp_path))
    entries = {name: (stat.S_IFMT(mode), data, rdev) for name, mode, data, rdev in _read_newc(archive)}
    assert entries == {
        "bin": (stat.S_IFDIR, b"", (0, 0)),
        "bin/busybox": (stat.S_IFREG, b"\x7fELF-odd-length", (0, 0)),
        "init": (stat.S_IFLNK, b"bin/busybox", (0, 0)),
        "dev/console": (stat.S_IFCHR, b"", (5, 1)),
    }
    assert [name for name, *_ in _read_newc(archive)][-1] == "dev/console"  # after its parent dir exists


def _bzimage(payload: bytes, setup_sectors: int = 2) -> bytes:
    image = bytearray((setup_sectors + 1) * 512 + 64)
    image[0x1F1] = setup_sectors
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, 64, len(payload))
    return bytes(image[:(setup_sectors + 1) * 512 + 64]) + payload + b"\0\0\0\0"


def test_vmlinux_is_the_xz_payload_of_the_bzimage() -> None:
    elf = b"\x7fELF" + os.urandom(3000)
    assert agentguest.vmlinux_from_bzimage(_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ))) == elf


@pytest.mark.parametrize(("image", "error"), [
    (b"\0" * 4096, "no HdrS"),
    (_bzimage(b"\x1f\x8b gzip payload"), "not xz"),
    (_bzimage(lzma.compress(b"not an elf", format=lzma.FORMAT_XZ)), "not an ELF"),
])
def test_vmlinux_rejects_other_kernels(image: bytes, error: str) -> None:
    with pytest.raises(RealEnvError, match=error):
        agentguest.vmlinux_from_bzimage(image)


@pytest.mark.parametrize(("status", "result"), [
    ({"exited": False}, None),
    ({"exited": True, "exitcode": 0, "out-data": base64.b64encode(b"ok\n").decode()},
     agentguest.ExecResult(0, None, b"ok\n", b"")),
    ({"exited": True, "exitcode": 3, "err-data": base64.b64encode(b"bad").decode()},
     agentguest.ExecResult(3, None, b"", b"bad")),
    ({"exited": True, "signal": 9}, agentguest.ExecResult(None, 9, b"", b"")),
])
def test_exec_result_decodes_guest_exec_status(status: dict, result: agentguest.ExecResult | None) -> None:
    assert agentguest.exec_result(status) == result


def test_domain_xml_boots_the_kernel_directly_with_the_agent_channel() -> None:
    image = GuestImage(Path("/img"), Path("/img/vmlinux"), Path("/img/initrd.img"), {})
    xml = agentguest.domain_xml("g<1", image, [Path("/d/vda.qcow2"), Path("/d/vdb.qcow2")], Path("/d/console.log"))
    root = ElementTree.fromstring(xml)
    assert (root.get("type"), root.findtext("name")) == ("qemu", "g<1")
    assert (root.findtext("os/kernel"), root.findtext("os/initrd")) == ("/img/vmlinux", "/img/initrd.img")
    assert "console=ttyS0" in root.findtext("os/cmdline")
    assert root.find("cpu") is None  # host-passthrough breaks under kvm_pvm; TCG needs none
    disks = [(d.find("target").get("dev"), d.find("driver").get("type"), d.find("source").get("file"))
             for d in root.iterfind("devices/disk")]
    assert disks == [("vda", "qcow2", "/d/vda.qcow2"), ("vdb", "qcow2", "/d/vdb.qcow2")]
    assert root.find("devices/serial/log").get("file") == "/d/console.log"
    assert root.find("devices/channel/target").get("name") == agentguest.AGENT_CHANNEL


# ------------------------------------------------------------------------------------------ the real guest


@pytest.mark.realenv
def test_guest_boots_and_its_agent_answers(agent_guest: AgentGuest) -> None:
    assert agent_guest.boot_seconds is not None and agent_guest.boot_seconds < BOOT_DEADLINE
    print(f"\n{agent_guest.name}: agent answered {agent_guest.boot_seconds:.2f} s after start")
    assert "mounted /dev/vda on /mnt/vda" in agent_guest.console()
    assert agent_guest.command("guest-info")["version"]
    assert agent_guest.dom.fsInfo() == [("/mnt/vda", "vda", "ext4", ["vda"])]


@pytest.mark.realenv
def test_guest_exec_writes_a_file_and_reads_its_sha256(agent_guest: AgentGuest) -> None:
    data = os.urandom(64 * 1024)
    agent_guest.write_file("/mnt/vda/random.bin", data)
    assert agent_guest.sha256("/mnt/vda/random.bin") == hashlib.sha256(data).hexdigest()
    assert agent_guest.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False) == agentguest.ExecResult(
        3, None, b"out\n", b"err\n")
    with pytest.raises(RealEnvError, match="exited with 1"):
        agent_guest.run(["false"])


@pytest.mark.realenv
def test_fsfreeze_holds_a_write_back_until_thaw(agent_guest: AgentGuest) -> None:
    dom = agent_guest.dom
    assert agent_guest.fsfreeze_status() == "thawed"
    pid = agent_guest.start_write_on_freeze("/mnt/vda/during-freeze", "during", tag="hold-writer")
    frozen = dom.fsFreeze()
    assert frozen >= 1
    assert agent_guest.fsfreeze_status() == "frozen"
    console = agent_guest.wait_console("hold-writer: waited")  # 1 s of guest time after the write began
    assert "hold-writer: writing" in console and "hold-writer: done" not in console
    assert dom.fsThaw() == frozen
    assert agent_guest.wait_exec(pid).exitcode == 0
    console = agent_guest.console()
    assert console.index("hold-writer: waited") < console.index("hold-writer: done")
    assert agent_guest.sha256("/mnt/vda/during-freeze") == hashlib.sha256(b"during").hexdigest()
    assert agent_guest.fsfreeze_status() == "thawed"


@pytest.mark.realenv
def test_freeze_is_refused_while_frozen_and_thaw_is_idempotent(agent_guest: AgentGuest) -> None:
    dom = agent_guest.dom
    frozen = dom.fsFreeze()
    assert frozen >= 1
    with pytest.raises(libvirt.libvirtError, match="agent is in frozen state") as second:
        dom.fsFreeze()
    assert second.value.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR
    with pytest.raises(RealEnvError, match="guest-exec has been disabled"):
        agent_guest.run(["true"])
    assert agent_guest.fsfreeze_status() == "frozen"  # how a scheduler finds a guest left frozen
    assert dom.fsThaw() == frozen
    assert dom.fsThaw() == 0
    assert agent_guest.fsfreeze_status() == "thawed"


@pytest.mark.realenv
def test_disk_destroyed_while_frozen_is_consistent(agent_guest: AgentGuest, tmp_path: Path) -> None:
    data = os.urandom(128 * 1024)
    agent_guest.write_file("/mnt/vda/before.bin", data)
    agent_guest.start_write_on_freeze("/mnt/vda/held-back", "late", tag="destroy-writer")
    assert agent_guest.dom.fsFreeze() >= 1
    agent_guest.wait_console("destroy-writer: writing")
    agent_guest.destroy()  # the agent_guest fixture boots it again for the next test
    assert "agentdata" in agentguest.check_filesystem(agent_guest.disks[0], tmp_path)
    assert agentguest.read_disk_file(agent_guest.disks[0], "/before.bin", tmp_path) == data
    assert agentguest.read_disk_file(agent_guest.disks[0], "/held-back", tmp_path) is None
