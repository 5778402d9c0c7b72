"""The real test environment's single-node Ceph cluster (tests/realenv/ceph.py): cephx, the hypervisors' own
user, idempotent ``up``, ``down`` by PID, and a TCG domain on a host running on an RBD disk through libvirt's
ceph secret (QEMU's librbd in the host's namespace)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.realenv import ceph as ceph_env
from tests.realenv import procs
from tests.realenv.ceph import CephCluster
from tests.realenv.domains import Hypervisor

MiB = 1 << 20


def test_the_conf_requires_cephx_and_names_every_path_in_the_cluster_dir(tmp_path: Path) -> None:
    text = ceph_env.conf_text(tmp_path, "f5d0", 3300, 6789)
    lines = dict(line.split(" = ", 1) for line in text.splitlines()[1:])
    assert lines["mon host"] == "[v2:127.0.0.1:3300,v1:127.0.0.1:6789]"
    assert {lines[f"auth {kind} required"] for kind in ("cluster", "service", "client")} == {"cephx"}
    assert lines["keyring"] == f"{tmp_path}/$name.keyring"
    assert all(lines[key].startswith(str(tmp_path)) for key in ("run dir", "admin socket", "pid file", "log file",
                                                                 "mon data", "mgr data", "osd data"))
    assert lines["client mount timeout"] == "15"  # not the 300 s default when the mon is gone


@pytest.mark.realenv
def test_the_hypervisors_user_works_on_its_pool_and_is_not_admin(ceph: CephCluster, tmp_path: Path) -> None:
    image = f"t-{uuid.uuid4().hex[:8]}"
    ceph.run("rbd", "create", "--size", "64M", f"{ceph.pool}/{image}")
    try:
        ceph.run("rbd", "snap", "create", "--no-progress", f"{ceph.pool}/{image}@s1")
        ceph.run("rbd", "export", "--no-progress", f"{ceph.pool}/{image}@s1", str(tmp_path / "exp.raw"))
        assert (tmp_path / "exp.raw").stat().st_size == 64 * MiB
        df = json.loads(ceph.run("ceph", "df", "-f", "json").stdout)  # the mgr answers it
        assert ceph.pool in [pool["name"] for pool in df["pools"]]
        assert df["stats"]["total_bytes"] > 0
        denied = ceph.run("ceph", "auth", "ls", check=False)
        assert denied.returncode != 0 and "denied" in (denied.stderr + denied.stdout).lower()
        assert "client.admin" not in ceph.client_keyring.read_text()
    finally:
        ceph.run("rbd", "snap", "purge", "--no-progress", f"{ceph.pool}/{image}")
        ceph.run("rbd", "rm", "--no-progress", f"{ceph.pool}/{image}")


@pytest.mark.realenv
def test_up_again_keeps_the_running_cluster(ceph: CephCluster) -> None:
    again = ceph_env.up(ceph.dir)
    assert (again.fsid, again.procs, again.client_key) == (ceph.fsid, ceph.procs, ceph.client_key)
    assert sorted(p.role for p in again.procs) == ["mgr", "mon", "osd"] and all(map(procs.is_running, again.procs))


@pytest.mark.realenv
def test_down_stops_exactly_its_daemons_by_pid_and_up_makes_a_new_cluster(ceph: CephCluster, tmp_path: Path) -> None:
    other = ceph_env.up(tmp_path / "ceph2")  # a second cluster beside the session's
    assert other.mon_port != ceph.mon_port and other.fsid != ceph.fsid
    stopped = ceph_env.down(other.dir)
    assert set(stopped) == set(other.procs) and not any(map(procs.is_running, other.procs))
    assert ceph_env.load(other.dir).procs == ()  # type: ignore[union-attr]
    assert all(map(procs.is_running, ceph.procs))  # the session's cluster is untouched
    assert ceph_env.down(other.dir) == []  # idempotent


@pytest.mark.realenv
def test_a_domain_runs_on_an_rbd_disk_through_libvirts_ceph_secret(
        ceph: CephCluster, hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    with ceph_env.rbd_domain(ceph, hypervisors("host1"), tmp_path / "d") as d:
        ceph_env.guest_write(d.dom, "vdc", 0x5C, "1M", "1M")  # as the guest would write to its vdc
        exported = tmp_path / "exp.raw"
        ceph.run("rbd", "export", "--no-progress", f"{ceph.pool}/{d.image}", str(exported))
        data = exported.read_bytes()
        assert data[MiB:2 * MiB] == b"\x5c" * MiB and data[:MiB] == bytes(MiB)  # the guest's write, in the cluster
