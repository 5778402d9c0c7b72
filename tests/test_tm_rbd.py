"""drivers.tm.qcow2's RBD increments on the real host1 against the real single-node Ceph, below the daemon: the
anchors a capture journals and keeps, the one a failed capture removes, and the progress reported while an RBD
disk is staged (a full copy against ``rbd du``, an increment against what ``rbd diff`` reports)."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.tm.chaincheck import Increment
from drivers.tm.plan import FsFreeze
from drivers.tm.qcow2 import CaptureRequest, capture
from drivers.tm.rbdplan import RbdAccess, RbdSource
from tests.realenv.ceph import CephCluster, RbdDomain, guest_write
from tests.test_ceph_backup_real import rbd_domain, snapshots  # noqa: F401 - rbd_domain is a fixture
from tests.test_tm_qcow2 import Host, Journal, host1, real, staged  # noqa: F401 - host1 is a fixture

VM = 77


def request(d: RbdDomain, ceph: CephCluster, stage: Path, run: int, number: int) -> CaptureRequest:
    source = RbdSource(2, "vdc", ceph.pool, d.image, RbdAccess(ceph.client, conf=str(ceph.conf)))
    return CaptureRequest(d.name, [], FsFreeze.NONE, run, str(stage / str(run)), progress=True,
                          increment=Increment(VM, number), vm_id=VM, rbd_disks=[source])


@real
async def test_rbd_links_keep_their_anchor_report_progress_and_a_failed_one_leaves_the_old_anchor(
        host1: Host, ceph: CephCluster, rbd_domain: RbdDomain, tmp_path: Path) -> None:  # noqa: F811
    d = rbd_domain
    guest_write(d.dom, "vdc", 0x21, "0", "32M")
    base = Journal()
    async with capture(host1.kvm, host1.runner, request(d, ceph, tmp_path, 1, 0), base) as result:
        assert [i.path.rsplit("/", 1)[-1] for i in result.images] == ["disk.2.0"]
    [snap] = [s for s in base.steps if s["step"] == "rbd-snapshot"]
    assert (snap["snapshot"], snap["chain"]) == (f"vmsched-chain-{VM}-0", True)
    assert snapshots(ceph, d.image) == [f"vmsched-chain-{VM}-0"]  # kept: the next increment's anchor
    done, total = base.reports[-1][1:]
    assert base.reports[0] == (2, 0, total) and done == total >= 32 << 20  # rbd du of the full snapshot

    guest_write(d.dom, "vdc", 0x22, "8M", "1M")
    failed = Journal()
    with pytest.raises(RuntimeError, match="the upload failed"):
        async with capture(host1.kvm, host1.runner, request(d, ceph, tmp_path, 2, 1), failed):
            raise RuntimeError("the upload failed")
    assert snapshots(ceph, d.image) == [f"vmsched-chain-{VM}-0"]  # its own snapshot removed, the anchor kept
    assert staged(tmp_path / "2") == []

    link = Journal()
    async with capture(host1.kvm, host1.runner, request(d, ceph, tmp_path, 3, 1), link) as result:
        assert result.images[0].actual_size < 4 << 20
    assert sorted(snapshots(ceph, d.image)) == [f"vmsched-chain-{VM}-0", f"vmsched-chain-{VM}-1"]
    assert link.reports[0] == (2, 0, 1 << 20) and link.reports[-1] == (2, 1 << 20, 1 << 20)  # what changed
