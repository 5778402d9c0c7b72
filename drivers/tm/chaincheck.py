"""Before an increment: can the VM's chain go on? Checked on the domain's checkpoints (libvirt) and on the dirty
bitmaps in its disks (the running QEMU's view, or ``qemu-img info`` of a domain that is off), by the capture
of drivers/tm/qcow2.py.

Leftovers of runs that were not kept (vmsched's checkpoints of this increment or later, vmsched bitmaps no
checkpoint names) are removed first: the previous bitmap still tracks every change since it. The previous
checkpoint must then have a sound bitmap in every disk (its libvirt record is redefined when only that was
lost), and no disk may have been resized since the chain's base; otherwise :class:`ChainBroken` says why.
Checkpoints and bitmaps that are not vmsched's, or another VM's, are never touched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from drivers.commands import Runner
from drivers.tm.errors import ChainBroken
from drivers.tm.plan import DiskSource
from drivers.vmm.checkpoints import Bitmap, checkpoint_name, parse_bitmaps, parse_checkpoint_name, redefine_xml
from drivers.vmm.errors import VmmError
from drivers.vmm.kvm import KvmHost
from drivers.vmm.states import DomainState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Increment:
    """Capture increment ``increment_id`` of the VM's chain (qcow2 disks): 0 is the chain's full base, any other
    what changed since increment ``increment_id - 1``, by changed-block tracking or by overlays."""

    vm_id: int
    increment_id: int
    # disk_id -> virtual size in bytes at the chain's base: a disk resized since cannot continue the chain
    sizes: Mapping[int, int] = field(default_factory=dict)
    # INCREMENT_MODE=SNAPSHOT: an overlay per increment (drivers/tm/snapshots.py) instead of checkpoints
    snapshot: bool = False


class DiskBitmaps:
    """The dirty bitmaps of one domain's disks: through its running QEMU, or with qemu-img while it is off."""

    def __init__(self, kvm: KvmHost, runner: Runner, domain: str, command_timeout: float) -> None:
        self.kvm, self.runner, self.domain, self.command_timeout = kvm, runner, domain, command_timeout

    async def _command(self, argv: list[str]) -> bytes:
        return (await self.runner.run(argv, timeout=self.command_timeout)).stdout

    async def of(self, paths: Sequence[str], *, off: bool) -> dict[str, list[Bitmap]]:
        """``{disk file: its dirty bitmaps}``: the running QEMU's view, or ``qemu-img info`` of a domain off."""
        if not off:
            return await self.kvm.disk_bitmaps(self.domain)
        return {path: parse_bitmaps(await self._command(["qemu-img", "info", "--output=json", path])) for path in paths}

    async def remove(self, path: str, name: str, *, off: bool) -> None:
        if not off:
            await self.kvm.remove_bitmap(self.domain, path, name)
        else:
            await self._command(["qemu-img", "bitmap", "--remove", "-f", "qcow2", path, name])


