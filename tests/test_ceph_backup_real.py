"""Full backups of a VM with a qcow2 file disk and a Ceph RBD disk, against the real single-node Ceph: one run
snapshots both in one quiesce window (the file disk by an external overlay, the RBD disk by ``rbd snap create
vmsched-<run>``), converts the RBD snapshot straight from the cluster (``qemu-img convert rbd:…``), removes
vmsched's snapshot and no other; a powered-off VM's RBD image is converted as it is.

What the RBD disk must hold comes from outside the code under test: an ``rbd export`` of the image taken just
before the backup (the guest idle), compared with the restored disk by ``qemu-img compare``.
"""

from __future__ import annotations

import base64
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from drivers.tm import rbdplan
from drivers.tm.rbdplan import RbdAccess, RbdSource
from tests.conftest import start_daemon
from tests.realenv import ceph as ceph_env
from tests.realenv.ceph import CephCluster, RbdDomain, guest_write
from tests.realenv.domains import Hypervisor
from tests.test_backup_crash_real import Env, env, register, wait_done  # noqa: F401 - env is a fixture
from tests.test_backup_faults_real import backup
from tests.test_backup_real import Setup, same_image, setup  # noqa: F401 - setup is a fixture
from tests.test_import_real import Api
from tests.test_increments_real import wait_state

pytestmark = pytest.mark.realenv


