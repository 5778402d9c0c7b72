"""drivers.tm.rbdplan: vmsched's RBD snapshot names, the RBD source of a domain's disk, the ``rbd`` and
``qemu-img`` argv (pure); then those argv run on a hypervisor host against the real single-node Ceph."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from drivers.tm import rbdplan
from drivers.tm.rbdplan import RbdAccess, RbdSource, RbdTimeouts
from drivers.vmm.domainxml import Disk, NetworkHost
from scheduler.errors import ValidationError
from tests.realenv.ceph import CephCluster
from tests.realenv.model import RealEnv

MiB = 1 << 20
SOURCE = RbdSource(0, "vda", "one", "one-7-0", RbdAccess("libvirt", "/etc/ceph/k", "/etc/ceph/c.conf", ("m1:6789",)))


def test_snapshot_names_are_the_runs_and_only_those_are_removed() -> None:
    assert rbdplan.snapshot_name(42) == "vmsched-42"
    assert rbdplan.snapshot_run("vmsched-42") == "42" and rbdplan.snapshot_run("one_backup_3") is None
    assert rbdplan.snapshot_run("vmsched-") is None and rbdplan.snapshot_run("vmsched-a b") is None
    with pytest.raises(ValidationError, match="not vmsched's"):
        rbdplan.snap_remove_argv(SOURCE, "nightly")
    with pytest.raises(ValidationError, match="plain token"):
        rbdplan.snapshot_name("1;rm")


def test_chain_anchors_are_named_by_vm_and_increment_and_may_be_removed() -> None:
    from drivers.tm.plan import chain_snapshot_name, parse_chain_snapshot
    assert chain_snapshot_name(7, 3) == "vmsched-chain-7-3" and parse_chain_snapshot("vmsched-chain-7-3") == (7, 3)
    assert parse_chain_snapshot("vmsched-42") is None and parse_chain_snapshot("vmsched-chain-7-x") is None
    assert rbdplan.snap_remove_argv(SOURCE, "vmsched-chain-7-3")[-1] == "one/one-7-0@vmsched-chain-7-3"


def test_parse_diff_joins_touching_and_overlapping_extents() -> None:
    out = ('[{"offset":8192,"length":4096,"exists":"true"},{"offset":0,"length":4096,"exists":"true"},'
           '{"offset":4096,"length":4096,"exists":"false"},{"offset":10000,"length":100,"exists":"true"},'
           '{"offset":65536,"length":0,"exists":"true"}]')
    assert rbdplan.parse_diff(out) == [(0, 12288)]
    assert rbdplan.parse_diff("[]") == []
    with pytest.raises(ValidationError, match="rbd diff"):
        rbdplan.parse_diff('[{"offset": 1}]')
    assert rbdplan.parse_size('{"size": 33554432, "name": "x"}') == 32 * MiB


def test_the_link_cluster_size_stores_the_extents_in_the_fewest_bytes() -> None:
    scattered = [(k * MiB, 4096) for k in range(64)]  # 4 KiB writes 1 MiB apart: 64 KiB clusters would be 16x
    assert rbdplan.link_cluster_size(scattered) == 4096
    assert rbdplan.link_bytes(scattered, 4096) < 1.2 * 64 * 8192 < rbdplan.link_bytes(scattered, 65536)
    assert rbdplan.link_cluster_size([(0, 16 * MiB)]) == 65536  # large extents keep qemu's default
    assert rbdplan.link_cluster_size([]) == 65536
    assert rbdplan.link_create_argv(SOURCE, "vmsched-chain-1-2", "/s/disk.0.2", 32 * MiB, 4096)[:10] == [
        "qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-o", "cluster_size=4096"]


def test_rbd_argv_carries_the_access_and_the_client_timeouts() -> None:
    assert rbdplan.snap_create_argv(SOURCE, "vmsched-5", RbdTimeouts(3, 4, 5)) == [
        "rbd", "--id", "libvirt", "--keyfile", "/etc/ceph/k", "--conf", "/etc/ceph/c.conf", "--mon-host", "m1:6789",
        "--client-mount-timeout", "3", "--rados-mon-op-timeout", "4", "--rados-osd-op-timeout", "5",
        "snap", "create", "--no-progress", "one/one-7-0@vmsched-5"]
    assert rbdplan.rbd_argv(RbdAccess(), ["ls"])[:2] == ["rbd", "--client-mount-timeout"]  # Ceph's defaults


def test_the_qemu_name_escapes_every_value() -> None:
    source = RbdSource(1, "vdb", "p", "ns/img", RbdAccess("u", conf="/c.conf", mon_hosts=("[::1]:3300", "h2")))
    name = rbdplan.qemu_rbd_name(source, "vmsched-9", RbdTimeouts(1, 2, 3))
    assert name == ("rbd:p/ns/img@vmsched-9:id=u:conf=/c.conf:mon_host=[\\:\\:1]\\:3300;h2"
                    ":client_mount_timeout=1:rados_mon_op_timeout=2:rados_osd_op_timeout=3")
    assert rbdplan.convert_argv(source, None, "/s/disk.1.0", rate_limit=10)[-3:] == ["10", name.replace(
        "@vmsched-9", "").replace(":client_mount_timeout=1:rados_mon_op_timeout=2:rados_osd_op_timeout=3",
                                  ":client_mount_timeout=15:rados_mon_op_timeout=15:rados_osd_op_timeout=60"),
        "/s/disk.1.0"]


@pytest.mark.parametrize(("disk", "error"), [
    (Disk("vda", type="network", protocol="rbd", pool="one", image="-x"), "not a plain RBD name"),
    (Disk("vda", type="network", protocol="rbd", pool="o:ne", image="x"), "not a plain RBD name"),
    (Disk("vda", type="network", protocol="rbd", pool="one", image="a/b/c"), "more than a namespace"),
    (Disk("vda", type="network", protocol="rbd", pool="one", image="x", auth_username="a b"), "cephx id"),
    (Disk("vda", type="file", path="/d/a"), "not an RBD network disk"),
    (Disk("vda", type="network", protocol="rbd", pool="one", image="x", hosts=(NetworkHost("h;x"),)), "CEPH_HOST"),
])
def test_rbd_source_refuses(disk: Disk, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        rbdplan.rbd_source(disk, 0)


def test_rbd_source_takes_the_disks_hosts_and_user_unless_given() -> None:
    disk = Disk("vdc", type="network", protocol="rbd", pool="one", image="img", auth_username="libvirt",
                hosts=(NetworkHost("10.0.0.1", 6789), NetworkHost("10.0.0.2")))
    assert rbdplan.rbd_source(disk, 2) == RbdSource(2, "vdc", "one", "img",
                                                    RbdAccess("libvirt", mon_hosts=("10.0.0.1:6789", "10.0.0.2")))
    given = RbdAccess("backup", "/k", "/c", ("m",))
    assert rbdplan.rbd_source(disk, 2, given).access == given
    with pytest.raises(ValidationError, match="CEPH_CONF"):
        rbdplan.rbd_source(disk, 2, RbdAccess(conf="c.conf"))


def test_parse_snapshots() -> None:
    assert rbdplan.parse_snapshots('[{"id":4,"name":"vmsched-3","size":1}, {"id":5,"name":"keep"}]') == [
        "vmsched-3", "keep"]
    with pytest.raises(ValidationError):
        rbdplan.parse_snapshots("not json")


# ---- on a hypervisor host, against the real cluster -------------------------------------------------------


def on_host1(realenv: RealEnv, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(realenv.ssh_argv("host1", argv), capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.mark.realenv
def test_snapshot_convert_and_remove_on_a_hypervisor(realenv: RealEnv, ceph: CephCluster, tmp_path: Path) -> None:
    image = f"t-{uuid.uuid4().hex[:8]}"
    raw = tmp_path / "src.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 8M 2M", str(raw)], check=True, capture_output=True)
    ceph.run("rbd", "import", "--no-progress", str(raw), f"{ceph.pool}/{image}")
    source = RbdSource(0, "vda", ceph.pool, image, RbdAccess(ceph.client, conf=str(ceph.conf)))
    snapshot = rbdplan.snapshot_name(7)
    try:
        assert on_host1(realenv, rbdplan.snap_create_argv(source, snapshot)).returncode == 0
        ceph.run("rbd", "snap", "create", "--no-progress", f"{ceph.pool}/{image}@theirs")  # not vmsched's
        written = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3d 8M 1M", rbdplan.qemu_rbd_name(source)],
                                 capture_output=True, text=True, timeout=60)  # the image moves on after the snapshot
        assert written.returncode == 0, written.stderr
        listed = on_host1(realenv, rbdplan.snap_list_argv(source))
        assert rbdplan.parse_snapshots(listed.stdout) == [snapshot, "theirs"]
        staged = tmp_path / "disk.0.0"
        done = on_host1(realenv, rbdplan.convert_argv(source, snapshot, str(staged)))
        assert done.returncode == 0, done.stderr
        compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(staged)],
                                  capture_output=True, text=True)
        assert compared.returncode == 0, compared.stdout + compared.stderr  # the disk as it was at the snapshot
        assert on_host1(realenv, rbdplan.snap_remove_argv(source, snapshot)).returncode == 0
        assert rbdplan.parse_snapshots(on_host1(realenv, rbdplan.snap_list_argv(source)).stdout) == ["theirs"]
    finally:
        ceph.run("rbd", "snap", "purge", "--no-progress", f"{ceph.pool}/{image}", check=False)
        ceph.run("rbd", "rm", "--no-progress", f"{ceph.pool}/{image}", check=False)


@pytest.mark.realenv
def test_an_unreachable_cluster_fails_within_the_timeouts(realenv: RealEnv, ceph: CephCluster) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = RbdSource(0, "vda", ceph.pool, "whatever", RbdAccess(ceph.client, conf=str(ceph.conf),
                                                                  mon_hosts=(f"127.0.0.1:{port}",)))
    began = time.monotonic()
    done = on_host1(realenv, rbdplan.snap_create_argv(source, "vmsched-1", RbdTimeouts(2, 2, 2)), timeout=60)
    assert done.returncode == rbdplan.TIMED_OUT, (done.returncode, done.stderr)
    assert time.monotonic() - began < 20


def test_parse_used_takes_the_snapshots_entry_else_the_images() -> None:
    out = ('{"images":[{"name":"i","snapshot":"s1","used_size":100},{"name":"i","snapshot":"s2","used_size":200},'
           '{"name":"i","used_size":300}],"total_used_size":600}')
    assert rbdplan.parse_used(out, "s1") == 100 and rbdplan.parse_used(out, None) == 300
    assert rbdplan.parse_used('{"images":[{"name":"i","snapshot":"s","used_size":7}]}', "other") == 7
    with pytest.raises(ValidationError, match="rbd du"):
        rbdplan.parse_used("{}", None)
    assert rbdplan.du_argv(SOURCE, "s")[-4:] == ["du", "--format", "json", "one/one-7-0@s"]


def test_rbd_links_copy_with_fewer_qemu_io_processes() -> None:
    from drivers.tm import dirty
    reads = dirty.read_commands([(k * MiB, 4096) for k in range(2048)])
    argvs = dirty.copy_argvs("/s/disk.0.1", reads, dirty.RBD_READS_PER_CALL)
    assert len(argvs) == 2 and all(argv[-1] == "/s/disk.0.1" for argv in argvs)
    assert len(" ".join(argvs[0]).encode()) < 128 << 10  # one argument of a remote shell: below MAX_ARG_STRLEN
    assert len(dirty.copy_argvs("/s/disk.0.1", reads)) == 8
