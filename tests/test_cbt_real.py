"""Changed-block tracking on a real libvirt/QEMU: checkpoints and push-mode backup jobs of a running
domain (drivers.vmm.checkpoints, KvmHost.backup), and the qcow2 transfer driver's increments built on them
(a guest quiesced only for the start of each job, ``disk.<id>.<n>`` reading through ``disk.<id>.<n-1>``, no
checkpoint left by an increment that is not kept), the base of MODE=INCREMENT.

A full backup creates the first checkpoint; the next job copies only what the guest wrote since, into a
qcow2 that becomes the chain's next link once it points at the previous one (``qemu-img rebase -u``).
Each link, read through its chain, is the disk exactly as it was at its backup.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from drivers.tm.plan import DiskSource, FsFreeze
from drivers.tm.qcow2 import CaptureError, CaptureRequest, ChainBroken, Increment, capture, recover
from drivers.vmm.checkpoints import backup_xml, checkpoint_name, checkpoint_xml, parse_bitmaps
from drivers.vmm.errors import VmmError
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.realenv.procs import run
from tests.test_tm_qcow2 import (
    Host,
    Journal,
    assert_back_on_own_disks,
    connected,
    copy_of,
    holds,
    real,
    same_content,
    staged,
)

MiB = 1 << 20
DEADLINE = 60.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def host1(realenv: RealEnv) -> AsyncIterator[Host]:
    async with connected(realenv) as host:
        yield host


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


async def take(host: Host, dom: TinyDomain, vm_id: int, increment: int, target: Path) -> int:
    """Increment ``increment`` of vda into ``target`` (the whole disk for 0); the bytes the job copied."""
    disks = await host.kvm.disks(dom.name)
    name = checkpoint_name(vm_id, increment)
    since = checkpoint_name(vm_id, increment - 1) if increment else None
    return await host.kvm.backup(dom.name, backup_xml(disks, {"vda": str(target)}, since),
                                 checkpoint_xml(name, disks, ["vda"]), name, deadline=DEADLINE)


def link(increment: Path, previous: Path) -> None:
    """Make ``increment`` read through ``previous`` where it holds nothing (its backing is the live disk)."""
    run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", previous.name, str(increment)])


@real
async def test_increments_copy_what_changed_and_each_link_is_the_disk_at_its_backup(
        host1: Host, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    hv.write_pattern(dom, "vda", pattern=0x11, offset="0", length="4M")
    base, first, second = (tmp_path / f"disk.0.{n}" for n in range(3))
    await take(host1, dom, 7, 0, base)
    at_base = copy_of(dom.vda, "qcow2", tmp_path / "vda.at-0")
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-7-0"]

    hv.write_pattern(dom, "vda", pattern=0x22, offset="16M", length="4M")
    copied = await take(host1, dom, 7, 1, first)
    link(first, base)
    at_first = copy_of(dom.vda, "qcow2", tmp_path / "vda.at-1")
    hv.write_pattern(dom, "vda", pattern=0x33, offset="40M", length="2M")
    await take(host1, dom, 7, 2, second)
    link(second, first)

    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-7-0", "vmsched-7-1", "vmsched-7-2"]
    assert 4 * MiB <= copied <= 5 * MiB  # the 4 MiB written since the base, at the bitmap's granularity
    assert allocated(first) < 6 * MiB and allocated(second) < 4 * MiB  # only the changes are stored
    assert same_content(base, at_base) and same_content(first, at_first)
    assert same_content(second, dom.vda)  # the last link is the disk now
    assert holds(second, "qcow2", 0x11, "0", "4M") and holds(second, "qcow2", 0x22, "16M", "4M")
    assert not holds(first, "qcow2", 0x33, "40M", "2M")  # written after increment 1


@real
async def test_a_failed_job_leaves_no_checkpoint_behind(host1: Host, tiny_domain: Callable[..., TinyDomain],
                                                      tmp_path: Path) -> None:
    dom = tiny_domain()
    await take(host1, dom, 8, 0, tmp_path / "disk.0.0")
    with pytest.raises(VmmError):  # its target cannot be created: the job does not start
        await take(host1, dom, 8, 1, tmp_path / "missing" / "disk.0.1")
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-8-0"]
    await take(host1, dom, 8, 1, tmp_path / "disk.0.1b")  # and the next attempt meets no "bitmap exists"
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-8-0", "vmsched-8-1"]


@real
async def test_a_cancelled_job_is_aborted_and_its_checkpoint_removed(
        host1: Host, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    hv.write_pattern(dom, "vda", pattern=0x44, offset="0", length="48M")
    disks = await host1.kvm.disks(dom.name)
    throttled = backup_xml(disks, {"vda": str(tmp_path / "disk.0.0")}, None)
    job = asyncio.create_task(host1.kvm.backup(dom.name, throttled, checkpoint_xml("vmsched-9-0", disks, ["vda"]),
                                               "vmsched-9-0", deadline=DEADLINE, poll_interval=0.01))
    while not await host1.kvm.checkpoints(dom.name):  # noqa: ASYNC110 - libvirt sends no event for a job start
        await asyncio.sleep(0.005)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert await host1.kvm.checkpoints(dom.name) == []
    assert hv.lookup(dom).jobInfo()[0] == 0  # no job runs


@real
async def test_bitmaps_are_persistent_in_the_qcow2_once_the_guest_is_off(
        host1: Host, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    await take(host1, dom, 10, 0, tmp_path / "disk.0.0")
    hv.lookup(dom).destroy()
    bitmaps = parse_bitmaps(run(["qemu-img", "info", "--output=json", str(dom.vda)]).stdout)
    assert [(b.name, b.sound) for b in bitmaps] == [("vmsched-10-0", True)]
    hv.lookup(dom).create()  # started again: the checkpoint still tracks (no full read is needed)
    hv.write_pattern(dom, "vda", pattern=0x55, offset="8M", length="1M")
    copied = await take(host1, dom, 10, 1, tmp_path / "disk.0.1")
    assert 1 * MiB <= copied <= 2 * MiB


# ---------------------------------------------------------------------------------------------- the TM's increments


def vda(dom: TinyDomain) -> list[DiskSource]:
    return [DiskSource(0, "vda", str(dom.vda), "qcow2")]


def request(dom: TinyDomain, base: Path, run_id: int, increment: int,
            mode: FsFreeze = FsFreeze.NONE) -> CaptureRequest:
    return CaptureRequest(dom.name, vda(dom), mode, run_id, str(base / "5" / str(run_id)),
                          increment=Increment(5, increment))


@real
async def test_a_chain_of_increments_each_the_disk_at_its_backup(
        host1: Host, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    chain = tmp_path / "chain"  # where the uploads of a chain lie together
    chain.mkdir()
    hv.write_pattern(dom, "vda", pattern=0x11, offset="0", length="4M")
    journal = Journal()
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 31, 0, FsFreeze.SUSPEND), journal) as base:
        shutil.copy(base.images[0].path, chain)
    at_base = copy_of(dom.vda, "qcow2", tmp_path / "at-0")
    hv.write_pattern(dom, "vda", pattern=0x22, offset="20M", length="3M")
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 32, 1), Journal()) as first:
        shutil.copy(first.images[0].path, chain)
    assert journal.names() == ["staging", "checkpoint", "suspended", "resumed"]
    assert base.live and 0 < (base.snapshot_seconds or 0) < 5
    assert first.images[0].actual_size < 5 * MiB  # the 3 MiB written, not the disk
    assert same_content(chain / "disk.0.0", at_base) and same_content(chain / "disk.0.1", dom.vda)
    backing = run(["qemu-img", "info", "--output=json", str(chain / "disk.0.1")]).stdout
    assert '"backing-filename": "disk.0.0"' in backing  # relative: the chain moves as a directory
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-5-0", "vmsched-5-1"]
    assert staged(tmp_path / "5" / "32") == ["disk.0.1"]  # the caller uploads, then removes the staging dir
    assert_back_on_own_disks(hv, dom.name, vda(dom))


@real
async def test_an_increment_that_is_not_kept_leaves_no_checkpoint(
        host1: Host, tiny_domain: Callable[..., TinyDomain], tmp_path: Path) -> None:
    dom = tiny_domain()
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 41, 0), Journal()):
        pass
    with pytest.raises(RuntimeError, match="server went away"):
        async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 42, 1), Journal()):
            raise RuntimeError("the backup server went away")
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-5-0"]  # increment 1 can be taken again
    assert staged(tmp_path / "5" / "42") == []
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 43, 1), Journal()):
        pass
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-5-0", "vmsched-5-1"]


@real
async def test_recovery_removes_the_checkpoint_of_a_run_that_died(
        host1: Host, tiny_domain: Callable[..., TinyDomain], tmp_path: Path) -> None:
    dom = tiny_domain()
    journal = Journal()
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 51, 0), journal):
        pass  # as far as the daemon got before it was killed: captured, never recorded
    report = await recover(host1.kvm, host1.runner, dom.name, journal.steps)
    assert await host1.kvm.checkpoints(dom.name) == []
    assert "vmsched-5-0" in report.removed and staged(tmp_path / "5" / "51") == []


@real
async def test_a_raw_disk_cannot_take_increments(host1: Host, tiny_domain: Callable[..., TinyDomain],
                                                 tmp_path: Path) -> None:
    dom = tiny_domain()
    raw = CaptureRequest(dom.name, [DiskSource(1, "vdb", str(dom.vdb), "raw")], FsFreeze.NONE, 61,
                         str(tmp_path / "5" / "61"), increment=Increment(5, 0))
    with pytest.raises(CaptureError, match="not a writable qcow2 file disk"):
        async with capture(host1.kvm, host1.runner, raw, Journal()):
            pass
    assert await host1.kvm.checkpoints(dom.name) == []


@real
async def test_a_checkpoint_left_by_a_run_that_did_not_finish_is_replaced(
        host1: Host, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 71, 0), Journal()):
        pass
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 72, 1), Journal()):
        pass  # captured and uploaded, but never recorded: the chain still ends at increment 0
    hv.write_pattern(dom, "vda", pattern=0x66, offset="30M", length="2M")
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 73, 1), Journal()) as again:
        assert 2 * MiB <= again.images[0].actual_size < 4 * MiB  # since increment 0, the stale one merged in
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-5-0", "vmsched-5-1"]


@real
async def test_a_chain_whose_checkpoint_is_gone_is_broken_and_foreign_checkpoints_are_kept(
        host1: Host, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 81, 0), Journal()):
        pass
    hv.lookup(dom).checkpointCreateXML("<domaincheckpoint><name>theirs</name><disks><disk name='vda' "
                                       "checkpoint='bitmap'/><disk name='vdb' checkpoint='no'/></disks>"
                                       "</domaincheckpoint>", 0)
    await host1.kvm.delete_checkpoint(dom.name, "vmsched-5-0")  # by someone else
    with pytest.raises(ChainBroken, match="checkpoint vmsched-5-0 of the previous increment is gone"):
        async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 82, 1), Journal()):
            pass
    assert await host1.kvm.checkpoints(dom.name) == ["theirs"]
    assert staged(tmp_path / "5" / "82") == []