@pytest.fixture
def rbd_domain(ceph: CephCluster, hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> Iterator[RbdDomain]:
    """A running TCG domain on host1: qcow2 vda and vdb, and vdc on a new 32 MiB RBD image."""
    with ceph_env.rbd_domain(ceph, hypervisors("host1"), tmp_path / "d") as domain:
        yield domain


def snapshots(ceph: CephCluster, image: str) -> list[str]:
    return rbdplan.parse_snapshots(ceph.run("rbd", "snap", "ls", "--format", "json", f"{ceph.pool}/{image}").stdout)


def restored_disk(s: Setup, image_id: int, disk_id: int, name: str) -> Path:
    reply = str(s.api.call("one.image.restore", image_id, s.image_ds, f'DISK_ID = "{disk_id}"\nNAME = "{name}"'))
    [restored] = map(int, reply.split()[1:])
    return Path(s.image(restored).findtext("SOURCE") or "")


def test_a_vm_with_a_file_disk_and_an_rbd_disk_backs_up_in_one_run_live_and_off(
        setup: Setup, ceph: CephCluster, rbd_domain: RbdDomain, hypervisors: Callable[[str], Hypervisor],  # noqa: F811
        tmp_path: Path) -> None:
    s, d = setup, rbd_domain
    s.api.call("one.host.update", s.api.hosts["host1"], f'CEPH_CONF = "{ceph.conf}"', 1)  # how host1 reaches it
    vm_id = s.api.import_one("host1", d.name)
    vdc = next(v for v in s.api.vm(vm_id).iterfind("TEMPLATE/DISK") if v.findtext("TARGET") == "vdc")
    assert (vdc.findtext("TYPE"), vdc.findtext("SOURCE"), vdc.findtext("CEPH_USER")) == (
        "RBD", f"{ceph.pool}/{d.image}", ceph.client)

    guest_write(d.dom, "vdc", 0x71, "2M", "1M")
    guest_write(d.dom, "vda", 0x61, "4M", "1M")
    before = tmp_path / "vdc.before"
    ceph.run("rbd", "export", "--no-progress", f"{ceph.pool}/{d.image}", str(before))
    ceph.run("rbd", "snap", "create", "--no-progress", f"{ceph.pool}/{d.image}@theirs")  # never touched
    status = backup(s.api, vm_id, s.rsync_ds)
    assert status["STATE"] == "done" and "live backup" in str(status["MESSAGE"]), (status, s.api.daemon.log()[-3000:])
    assert snapshots(ceph, d.image) == ["theirs"]  # vmsched's snapshot is gone once the disk is staged
    assert f"snap create --no-progress {ceph.pool}/{d.image}@vmsched-" in s.api.daemon.log()  # it was there
    [image_id] = [int(i.text or "") for i in s.api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    image = s.image(image_id)
    assert {c.findtext("FILE") for c in image.iterfind("TEMPLATE/CHECKSUMS")} >= {"disk.0.0", "disk.1.0", "disk.2.0"}
    assert [i.text for i in image.iterfind("BACKUP_DISK_IDS/ID")] == ["0", "1", "2"]
    assert same_image(restored_disk(s, image_id, 2, "rbd-live"), before)
    sources = [src.get("file") or src.get("name") for src in etree.fromstring(d.dom.XMLDesc()).iterfind(
        "devices/disk/source")]
    assert sources[0] == str(d.vda)  # the file disk runs on its own file again (its overlay committed)

    d.dom.destroy()  # powered off: the image is converted as it is, no snapshot
    wait_state(s.api, vm_id, "8")
    source = RbdSource(2, "vdc", ceph.pool, d.image, RbdAccess(ceph.client, conf=str(ceph.conf)))
    written = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x72 6M 1M", rbdplan.qemu_rbd_name(source)],
                             capture_output=True, text=True, timeout=60)
    assert written.returncode == 0, written.stderr
    off = tmp_path / "vdc.off"
    ceph.run("rbd", "export", "--no-progress", f"{ceph.pool}/{d.image}", str(off))
    status = backup(s.api, vm_id, s.rsync_ds)
    assert status["STATE"] == "done" and "cold backup" in str(status["MESSAGE"]), status
    assert snapshots(ceph, d.image) == ["theirs"]
    latest = max(int(i.text or "") for i in s.api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID"))
    assert same_image(restored_disk(s, latest, 2, "rbd-off"), off)
    assert not same_image(off, before)


@pytest.mark.parametrize("point", ["snapshot", "converted"])
def test_kill_9_with_an_rbd_snapshot_taken_then_restart(env: Env, point: str, ceph: CephCluster,  # noqa: F811
                                                        rbd_domain: RbdDomain, tmp_path: Path) -> None:
    """The daemon dies once the RBD disk's snapshot exists (``snapshot``) or once it is staged (``converted``):
    the restarted daemon removes vmsched's snapshot (and only it) before it listens, and the retried backup
    succeeds and leaves none."""
    d = rbd_domain
    ceph.run("rbd", "snap", "create", "--no-progress", f"{ceph.pool}/{d.image}@theirs")
    state = tmp_path / "state"
    first = start_daemon(state, env.config(), extra_env={"VMSCHED_CRASH_AT": point})
    api = Api(first, {})
    try:
        _, ds_id = register(api, env, env.base / f"rbd-{point}")
        api.call("one.host.update", api.hosts["host1"], f'CEPH_CONF = "{ceph.conf}"', 1)
        vm_id = api.import_one("host1", d.name)
        api.call("one.vm.backup", vm_id, ds_id, False)
        assert first.process.wait(timeout=90) == -signal.SIGKILL, first.log()[-3000:]
    finally:
        first.stop(signal.SIGKILL)
    assert f"crash point '{point}' reached" in first.log()
    left = [name for name in snapshots(ceph, d.image) if name != "theirs"]
    assert len(left) == 1 and rbdplan.snapshot_run(left[0]) is not None  # the dead run's snapshot is there

    second = start_daemon(state, env.config())
    api.daemon = second
    try:
        assert left[0] not in snapshots(ceph, d.image)  # removed by the recovery, before the daemon listens
        status = wait_done(api, vm_id)
        assert status["STATE"] == "done", (status, second.log()[-3000:])
        assert snapshots(ceph, d.image) == ["theirs"]
    finally:
        assert second.stop() == 0, second.log()[-3000:]
    assert "Traceback" not in second.log()


def test_a_wrong_key_fails_the_backup_naming_the_disk_and_pool_and_leaves_nothing(
        setup: Setup, ceph: CephCluster, rbd_domain: RbdDomain, tmp_path: Path) -> None:  # noqa: F811
    s, d = setup, rbd_domain
    wrong = tmp_path / "wrong.key"
    wrong.write_text(base64.b64encode(b"0123456789abcdef").decode())  # a key cephx will not accept
    vm_id = s.api.import_one("host1", d.name)
    s.api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ FS_FREEZE = "SUSPEND" ]', 1)
    s.api.call("one.host.update", s.api.hosts["host1"], f'CEPH_CONF = "{ceph.conf}"\nCEPH_KEY = "{wrong}"', 1)
    try:
        images = s.image_ids()
        status = backup(s.api, vm_id, s.rsync_ds)
        assert status["STATE"] != "done", status
        message = str(status["MESSAGE"])
        assert f"RBD disk 2 (vdc, pool {ceph.pool}, image {d.image}): snapshot failed" in message, message
    finally:
        s.api.call("one.host.update", s.api.hosts["host1"], 'CEPH_KEY = ""', 1)
    assert snapshots(ceph, d.image) == []  # nothing was snapshotted, nothing is left
    assert s.image_ids() == images and not list(s.api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID"))
    assert d.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING  # resumed after the failed snapshot
    sources = [src.get("file") for src in etree.fromstring(d.dom.XMLDesc()).iterfind("devices/disk/source")]
    assert sources[0] == str(d.vda)  # the file disk's overlay of that window was committed back


@pytest.mark.parametrize("kind", ["fs", "restic"])
def test_the_rbd_disk_of_a_mixed_vm_backs_up_into_fs_and_restic_too(
        setup: Setup, kind: str, ceph: CephCluster, rbd_domain: RbdDomain, tmp_path: Path) -> None:  # noqa: F811
    s, d = setup, rbd_domain
    if kind == "fs":
        ds_id = s.fs_ds
    else:
        backup_server = s.realenv.backup
        ds_id = s.datastore(f'NAME = "rbdrestic-{uuid.uuid4().hex[:6]}"\nTYPE = "BACKUP_DS"\nDS_MAD = "restic"\n'
                            f'BASE_PATH = "{s.rsync_base / f"restic-{uuid.uuid4().hex[:8]}"}"\n'  # removed with it
                            f'RESTIC_SFTP_SERVER = "{backup_server.address}"\nRESTIC_SFTP_USER = "{backup_server.user}"\n'
                            f'RESTIC_SFTP_PORT = "{backup_server.ssh_port}"\nRESTIC_PASSWORD = "rbd-test-pass"')
    s.api.call("one.host.update", s.api.hosts["host1"], f'CEPH_CONF = "{ceph.conf}"', 1)
    vm_id = s.api.import_one("host1", d.name)
    guest_write(d.dom, "vdc", 0x73 if kind == "fs" else 0x74, "3M", "2M")
    before = tmp_path / "vdc.before"
    ceph.run("rbd", "export", "--no-progress", f"{ceph.pool}/{d.image}", str(before))
    status = backup(s.api, vm_id, ds_id)
    assert status["STATE"] == "done", (status, s.api.daemon.log()[-3000:])
    assert snapshots(ceph, d.image) == []
    latest = max(int(i.text or "") for i in s.api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID"))
    assert same_image(restored_disk(s, latest, 2, f"rbd-{kind}"), before)
