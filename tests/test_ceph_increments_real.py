"""Increment chains of a VM with a qcow2 file disk and a Ceph RBD disk, against the real single-node Ceph: the RBD
disk's base is its whole image at snapshot ``vmsched-chain-<vm>-0``, increment n what ``rbd diff`` reports between
anchors n-1 and n, stored as a qcow2 link; the cluster keeps only the last recorded increment's snapshot.

What each restore point must hold comes from outside the code under test: an ``rbd export`` of the image taken just
before each backup (the guest idle), compared with the restored disk by ``qemu-img compare``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from drivers.tm import rbdplan
from drivers.tm.rbdplan import RbdAccess, RbdSource
from tests.conftest import start_daemon
from tests.realenv.ceph import CephCluster, RbdDomain, guest_write
from tests.test_backup_crash_real import Env, env, register, wait_done  # noqa: F401 - env is a fixture
from tests.test_backup_faults_real import backup
from tests.test_backup_real import Setup, same_image, setup  # noqa: F401 - setup is a fixture
from tests.test_ceph_backup_real import rbd_domain, snapshots  # noqa: F401 - rbd_domain is a fixture
from tests.test_import_real import Api
from tests.test_increments_real import wait_state

pytestmark = pytest.mark.realenv

THEIRS = "theirs"  # a snapshot that is not vmsched's: never touched


def exported(ceph: CephCluster, image: str, path: Path) -> Path:
    ceph.run("rbd", "export", "--no-progress", f"{ceph.pool}/{image}", str(path))
    return path


def restic_ds(s: Setup) -> int:
    server = s.realenv.backup
    return s.datastore(f'NAME = "rbdchain-{uuid.uuid4().hex[:6]}"\nTYPE = "BACKUP_DS"\nDS_MAD = "restic"\n'
                       f'BASE_PATH = "{s.rsync_base / f"restic-{uuid.uuid4().hex[:8]}"}"\n'
                       f'RESTIC_SFTP_SERVER = "{server.address}"\nRESTIC_SFTP_USER = "{server.user}"\n'
                       f'RESTIC_SFTP_PORT = "{server.ssh_port}"\nRESTIC_PASSWORD = "rbd-chain-pass"')


def chain_of(s: Setup, vm_id: int) -> tuple[int, int]:
    config = s.api.vm(vm_id).find("BACKUPS/BACKUP_CONFIG")
    assert config is not None
    return int(config.findtext("INCREMENTAL_BACKUP_ID") or "-1"), int(config.findtext("LAST_INCREMENT_ID") or "-1")


def restore_point(s: Setup, image_id: int, increment: int, disk_id: int, name: str) -> Path:
    reply = str(s.api.call("one.image.restore", image_id, s.image_ds,
                           f'INCREMENT_ID = "{increment}"\nDISK_ID = "{disk_id}"\nNAME = "{name}"'))
    [restored] = map(int, reply.split()[1:])
    return Path(s.image(restored).findtext("SOURCE") or "")


def increment_sizes(s: Setup, image_id: int) -> dict[int, int]:
    return {int(i.findtext("ID") or "-1"): int(i.findtext("SIZE") or "-1")
            for i in s.image(image_id).iterfind("BACKUP_INCREMENTS/INCREMENT")}


def begin(s: Setup, ceph: CephCluster, d: RbdDomain, config: str = "") -> int:
    s.api.call("one.host.update", s.api.hosts["host1"], f'CEPH_CONF = "{ceph.conf}"', 1)
    vm_id = s.api.import_one("host1", d.name)
    s.api.call("one.vm.updateconf", vm_id, f'BACKUP_CONFIG = [ MODE = "INCREMENT"{config} ]', 1)
    ceph.run("rbd", "snap", "create", "--no-progress", f"{ceph.pool}/{d.image}@{THEIRS}")
    return vm_id


@pytest.mark.parametrize("kind", ["rsync", "restic"])
def test_a_mixed_vm_builds_a_chain_and_every_rbd_restore_point_is_bit_identical(
        setup: Setup, kind: str, ceph: CephCluster, rbd_domain: RbdDomain, tmp_path: Path) -> None:  # noqa: F811
    s, d = setup, rbd_domain
    ds_id = s.rsync_ds if kind == "rsync" else restic_ds(s)
    vm_id = begin(s, ceph, d)
    guest_write(d.dom, "vdc", 0x3F, "0", "32M")  # every RBD object exists, as on a disk in use (see rbdplan.parse_diff)
    expected: dict[int, Path] = {}
    for n in range(4):
        guest_write(d.dom, "vdc", 0x40 + n, f"{3 * n}M", "1M")  # 1 MiB more at a new place each time
        guest_write(d.dom, "vdc", 0x50 + n, "20M", "64k")  # and the same 64 KiB rewritten
        guest_write(d.dom, "vda", 0x60 + n, f"{n}M", "512k")
        expected[n] = exported(ceph, d.image, tmp_path / f"vdc.{n}")
        status = backup(s.api, vm_id, ds_id)
        assert status["STATE"] == "done", (status, s.api.daemon.log()[-3000:])
        assert ("full base of a new chain" if n == 0 else f"increment {n}") in str(status["MESSAGE"]), status
        assert sorted(snapshots(ceph, d.image)) == [THEIRS, f"vmsched-chain-{vm_id}-{n}"]  # the anchor only
    image_id, last = chain_of(s, vm_id)
    assert last == 3
    sizes = increment_sizes(s, image_id)
    assert all(sizes[n] <= 3 for n in (1, 2, 3)), sizes  # MB: what changed (1 MiB + 64 KiB per disk), not 32 MiB
    for n, path in expected.items():
        assert same_image(restore_point(s, image_id, n, 2, f"rbdchain-{kind}-{n}"), path), n


@pytest.mark.parametrize("kind", ["rsync", "restic"])
def test_scheduled_backups_build_the_rbd_chain(setup: Setup, kind: str, ceph: CephCluster,  # noqa: F811
                                               rbd_domain: RbdDomain, tmp_path: Path) -> None:  # noqa: F811
    """SCHED_ACTIONs fired by the engine, not one.vm.backup: each adds a link of the RBD disk too."""
    s, d = setup, rbd_domain
    ds_id = s.rsync_ds if kind == "rsync" else restic_ds(s)
    vm_id = begin(s, ceph, d)
    for n in range(3):
        guest_write(d.dom, "vdc", 0x30 + n, f"{4 * n + 1}M", "1M")
        expected = exported(ceph, d.image, tmp_path / f"vdc.{n}")
        ok, message = s.api.run_action(vm_id, "backup", f"{ds_id},0")
        assert ok, message
    image_id, last = chain_of(s, vm_id)
    assert last == 2 and sorted(increment_sizes(s, image_id)) == [0, 1, 2]
    # the action's DONE commits with the record; the older anchor goes just after it
    deadline = time.monotonic() + 30
    while sorted(snapshots(ceph, d.image)) != [THEIRS, f"vmsched-chain-{vm_id}-2"]:
        assert time.monotonic() < deadline, snapshots(ceph, d.image)
        time.sleep(0.1)
    assert same_image(restore_point(s, image_id, 2, 2, f"rbdsched-{kind}"), expected)


def test_an_rbd_anchor_removed_by_hand_starts_a_new_chain_with_the_reason(
        setup: Setup, ceph: CephCluster, rbd_domain: RbdDomain, tmp_path: Path) -> None:  # noqa: F811
    s, d = setup, rbd_domain
    vm_id = begin(s, ceph, d)
    for _ in range(2):
        assert backup(s.api, vm_id, s.rsync_ds)["STATE"] == "done"
    first, _ = chain_of(s, vm_id)
    ceph.run("rbd", "snap", "rm", "--no-progress", f"{ceph.pool}/{d.image}@vmsched-chain-{vm_id}-1")
    guest_write(d.dom, "vdc", 0x7A, "5M", "1M")
    expected = exported(ceph, d.image, tmp_path / "vdc")
    status = backup(s.api, vm_id, s.rsync_ds)
    assert status["STATE"] == "done", (status, s.api.daemon.log()[-3000:])
    message = str(status["MESSAGE"])
    assert "full base of a new chain" in message and f"{ceph.pool}/{d.image}@vmsched-chain-{vm_id}-1" in message
    second, last = chain_of(s, vm_id)
    assert second != first and last == 0
    assert sorted(snapshots(ceph, d.image)) == [THEIRS, f"vmsched-chain-{vm_id}-0"]
    assert same_image(restore_point(s, second, 0, 2, "rbd-healed"), expected)


def test_keep_last_3_on_an_rbd_chain_of_10_keeps_exactly_3_restore_points(
        setup: Setup, ceph: CephCluster, rbd_domain: RbdDomain, tmp_path: Path) -> None:  # noqa: F811
    s, d = setup, rbd_domain
    vm_id = begin(s, ceph, d, ', KEEP_LAST = "3"')
    expected: dict[int, Path] = {}
    for n in range(10):
        guest_write(d.dom, "vdc", 0x20 + n, f"{(3 * n) % 30}M", "1M")
        expected[n] = exported(ceph, d.image, tmp_path / f"vdc.{n}")
        status = backup(s.api, vm_id, s.rsync_ds)
        assert status["STATE"] == "done", (status, s.api.daemon.log()[-3000:])
    image_id, last = chain_of(s, vm_id)
    assert last == 9
    assert sorted(increment_sizes(s, image_id)) == [7, 8, 9]  # the base is increment 7, merged from 0-7
    assert sorted(snapshots(ceph, d.image)) == [THEIRS, f"vmsched-chain-{vm_id}-9"]
    for n in (7, 8, 9):
        assert same_image(restore_point(s, image_id, n, 2, f"rbdkeep-{n}"), expected[n]), n


def test_a_powered_off_vm_takes_rbd_increments_too(
        setup: Setup, ceph: CephCluster, rbd_domain: RbdDomain, tmp_path: Path) -> None:  # noqa: F811
    s, d = setup, rbd_domain
    vm_id = begin(s, ceph, d)
    assert backup(s.api, vm_id, s.rsync_ds)["STATE"] == "done"
    d.dom.destroy()
    wait_state(s.api, vm_id, "8")
    write(RbdSource(2, "vdc", ceph.pool, d.image, RbdAccess(ceph.client, conf=str(ceph.conf))), ["write -P 0x7C 9M 2M"])
    expected = exported(ceph, d.image, tmp_path / "vdc.off")
    status = backup(s.api, vm_id, s.rsync_ds)
    assert status["STATE"] == "done" and "cold increment 1" in str(status["MESSAGE"]), status
    image_id, _ = chain_of(s, vm_id)
    assert same_image(restore_point(s, image_id, 1, 2, "rbd-off-1"), expected)
    assert sorted(snapshots(ceph, d.image)) == [THEIRS, f"vmsched-chain-{vm_id}-1"]


def test_a_full_backup_ends_the_rbd_chain_and_removes_its_anchor(
        setup: Setup, ceph: CephCluster, rbd_domain: RbdDomain) -> None:  # noqa: F811
    s, d = setup, rbd_domain
    vm_id = begin(s, ceph, d)
    assert backup(s.api, vm_id, s.rsync_ds)["STATE"] == "done"
    assert sorted(snapshots(ceph, d.image)) == [THEIRS, f"vmsched-chain-{vm_id}-0"]
    s.api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ MODE = "FULL" ]', 1)
    status = backup(s.api, vm_id, s.rsync_ds)
    assert status["STATE"] == "done" and "live backup" in str(status["MESSAGE"]), status
    assert snapshots(ceph, d.image) == [THEIRS]


def test_kill_9_with_an_increments_rbd_snapshot_taken_keeps_the_anchor_and_the_retry_continues_the_chain(
        env: Env, ceph: CephCluster, rbd_domain: RbdDomain, tmp_path: Path) -> None:  # noqa: F811
    """The daemon dies once increment 1's snapshot exists: the restarted daemon removes that snapshot (the run was
    not recorded) and keeps anchor 0, and the retried run is increment 1 of the same chain."""
    d = rbd_domain
    state = tmp_path / "state"
    first = start_daemon(state, env.config())
    api = Api(first, {})
    try:
        _, ds_id = register(api, env, env.base / "rbd-chain-crash")
        api.call("one.host.update", api.hosts["host1"], f'CEPH_CONF = "{ceph.conf}"', 1)
        vm_id = api.import_one("host1", d.name)
        api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ MODE = "INCREMENT" ]', 1)
        api.call("one.vm.backup", vm_id, ds_id, False)
        assert wait_done(api, vm_id)["STATE"] == "done"
        config = api.vm(vm_id).find("BACKUPS/BACKUP_CONFIG")
        assert config is not None
        chain = config.findtext("INCREMENTAL_BACKUP_ID")
    finally:
        assert first.stop() == 0, first.log()[-3000:]
    second = start_daemon(state, env.config(), extra_env={"VMSCHED_CRASH_AT": "snapshot"})
    api.daemon = second
    try:
        api.call("one.vm.backup", vm_id, ds_id, False)
        assert second.process.wait(timeout=90) == -signal.SIGKILL, second.log()[-3000:]
    finally:
        second.stop(signal.SIGKILL)
    assert sorted(snapshots(ceph, d.image)) == [f"vmsched-chain-{vm_id}-0", f"vmsched-chain-{vm_id}-1"]
    third = start_daemon(state, env.config())
    api.daemon = third
    try:
        assert snapshots(ceph, d.image) == [f"vmsched-chain-{vm_id}-0"]  # removed before the daemon listens
        status = wait_done(api, vm_id)
        assert status["STATE"] == "done" and "increment 1" in str(status["MESSAGE"]), (status, third.log()[-3000:])
        assert snapshots(ceph, d.image) == [f"vmsched-chain-{vm_id}-1"]
        config = api.vm(vm_id).find("BACKUPS/BACKUP_CONFIG")
        assert config is not None and (config.findtext("INCREMENTAL_BACKUP_ID"), config.findtext("LAST_INCREMENT_ID")) \
            == (chain, "1")  # the same chain went on
    finally:
        assert third.stop() == 0, third.log()[-3000:]
    assert "Traceback" not in third.log()


def write(source: RbdSource, commands: list[str]) -> None:
    argv = ["qemu-io", "-f", "raw", *(a for c in commands for a in ("-c", c)), rbdplan.qemu_rbd_name(source)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_rbd_diff_extents_are_what_rbd_reports_between_two_snapshots(ceph: CephCluster) -> None:
    """parse_diff and the chosen cluster size on the real tool's output: 4 KiB writes 1 MiB apart stay small."""
    image = f"t-{uuid.uuid4().hex[:8]}"
    spec = f"{ceph.pool}/{image}"
    source = RbdSource(0, "vda", ceph.pool, image, RbdAccess(ceph.client, conf=str(ceph.conf)))
    ceph.run("rbd", "create", "--size", "16M", spec)
    try:
        write(source, ["write -P 0x11 0 16M"])  # every object exists before snapshot a (else a new object is
        ceph.run("rbd", "snap", "create", "--no-progress", f"{spec}@a")  # reported whole, up to its last byte)
        write(source, [f"write -P 0x33 {k}M 4k" for k in range(8)])
        ceph.run("rbd", "snap", "create", "--no-progress", f"{spec}@b")
        argv = rbdplan.diff_argv(source, "a", "b")
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
        extents = rbdplan.parse_diff(out)
        assert extents == [(k << 20, 4096) for k in range(8)], json.loads(out)
        assert rbdplan.link_cluster_size(extents) == 4096
    finally:
        ceph.run("rbd", "snap", "purge", "--no-progress", spec, check=False)
        ceph.run("rbd", "rm", "--no-progress", spec, check=False)
