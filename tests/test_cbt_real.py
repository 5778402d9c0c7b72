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
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import libvirt_qemu
import pytest
import pytest_asyncio

from drivers.tm import CaptureError, CaptureRequest, ChainBroken, Increment, capture, recover
from drivers.tm.plan import DiskSource, FsFreeze
from drivers.vmm.checkpoints import backup_xml, checkpoint_name, checkpoint_xml, parse_bitmaps
from drivers.vmm.errors import VmmError
from drivers.vmm.states import DomainState
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


def qmp(hv: Hypervisor, dom: TinyDomain, command: str, **arguments: object) -> dict:
    reply = libvirt_qemu.qemuMonitorCommand(hv.lookup(dom), json.dumps({"execute": command, "arguments": arguments}), 0)
    return dict(json.loads(reply))


def vda_node(hv: Hypervisor, dom: TinyDomain) -> str:
    nodes = qmp(hv, dom, "query-named-block-nodes", flat=True)["return"]
    return str(next(n["node-name"] for n in nodes if n.get("drv") == "qcow2" and n.get("file") == str(dom.vda)))


@real
async def test_a_checkpoint_whose_libvirt_record_was_lost_is_redefined_from_its_bitmaps(
        host1: Host, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    dom, hv = tiny_domain(), hypervisors("host1")
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 91, 0), Journal()):
        pass
    await host1.kvm.delete_checkpoint(dom.name, "vmsched-5-0", metadata_only=True)  # libvirt forgot it
    assert await host1.kvm.checkpoints(dom.name) == []
    hv.write_pattern(dom, "vda", pattern=0x77, offset="24M", length="2M")
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 92, 1), Journal()) as first:
        assert 2 * MiB <= first.images[0].actual_size < 4 * MiB  # an increment, not a full
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-5-0", "vmsched-5-1"]


@real
async def test_a_bitmap_no_checkpoint_names_is_removed_so_the_next_checkpoint_can_be_made(
        host1: Host, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    """An interrupted run (or a lost record) left bitmap vmsched-5-0 in the image: creating checkpoint
    vmsched-5-0 again would fail with "Bitmap already exists"."""
    dom, hv = tiny_domain(), hypervisors("host1")
    qmp(hv, dom, "block-dirty-bitmap-add", node=vda_node(hv, dom), name="vmsched-5-0", persistent=True)
    qmp(hv, dom, "block-dirty-bitmap-add", node=vda_node(hv, dom), name="someone-elses", persistent=True)
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 95, 0), Journal()):
        pass
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-5-0"]
    names = [b.name for b in (await host1.kvm.disk_bitmaps(dom.name))[str(dom.vda)]]
    assert sorted(names) == ["someone-elses", "vmsched-5-0"]  # the foreign bitmap is left alone


def kill_qemu(dom: TinyDomain) -> None:
    """SIGKILL the domain's QEMU, as a host crash would: it stores no bitmap on the way out."""
    [pid] = run(["pgrep", "-f", f"guest={dom.name},"]).stdout.split()
    os.kill(int(pid), signal.SIGKILL)


@real
async def test_a_bitmap_left_inconsistent_by_a_killed_qemu_breaks_the_chain_and_the_next_base_clears_it(
        host1: Host, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    """A QEMU killed after it had loaded a stored bitmap leaves it flagged in-use in the image; the next QEMU
    loads it inconsistent. Such a bitmap cannot say what changed: the chain is broken, and the new base
    replaces the checkpoint and its bitmap without "Bitmap already exists"."""
    dom, hv = tiny_domain(), hypervisors("host1")
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 97, 0), Journal()):
        pass
    hv.destroy(dom)  # a clean stop: QEMU stores the bitmap
    hv.start(dom)
    kill_qemu(dom)
    await _until_off(host1, dom)
    [left] = parse_bitmaps(run(["qemu-img", "info", "-U", "--output=json", str(dom.vda)]).stdout)
    assert left.name == "vmsched-5-0" and "in-use" in left.flags and not left.sound
    hv.start(dom)
    with pytest.raises(ChainBroken, match=r"checkpoint vmsched-5-0 of the previous increment cannot be trusted: "
                                          r"bitmap vmsched-5-0 of disk 0 \(vda\) is not usable \(inconsistent"):
        async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 98, 1), Journal()):
            pass
    await _new_base_replaces_it(host1, dom, tmp_path, 99)


