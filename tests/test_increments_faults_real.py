"""Faults during MODE=INCREMENT chains, through a real daemon (the one of tests/test_backup_faults_real.py,
which gives up at the first failure), with tiny TCG domains on host1 whose two disks are qcow2.

Each case starts from a chain of two links (base 0, increment 1) and then:

* a disk is attached to the domain (and the domain imported again, which is how vmsched learns of it): the
  next backup cannot continue the chain, so it is the full base of a new chain in a new image, with the
  reason in the image's ``NEW_CHAIN_REASON`` and in the run's message; the old chain is kept as it was and
  the new one goes on;
* the backup server goes away while increment 2 is being uploaded, or the increment is cancelled then
  (``one.vm.backupcancel``): the run ends given up (as retryable, in the run journal) or cancelled, the
  chain image and the VM's chain pointers are as before, and the guest is left as the chain needs it.
  Increment 2, taken again once the server is back, holds what the guest wrote before and during the
  failed run as well as after it.

"As the chain needs it": the domain runs on its own files (no overlay, no staging dir, no backup job), its
libvirt checkpoints are exactly vmsched's last two links (or the one of a new base), and every disk has
exactly those checkpoints' dirty bitmaps, recording, neither busy nor inconsistent (read from QEMU with
``query-named-block-nodes``, not through vmsched's drivers).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.test_backup_faults_real import (
    SLOW,
    Faults,
    Forwarder,
    backup,
    entries,
    fault_daemon,
    last_run,
    wait_run,
    wait_upload,
)
from tests.test_backup_real import RUNNING, Setup, backup_ids, same_image, snapshot_copy, states

pytestmark = pytest.mark.realenv
INCREMENT = 'BACKUP_CONFIG = [ MODE = "INCREMENT" ]'
FAST = 'RSYNC_ARGS = "-aS"'
VDC_BACKEND = "/machine/peripheral/virtio-disk2/virtio-backend"  # libvirt's alias of a third virtio disk


@pytest.fixture(scope="module")
def incfaults(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    yield from fault_daemon(realenv, tmp_path_factory, "vmsched-incfault")


# ---- what the chain and the guest look like ---------------------------------------------------------------


def links(s: Setup, image_id: int) -> list[tuple[int, str, int, str]]:
    """(ID, TYPE, PARENT_ID, SOURCE) of each link of the chain image."""
    return [(int(i.findtext("ID") or ""), i.findtext("TYPE") or "", int(i.findtext("PARENT_ID") or ""),
             i.findtext("SOURCE") or "") for i in s.image(image_id).iterfind("BACKUP_INCREMENTS/INCREMENT")]


def pointers(s: Setup, vm_id: int) -> tuple[int, int]:
    """The VM's INCREMENTAL_BACKUP_ID and LAST_INCREMENT_ID."""
    config = s.api.vm(vm_id).find("BACKUPS/BACKUP_CONFIG")
    assert config is not None
    return int(config.findtext("INCREMENTAL_BACKUP_ID") or "-9"), int(config.findtext("LAST_INCREMENT_ID") or "-9")


def bitmaps(hypervisor: Hypervisor, dom: TinyDomain) -> dict[str, list[str]]:
    """Disk file name -> names of its dirty bitmaps, as the domain's QEMU has them; an unusable bitmap
    (not recording, busy in a job, inconsistent) fails the test."""
    reply = libvirt_qemu.qemuMonitorCommand(hypervisor.lookup(dom), json.dumps(
        {"execute": "query-named-block-nodes", "arguments": {"flat": True}}), 0)
    found: dict[str, list[str]] = {}
    for node in json.loads(reply)["return"]:
        if node.get("drv") != "qcow2" or not str(node.get("file", "")).startswith(str(dom.directory)):
            continue
        for bitmap in node.get("dirty-bitmaps", []):
            assert bitmap.get("recording") and not bitmap.get("busy") and not bitmap.get("inconsistent"), \
                (node["file"], bitmap)
        found[Path(node["file"]).name] = sorted(b["name"] for b in node.get("dirty-bitmaps", []))
    return found