class ChainCheck:
    """The check of one domain's chain before one increment (see the module docstring)."""

    def __init__(self, kvm: KvmHost, domain: str, where: str, disk_bitmaps: DiskBitmaps) -> None:
        self.kvm, self.domain, self.where, self.disk_bitmaps = kvm, domain, where, disk_bitmaps

    async def run(self, increment: Increment, since: str | None, disks: Sequence[DiskSource]) -> None:
        """Before increment n: vmsched's checkpoints n and later of this VM, and its bitmaps no checkpoint
        names, are leftovers of runs that were not kept (removed: the previous bitmap still tracks every change
        since it). Checkpoint n-1 must then have a sound bitmap in every disk (its libvirt record is redefined
        when only that was lost), and no disk may have been resized since the base; otherwise the chain is
        broken. Checkpoints and bitmaps that are not vmsched's, or of other VMs, are left alone."""
        if since is not None:
            await self.check_sizes(increment, disks)
        names, bitmaps = await self.drop_leftovers(increment, disks, since)
        if since is not None:
            await self.check_since(increment, since, disks, names, bitmaps)

    async def check_sizes(self, increment: Increment, disks: Sequence[DiskSource]) -> None:
        for disk in disks:
            expected = increment.sizes.get(disk.disk_id)
            size = await self.kvm.block_capacity(self.domain, disk.target)
            if expected is not None and size != expected:
                raise ChainBroken(self.where, f"disk {disk.disk_id} ({disk.target}) is {size} bytes, it was "
                                  f"{expected} at the chain's base (resized)", cause="resized", host=self.kvm.name)

    async def drop_leftovers(self, increment: Increment, disks: Sequence[DiskSource],
                             since: str | None = None) -> tuple[list[str], dict[str, list[Bitmap]]]:
        """Remove the stale checkpoints and the orphan bitmaps (this VM's, named by no checkpoint left, other
        than ``since``'s, which the check that follows judges): an interrupted run's, or an older link's whose
        libvirt record stayed behind on the host a VM migrated from. (the checkpoints left, the disks' bitmaps)"""
        names = await self.kvm.checkpoints(self.domain)
        stale = [name for name in names if (parsed := parse_checkpoint_name(name)) is not None
                 and parsed[0] == increment.vm_id and parsed[1] >= increment.increment_id]
        off = await self.kvm.state(self.domain) is DomainState.SHUTOFF  # libvirt: record only; bitmaps below
        for name in reversed(stale):
            log.warning("%s: checkpoint %s is not part of the chain (left by a run that did not finish, or "
                        "a new chain starts): deleted", self.where, name)
            try:
                await self.kvm.delete_checkpoint(self.domain, name, metadata_only=off)
            except VmmError as exc:  # its bitmap is gone (a killed QEMU never stored it): the record goes alone
                log.warning("%s: checkpoint %s cannot be deleted with its bitmaps (%s): its record is", self.where,
                            name, exc)
                await self.kvm.delete_checkpoint(self.domain, name, metadata_only=True)
        names = [name for name in names if name not in stale]
        bitmaps = await self.disk_bitmaps.of([disk.path for disk in disks], off=off)
        for disk in disks:  # a bitmap no checkpoint names would make the next checkpoint of its name fail
            for bitmap in bitmaps.get(disk.path, []):
                parsed = parse_checkpoint_name(bitmap.name)
                if parsed is not None and parsed[0] == increment.vm_id and bitmap.name not in names \
                        and bitmap.name != since:
                    log.warning("%s: bitmap %s of %s belongs to no checkpoint (left by an interrupted run, or "
                                "its record stayed on another host): removed", self.where, bitmap.name, disk.path)
                    await self.disk_bitmaps.remove(disk.path, bitmap.name, off=off)
        return names, bitmaps

    async def check_since(self, increment: Increment, since: str, disks: Sequence[DiskSource], names: list[str],
                          bitmaps: dict[str, list[Bitmap]]) -> None:
        problems = []
        for disk in disks:
            found = next((b for b in bitmaps.get(disk.path, []) if b.name == since), None)
            if found is None:
                problems.append(f"disk {disk.disk_id} ({disk.target}) has no bitmap {since}")
            elif not found.sound:
                problems.append(f"bitmap {since} of disk {disk.disk_id} ({disk.target}) is not usable "
                                f"({', '.join(found.flags)})")
        if problems:
            gone = "is gone" if since not in names else "cannot be trusted"
            raise ChainBroken(self.where, f"checkpoint {since} of the previous increment {gone}: "
                              + "; ".join(problems), cause="checkpoint", host=self.kvm.name)
        if since not in names:  # the bitmaps are sound: only libvirt's record was lost
            previous = checkpoint_name(increment.vm_id, increment.increment_id - 2) if increment.increment_id > 1 else None
            await self.kvm.redefine_checkpoint(self.domain, redefine_xml(
                since, previous if previous in names else None, int(time.time()), [d.target for d in disks]))
            log.warning("%s: libvirt had no record of checkpoint %s, whose bitmaps are sound in every disk: "
                        "redefined, the chain goes on", self.where, since)