@real
async def test_a_bitmap_lost_with_a_killed_qemu_breaks_the_chain_and_the_next_base_clears_its_record(
        host1: Host, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    """A bitmap created while QEMU runs reaches the image only when QEMU closes it: killed before that, it is
    gone, though libvirt still has the checkpoint's record."""
    dom, hv = tiny_domain(), hypervisors("host1")
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 121, 0), Journal()):
        pass
    kill_qemu(dom)
    await _until_off(host1, dom)
    assert bitmap_names(dom.vda) == [] and await host1.kvm.checkpoints(dom.name) == ["vmsched-5-0"]
    hv.start(dom)
    with pytest.raises(ChainBroken, match=r"checkpoint vmsched-5-0 of the previous increment cannot be trusted: "
                                          r"disk 0 \(vda\) has no bitmap vmsched-5-0"):
        async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 122, 1), Journal()):
            pass
    await _new_base_replaces_it(host1, dom, tmp_path, 123)


async def _new_base_replaces_it(host: Host, dom: TinyDomain, tmp_path: Path, run_id: int) -> None:
    async with capture(host.kvm, host.runner, request(dom, tmp_path, run_id, 0), Journal()):
        pass
    assert await host.kvm.checkpoints(dom.name) == ["vmsched-5-0"]
    [fresh] = (await host.kvm.disk_bitmaps(dom.name))[str(dom.vda)]
    assert fresh.name == "vmsched-5-0" and fresh.sound


async def _until_off(host: Host, dom: TinyDomain) -> None:
    """Until libvirt has seen the killed QEMU go (when its monitor socket closes), asked every 50 ms."""
    for _ in range(int(DEADLINE / 0.05)):
        if await host.kvm.state(dom.name) is DomainState.SHUTOFF:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{dom.name} still not shut off {DEADLINE} s after its QEMU was killed")


def bitmap_names(path: Path) -> list[str]:
    return sorted(b.name for b in parse_bitmaps(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout))


@real
async def test_a_powered_off_vm_takes_increments_from_its_persistent_bitmaps_and_live_ones_follow(
        host1: Host, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    dom, hv = tiny_domain(start=False), hypervisors("host1")
    chain = tmp_path / "chain"
    chain.mkdir()
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", str(dom.vda)])
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 101, 0), Journal()) as base:
        assert not base.live
        shutil.copy(base.images[0].path, chain)
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-5-0"] and bitmap_names(dom.vda) == ["vmsched-5-0"]
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 20M 2M", str(dom.vda)])  # written while off: tracked too
    at_one = copy_of(dom.vda, "qcow2", tmp_path / "at-1")
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 102, 1), Journal()) as first:
        assert 2 * MiB <= first.images[0].actual_size < 3 * MiB  # what changed, not the disk
        shutil.copy(first.images[0].path, chain)
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-5-0", "vmsched-5-1"]
    assert bitmap_names(dom.vda) == ["vmsched-5-0", "vmsched-5-1"]
    assert same_content(chain / "disk.0.1", at_one) and staged(tmp_path / "5" / "102") == ["disk.0.1"]
    assert run(["pgrep", "-f", f"{tmp_path}/5/102/nbd"], check=False).stdout == ""

    hv.start(dom)  # and the chain goes on live: libvirt knows checkpoint 1, QEMU loaded its bitmap
    hv.write_pattern(dom, "vda", pattern=0x33, offset="40M", length="1M")
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 103, 2), Journal()) as second:
        assert MiB <= second.images[0].actual_size < 2 * MiB
        shutil.copy(second.images[0].path, chain)
    assert same_content(chain / "disk.0.2", dom.vda)


@real
async def test_a_powered_off_increment_that_is_not_kept_leaves_no_bitmap(
        host1: Host, tiny_domain: Callable[..., TinyDomain], tmp_path: Path) -> None:
    dom = tiny_domain(start=False)
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 111, 0), Journal()):
        pass
    with pytest.raises(RuntimeError, match="went away"):
        async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 112, 1), Journal()):
            raise RuntimeError("the backup server went away")
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-5-0"] and bitmap_names(dom.vda) == ["vmsched-5-0"]
    journal = Journal()
    async with capture(host1.kvm, host1.runner, request(dom, tmp_path, 113, 1), journal):
        pass  # captured, then the daemon died before recording it
    await recover(host1.kvm, host1.runner, dom.name, journal.steps)
    assert await host1.kvm.checkpoints(dom.name) == ["vmsched-5-0"] and bitmap_names(dom.vda) == ["vmsched-5-0"]