def outcome(s: Setup, run_id: int) -> str:
    """The run journal's outcome of run ``run_id`` (retryable, permanent, cancelled...), read from the state
    file (a WAL reader does not disturb the daemon)."""
    db = sqlite3.connect(f"file:{s.api.daemon.state_dir / 'vmsched.db'}?mode=ro", uri=True, timeout=5)
    try:
        [(kind,)] = db.execute("SELECT outcome FROM runs WHERE id = ?", (run_id,)).fetchall()
    finally:
        db.close()
    return str(kind)


def as_the_chain_needs(s: Setup, hypervisor: Hypervisor, dom: TinyDomain, vm_id: int, disks: dict[str, Path],
                       checkpoints: list[int]) -> None:
    """Running on its own ``disks``, RUNNING, nothing of a run left; vmsched's checkpoints and every disk's
    bitmaps are exactly ``checkpoints``."""
    names = [f"vmsched-{vm_id}-{n}" for n in checkpoints]
    assert hypervisor.disk_sources(dom) == disks
    assert not list(dom.directory.glob("*vmsched*"))  # no overlay beside the disks
    assert s.on_host1(["test", "-e", f"{s.staging}/{vm_id}"]).returncode == 1  # no staging dir
    assert hypervisor.lookup(dom).jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE  # no backup job left running
    assert states(s.api, vm_id) == RUNNING and hypervisor.state(dom) == "running"
    assert hypervisor.checkpoints(dom) == names
    assert bitmaps(hypervisor, dom) == {path.name: names for path in disks.values()}


def own_disks(dom: TinyDomain) -> dict[str, Path]:
    return {"vda": dom.vda, "vdb": dom.vdb}


def two_links(s: Setup, dom: TinyDomain, vm_id: int, ds_id: int, hypervisor: Hypervisor) -> int:
    """Base 0 and increment 1 of the VM's chain in ``ds_id``; the chain image."""
    for n, what in enumerate(["live full base of a new chain", "live increment 1"]):
        hypervisor.write_pattern(dom, "vda", pattern=0x21 + n, offset=f"{4 * n}M", length="1M")
        hypervisor.write_pattern(dom, "vdb", pattern=0x31 + n, offset=f"{n}M", length="512k")
        status = backup(s.api, vm_id, ds_id)
        assert status["STATE"] == "done" and str(status["MESSAGE"]).startswith(what), status
    image_id, last = pointers(s, vm_id)
    assert last == 1 and [link[:3] for link in links(s, image_id)] == [(0, "FULL", -1), (1, "INCREMENT", 0)]
    return image_id


def failing_datastore(incfaults: Faults, fault: str, prefix: str) -> tuple[Forwarder | None, int]:
    """An rsync datastore through a forwarder the test can stop (``server_gone``), or straight to the server;
    (the forwarder or None, the datastore id)."""
    if fault == "server_gone":
        forwarder = incfaults.forwarder()
        return forwarder, incfaults.rsync_datastore(f"{prefix}gone", forwarder.port)
    return None, incfaults.rsync_datastore(f"{prefix}slow", incfaults.s.realenv.backup.ssh_port)


def snapshot_overlays(dom: TinyDomain, vm_id: int, n: int) -> dict[str, Path]:
    """INCREMENT_MODE=SNAPSHOT: overlay ``n`` of each disk."""
    return {target: Path(f"{disk}.vmsched-snap.{vm_id}.{n}") for target, disk in own_disks(dom).items()}


def incremental_vm(s: Setup, tiny_domain: Callable[..., TinyDomain]) -> tuple[TinyDomain, int]:
    dom = tiny_domain("host1", vdb_format="qcow2")
    vm_id = s.api.import_one("host1", dom.name)
    s.api.call("one.vm.updateconf", vm_id, INCREMENT, 1)
    return dom, vm_id


