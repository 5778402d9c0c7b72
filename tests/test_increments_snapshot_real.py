"""INCREMENT_MODE=SNAPSHOT against the real environment: between two backups the VM runs on one qcow2 overlay
per disk (``<disk>.vmsched-snap.<vm>.<n>``), each increment is a copy of the overlay the snapshot froze, and
once it is recorded that overlay is committed into the disk.

What each restore point must hold comes from outside the code under test: a ``qemu-img convert`` of the file
the domain runs on, taken just before each backup. What the domain runs on is read from libvirt and from
``qemu-img info --backing-chain``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.realenv.domains import Hypervisor, TinyDomain
from tests.test_backup_real import same_image, snapshot_copy
from tests.test_increments_real import (  # noqa: F401 - chains is a fixture
    Chains,
    chains,
    check_restore_points,
    increments,
    wait_state,
)
from tests.test_restore_real import wait_run

pytestmark = pytest.mark.realenv
SNAPSHOT = 'BACKUP_CONFIG = [ MODE = "INCREMENT", INCREMENT_MODE = "SNAPSHOT" ]'


def overlay(base: Path, vm_id: int, n: int) -> Path:
    return Path(f"{base}.vmsched-snap.{vm_id}.{n}")


def chain_of(path: Path) -> list[str]:
    """The files a disk reads, top first."""
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return [str(info["filename"]) for info in json.loads(out)]


def leftovers(dom: TinyDomain) -> list[str]:
    """vmsched's files beside the domain's disks."""
    return sorted(p.name for disk in (dom.vda, dom.vdb) for p in disk.parent.glob(f"{disk.name}.vmsched-*"))


def runs_on(host: Hypervisor, dom: TinyDomain, vm_id: int, n: int) -> None:
    """Each disk runs on exactly ``[overlay n, disk]``, and no other vmsched file is left beside it."""
    sources = host.disk_sources(dom)
    assert sources == {"vda": overlay(dom.vda, vm_id, n), "vdb": overlay(dom.vdb, vm_id, n)}, sources
    for target, base in (("vda", dom.vda), ("vdb", dom.vdb)):
        assert chain_of(sources[target]) == [str(overlay(base, vm_id, n)), str(base)]
    assert leftovers(dom) == sorted([overlay(dom.vda, vm_id, n).name, overlay(dom.vdb, vm_id, n).name])


def copies(host: Hypervisor, dom: TinyDomain, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """Both disks as the guest sees them now (through whatever overlay they run on)."""
    sources = host.disk_sources(dom)
    return (snapshot_copy(sources["vda"], tmp_path / f"vda.{name}", "qcow2"),
            snapshot_copy(sources["vdb"], tmp_path / f"vdb.{name}", "qcow2"))


def snapshot_vm(chains: Chains, tiny_domain: Callable[..., TinyDomain], *,  # noqa: F811
                start: bool = True) -> tuple[TinyDomain, int]:
    dom = tiny_domain("host1", start=start, vdb_format="qcow2")
    vm_id = chains.api.import_one("host1", dom.name)
    chains.api.call("one.vm.updateconf", vm_id, SNAPSHOT, 1)
    return dom, vm_id


@pytest.mark.parametrize("kind", ["fs", "rsync", "restic"])
def test_a_snapshot_chain_runs_the_vm_on_one_overlay_and_restores_at_each_increment(
        chains: Chains, kind: str, tiny_domain: Callable[..., TinyDomain],  # noqa: F811
        hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    host1 = hypervisors("host1")
    dom, vm_id = snapshot_vm(chains, tiny_domain)
    before = {}
    for n in range(3):
        host1.write_pattern(dom, "vda", pattern=0x71 + n, offset=f"{12 * n}M", length="1M")
        host1.write_pattern(dom, "vdb", pattern=0x81 + n, offset=f"{n}M", length="512k")
        before[n] = copies(host1, dom, tmp_path, str(n))
        message = chains.backup(vm_id, kind)
        assert ("live full base of a new chain" if n == 0 else f"live increment {n}") in message, message
        runs_on(host1, dom, vm_id, n + 1)  # overlay n committed into the disk once increment n is recorded
    assert host1.checkpoints(dom) == [] and host1.state(dom) == "running"
    assert same_image(dom.vda, before[2][0]) and same_image(dom.vdb, before[2][1])  # the disks hold it all
    image_id, last = chains.pointers(vm_id)
    assert last == 2
    links = increments(chains.image(image_id))
    assert [(i, t, p) for i, t, p, _, _ in links] == [(0, "FULL", -1), (1, "INCREMENT", 0), (2, "INCREMENT", 1)]
    assert all(size <= 3 for *_, size in links[1:]), links  # MB: what was written (1.5 MiB), not the disks
    check_restore_points(chains, image_id, before, f"snap-{kind}")

    host1.write_pattern(dom, "vda", pattern=0x7F, offset="40M", length="1M")  # lands in overlay 3
    now = copies(host1, dom, tmp_path, "now")
    chains.api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ MODE = "INCREMENT", INCREMENT_MODE = "CBT" ]', 1)
    assert chains.pointers(vm_id) == (-1, -1)  # checkpoints cannot continue a chain of overlays
    message = chains.backup(vm_id, kind)
    assert "live full base of a new chain" in message, message
    assert host1.disk_sources(dom) == {"vda": dom.vda, "vdb": dom.vdb} and leftovers(dom) == []
    assert chain_of(dom.vda) == [str(dom.vda)] and host1.checkpoints(dom) == [f"vmsched-{vm_id}-0"]
    assert same_image(dom.vda, now[0]) and same_image(dom.vdb, now[1])  # folding lost no write

    chains.api.call("one.vm.updateconf", vm_id, SNAPSHOT, 1)  # and back: the CBT checkpoints go
    assert "live full base of a new chain" in chains.backup(vm_id, kind)
    runs_on(host1, dom, vm_id, 1)
    assert host1.checkpoints(dom) == []


def test_a_powered_off_vm_keeps_its_overlay_in_its_definition_and_starts_on_it(
        chains: Chains, tiny_domain: Callable[..., TinyDomain],  # noqa: F811
        hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    host1 = hypervisors("host1")
    dom, vm_id = snapshot_vm(chains, tiny_domain, start=False)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 1M", str(dom.vda)], check=True, capture_output=True)
    at = {0: copies(host1, dom, tmp_path, "0")}
    assert "cold full base of a new chain" in chains.backup(vm_id, "fs")
    runs_on(host1, dom, vm_id, 1)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x45 20M 2M", str(overlay(dom.vda, vm_id, 1))],
                   check=True, capture_output=True)  # what the guest would write while it runs
    at[1] = copies(host1, dom, tmp_path, "1")
    assert "cold increment 1" in chains.backup(vm_id, "fs")
    runs_on(host1, dom, vm_id, 2)
    host1.start(dom)  # libvirt starts the guest on its overlay
    wait_state(chains.api, vm_id, "3")
    host1.write_pattern(dom, "vda", pattern=0x46, offset="30M", length="1M")
    at[2] = copies(host1, dom, tmp_path, "2")
    assert "live increment 2" in chains.backup(vm_id, "fs")
    runs_on(host1, dom, vm_id, 3)
    image_id, last = chains.pointers(vm_id)
    assert last == 2 and increments(chains.image(image_id))[1][4] <= 3
    check_restore_points(chains, image_id, at, "snapcold")

    host1.destroy(dom)  # a restore in place of the middle increment: the disks, not the overlays, replaced
    wait_state(chains.api, vm_id, "8")
    chains.api.call("one.vm.restore", vm_id, image_id, 1, -1)
    status = wait_run(chains, "vmsched.vm.restorestatus", vm_id)  # type: ignore[arg-type]
    assert status["STATE"] == "done", f"{status}\n{chains.api.daemon.log()[-3000:]}"
    assert host1.disk_sources(dom) == {"vda": dom.vda, "vdb": dom.vdb} and leftovers(dom) == []
    assert same_image(dom.vda, at[1][0]) and same_image(dom.vdb, at[1][1])
    assert chains.pointers(vm_id) == (-1, -1)
    host1.start(dom)
    wait_state(chains.api, vm_id, "3")
    assert "live full base of a new chain" in chains.backup(vm_id, "fs")
    runs_on(host1, dom, vm_id, 1)


def test_a_snapshot_chain_survives_a_vm_restart_and_keep_last_keeps_k_points(
        chains: Chains, tiny_domain: Callable[..., TinyDomain],  # noqa: F811
        hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    host1 = hypervisors("host1")
    dom, vm_id = snapshot_vm(chains, tiny_domain)
    chains.api.call("one.vm.updateconf", vm_id,
                    'BACKUP_CONFIG = [ MODE = "INCREMENT", INCREMENT_MODE = "SNAPSHOT", KEEP_LAST = "2" ]', 1)
    at = {}
    for n in range(4):
        host1.write_pattern(dom, "vda", pattern=0x91 + n, offset=f"{8 * n}M", length="1M")
        at[n] = copies(host1, dom, tmp_path, str(n))
        message = chains.backup(vm_id, "rsync")
        assert ("full base" if n == 0 else f"live increment {n}") in message, message
        if n == 1:  # a restart of the guest: libvirt's definition names the overlay, the chain goes on
            host1.destroy(dom)
            wait_state(chains.api, vm_id, "8")
            host1.start(dom)
            wait_state(chains.api, vm_id, "3")
            runs_on(host1, dom, vm_id, 2)
    runs_on(host1, dom, vm_id, 4)
    image_id, last = chains.pointers(vm_id)
    assert last == 3
    check_restore_points(chains, image_id, {2: at[2], 3: at[3]}, "snapkeep")