def restored(s: Setup, images_ds: int, image_id: int, increment: int, disk_id: int) -> Path:
    """The file one.image.restore makes of disk ``disk_id`` of the chain at ``increment``."""
    reply = str(s.api.call("one.image.restore", image_id, images_ds,
                           f'INCREMENT_ID = "{increment}"\nDISK_ID = "{disk_id}"\nNAME = "r{image_id}-{increment}-{disk_id}"'))
    [restored_id] = map(int, reply.split()[1:])
    return Path(s.image(restored_id).findtext("SOURCE") or "")


# ---- the tests ----------------------------------------------------------------------------------------------


def test_a_disk_attached_between_two_increments_starts_a_new_chain(
        incfaults: Faults, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    s, host1 = incfaults.s, hypervisors("host1")
    dom, vm_id = incremental_vm(s, tiny_domain)
    first = two_links(s, dom, vm_id, s.fs_ds, host1)
    first_links = links(s, first)
    as_the_chain_needs(s, host1, dom, vm_id, own_disks(dom), [0, 1])

    vdc = dom.directory / "vdc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vdc), "16M"], check=True, timeout=30)
    host1.lookup(dom).attachDeviceFlags(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{vdc}'/>"
        "<target dev='vdc' bus='virtio'/></disk>",
        libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    for command in ("write -P 0x77 1M 1M", "flush"):  # the guest writes its new disk (as write_pattern does)
        out = libvirt_qemu.qemuMonitorCommand(host1.lookup(dom), f'qemu-io -d {VDC_BACKEND} "{command}"',
                                              libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        assert "error" not in out.lower(), out
    [result] = s.api.import_domains("host1", [dom.name])  # how vmsched learns of the new disk
    assert (result["STATUS"], result["ID"]) == ("updated", vm_id), result
    assert [d.findtext("TARGET") for d in s.api.vm(vm_id).iterfind("TEMPLATE/DISK")] == ["vda", "vdb", "vdc"]
    vdc_then = snapshot_copy(vdc, tmp_path / "vdc.then", "qcow2")

    status = backup(s.api, vm_id, s.fs_ds)
    assert status["STATE"] == "done", f"{status}\n{s.api.daemon.log()[-3000:]}"
    reason = f"the disks backed up changed (chain image {first} has 0, 1, the VM now backs up 0, 1, 2)"
    assert str(status["MESSAGE"]).startswith(f"live full base of a new chain ({reason}) of VM {vm_id}"), status
    ids = backup_ids(s.api, vm_id)
    assert ids[0] == first and len(ids) == 2
    second = ids[1]
    assert s.image(second).findtext("TEMPLATE/NEW_CHAIN_REASON") == reason
    assert [link[:3] for link in links(s, second)] == [(0, "FULL", -1)]
    assert [i.text for i in s.image(second).iterfind("BACKUP_DISK_IDS/ID")] == ["0", "1", "2"]
    assert links(s, first) == first_links  # the old chain is kept as it was, every link of it
    assert pointers(s, vm_id) == (second, 0)
    base_dir = s.fs_base / str(vm_id) / links(s, second)[0][3]
    assert same_image(base_dir / "disk.2.0", vdc_then)  # the new disk is in the new base
    disks = {**own_disks(dom), "vdc": vdc}
    as_the_chain_needs(s, host1, dom, vm_id, disks, [0])  # the old chain's checkpoints went; vdc has a bitmap

    status = backup(s.api, vm_id, s.fs_ds)  # and the new chain goes on
    assert status["STATE"] == "done" and str(status["MESSAGE"]).startswith("live increment 1 of"), status
    assert pointers(s, vm_id) == (second, 1) and backup_ids(s.api, vm_id) == [first, second]
    assert [link[:3] for link in links(s, second)] == [(0, "FULL", -1), (1, "INCREMENT", 0)]
    assert links(s, first) == first_links
    as_the_chain_needs(s, host1, dom, vm_id, disks, [0, 1])


@pytest.mark.parametrize("fault", ["server_gone", "cancelled"])
def test_an_increment_that_fails_mid_upload_leaves_the_chain_as_it_was(
        incfaults: Faults, fault: str, tiny_domain: Callable[..., TinyDomain],
        hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    s, host1 = incfaults.s, hypervisors("host1")
    forwarder, ds_id = failing_datastore(incfaults, fault, "inc")
    dom, vm_id = incremental_vm(s, tiny_domain)
    image_id = two_links(s, dom, vm_id, ds_id, host1)
    chain = links(s, image_id)
    vm_dir = s.rsync_base / str(vm_id)
    assert entries(vm_dir) == sorted(link[3] for link in chain)
    images = s.image_ids()

    host1.write_pattern(dom, "vda", pattern=0x44, offset="16M", length="3M")  # a few MiB: slow to upload
    s.api.call("one.datastore.update", ds_id, SLOW, 1)
    before = last_run(s.api, vm_id)
    s.api.call("one.vm.backup", vm_id, ds_id, False)
    partial = wait_upload(vm_dir)  # checkpoint 2 exists, the job has ended, increment 2 is on its way
    host1.write_pattern(dom, "vdb", pattern=0x45, offset="20M", length="1M")  # written during the failed run
    if fault == "server_gone":
        forwarder.stop()  # gone: not even the partial upload can be removed now
        status = wait_run(s.api, vm_id, before)
        assert status["STATE"] == "given_up", status
        assert "`rsync " in status["MESSAGE"] and "rsync error: " in status["MESSAGE"], status
        assert partial.exists()  # left on the server, unrecorded: the next upload there must clear it
    else:
        s.api.call("one.vm.backupcancel", vm_id)
        status = wait_run(s.api, vm_id, before, until=("cancelled", "done", "given_up"))
        assert (status["STATE"], status["MESSAGE"]) == ("cancelled", "cancelled"), status
        assert outcome(s, status["ID"]) == "cancelled"
        assert entries(vm_dir) == sorted(link[3] for link in chain)  # its upload was removed
    # no half chain: the image, its links and the VM's pointers are as before the run
    assert links(s, image_id) == chain and pointers(s, vm_id) == (image_id, 1)
    assert s.image_ids() == images and backup_ids(s.api, vm_id) == [image_id]
    as_the_chain_needs(s, host1, dom, vm_id, own_disks(dom), [0, 1])  # checkpoint 2 and its bitmaps went

    if fault == "server_gone":
        forwarder.listen()  # the server is back
    s.api.call("one.datastore.update", ds_id, FAST, 1)
    host1.write_pattern(dom, "vda", pattern=0x46, offset="30M", length="1M")  # and after it
    then = (snapshot_copy(dom.vda, tmp_path / "vda.then", "qcow2"), snapshot_copy(dom.vdb, tmp_path / "vdb.then", "qcow2"))
    status = backup(s.api, vm_id, ds_id)
    assert status["STATE"] == "done", f"{status}\n{s.api.daemon.log()[-3000:]}"
    assert str(status["MESSAGE"]).startswith(f"live increment 2 of VM {vm_id}"), status
    assert pointers(s, vm_id) == (image_id, 2)
    assert links(s, image_id)[:2] == chain and [link[:3] for link in links(s, image_id)][2] == (2, "INCREMENT", 1)
    assert not partial.exists(), f"the partial upload of the failed run is still there: {partial}"
    assert entries(vm_dir) == sorted(link[3] for link in links(s, image_id))
    as_the_chain_needs(s, host1, dom, vm_id, own_disks(dom), [1, 2])
    images_ds = s.datastore(f'NAME = "incimg-{fault}"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\n'
                            f'BASE_PATH = "{tmp_path / "images"}"')
    for disk_id, disk_then in enumerate(then):  # what changed before, during and after the failed run is in it
        assert same_image(restored(s, images_ds, image_id, 2, disk_id), disk_then), f"disk {disk_id} at increment 2"


def test_an_increment_whose_backup_server_is_lost_may_be_retried(
        incfaults: Faults, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor]) -> None:
    s, host1 = incfaults.s, hypervisors("host1")
    forwarder = incfaults.forwarder()
    ds_id = incfaults.rsync_datastore("incretry", forwarder.port)
    dom, vm_id = incremental_vm(s, tiny_domain)
    status = backup(s.api, vm_id, ds_id)
    assert status["STATE"] == "done", status
    host1.write_pattern(dom, "vda", pattern=0x51, offset="16M", length="3M")
    s.api.call("one.datastore.update", ds_id, SLOW, 1)
    before = last_run(s.api, vm_id)
    s.api.call("one.vm.backup", vm_id, ds_id, False)
    wait_upload(s.rsync_base / str(vm_id))
    forwarder.sever()  # the connection drops; the server itself is reachable again at once
    status = wait_run(s.api, vm_id, before)
    assert status["STATE"] == "given_up" and "rsync error: " in status["MESSAGE"], status  # MAX = 0 here
    assert outcome(s, status["ID"]) == "retryable"  # under a retry policy it would be tried again


@pytest.mark.parametrize("fault", ["server_gone", "cancelled"])
def test_a_snapshot_increment_that_fails_mid_upload_leaves_the_vm_on_its_overlay(
        incfaults: Faults, fault: str, tiny_domain: Callable[..., TinyDomain],
        hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    """INCREMENT_MODE=SNAPSHOT: the failed run's overlay is committed back into the one it was put on, so the
    domain runs on ``[overlay 2, disk]`` again and the retried increment 2 holds everything written since 1."""
    s, host1 = incfaults.s, hypervisors("host1")
    forwarder, ds_id = failing_datastore(incfaults, fault, "snap")
    dom = tiny_domain("host1", vdb_format="qcow2")
    vm_id = s.api.import_one("host1", dom.name)
    s.api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ MODE = "INCREMENT", INCREMENT_MODE = "SNAPSHOT" ]', 1)
    image_id = two_links(s, dom, vm_id, ds_id, host1)
    chain = links(s, image_id)
    overlays = snapshot_overlays(dom, vm_id, 2)
    assert host1.disk_sources(dom) == overlays

    host1.write_pattern(dom, "vda", pattern=0x54, offset="16M", length="3M")
    s.api.call("one.datastore.update", ds_id, SLOW, 1)
    before = last_run(s.api, vm_id)
    s.api.call("one.vm.backup", vm_id, ds_id, False)
    wait_upload(s.rsync_base / str(vm_id))  # overlay 3 is on top, a copy of overlay 2 on its way
    assert host1.disk_sources(dom) == snapshot_overlays(dom, vm_id, 3)
    host1.write_pattern(dom, "vdb", pattern=0x55, offset="20M", length="1M")  # lands in overlay 3
    if fault == "server_gone":
        forwarder.stop()
        assert wait_run(s.api, vm_id, before)["STATE"] == "given_up"
    else:
        s.api.call("one.vm.backupcancel", vm_id)
        status = wait_run(s.api, vm_id, before, until=("cancelled", "done", "given_up"))
        assert status["STATE"] == "cancelled", status
    assert links(s, image_id) == chain and pointers(s, vm_id) == (image_id, 1)
    assert host1.disk_sources(dom) == overlays and host1.state(dom) == "running"
    assert sorted(p.name for p in dom.directory.glob("*vmsched*")) == sorted(p.name for p in overlays.values())
    assert host1.lookup(dom).jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE

    if fault == "server_gone":
        forwarder.listen()
    s.api.call("one.datastore.update", ds_id, FAST, 1)
    host1.write_pattern(dom, "vda", pattern=0x56, offset="30M", length="1M")
    then = [snapshot_copy(path, tmp_path / f"{target}.then", "qcow2") for target, path in overlays.items()]
    status = backup(s.api, vm_id, ds_id)
    assert str(status["MESSAGE"]).startswith(f"live increment 2 of VM {vm_id}"), status
    assert host1.disk_sources(dom) == snapshot_overlays(dom, vm_id, 3)
    images_ds = s.datastore(f'NAME = "snapimg-{fault}"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\n'
                            f'BASE_PATH = "{tmp_path / "images"}"')
    for disk_id, disk_then in enumerate(then):  # before, during and after the failed run
        assert same_image(restored(s, images_ds, image_id, 2, disk_id), disk_then), f"disk {disk_id} at increment 2"
