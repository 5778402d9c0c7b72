"""INCREMENT_MODE=SNAPSHOT (spec §4.6, §6.3): between two backups the VM runs on a qcow2 overlay of each
backed-up disk, and the overlay holds exactly what the guest wrote since the last backup. An increment
freezes it (a new overlay is put on top, atomically for all disks), uploads a copy of it as the link, and
once the link is recorded commits it into the disk.

Overlay ``n`` of disk file ``<base>`` of VM ``v`` is ``<base>.vmsched-snap.<v>.<n>``, beside the disk: it
holds the writes since backup ``n - 1``. Between two backups each disk runs on ``[n, base]``; right after a
snapshot on ``[n + 1, n, base]``. Everything here works on what the domain runs on now, so every step is
idempotent and a crash at any point leaves a chain these functions bring back to ``[m, base]``:

* :meth:`Layers.normalize` makes a disk run on ``[m, base]`` before increment ``m`` and after it is recorded:
  this VM's overlays above ``m`` are committed into ``m`` and those below into the base (what a run that
  died left); no overlay ``m`` means the chain is broken (:class:`ChainBroken`, a new chain starts).
* :meth:`Layers.fold` commits every overlay of this VM into its disk and points the domain at the disk again:
  before a new chain, in any other mode, and before a restore in place. Content never changes.
* :meth:`Layers.add_next` / :meth:`Layers.drop_next` put the next overlay on top (live: the snapshot; off:
  ``qemu-img create`` and the domain redefined) and take it off again (a run not kept).

Files not named like this VM's overlays are never committed or removed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from drivers.commands import Runner
from drivers.tm import plan
from drivers.tm.chaincheck import Increment
from drivers.tm.errors import CaptureError, ChainBroken
from drivers.vmm.domainxml import Disk
from drivers.vmm.kvm import KvmHost
from drivers.vmm.states import DomainState

log = logging.getLogger(__name__)

def continues_overlays(increment: Increment | None) -> bool:
    """A SNAPSHOT-mode increment after the base: its disks must run on the chain's overlay."""
    return increment is not None and increment.snapshot and increment.increment_id > 0


def needs_arranging(current: Sequence[Disk], vm_id: int, increment: Increment | None) -> bool:
    """Whether a capture must first bring the VM's overlays in line (pure, from the domain's disks): a SNAPSHOT
    increment always, any other capture only when a disk runs on one of this VM's overlays."""
    return continues_overlays(increment) or any(
        (parsed := plan.parse_snapshot_overlay(d.path or "")) is not None and parsed[1] == vm_id for d in current)


@dataclass(frozen=True)
class Layering:
    """What one disk runs on: this VM's overlays on top (top first, each with its number), then ``base`` (the
    first file that is not one of them) and whatever it is backed by."""

    target: str
    overlays: tuple[tuple[str, int], ...]
    base: str

    @property
    def top(self) -> str:
        return self.overlays[0][0] if self.overlays else self.base

    def numbers(self) -> list[int]:
        return [number for _, number in self.overlays]


def layering(target: str, chain: Sequence[str], vm_id: int) -> Layering:
    """Split a disk's backing chain (top first): the leading files that are VM ``vm_id``'s overlays of one
    and the same base, and that base."""
    overlays: list[tuple[str, int]] = []
    base: str | None = None
    for index, path in enumerate(chain):
        parsed = plan.parse_snapshot_overlay(path)
        if parsed is None or parsed[1] != vm_id or base not in (None, parsed[0]):
            return Layering(target, tuple(overlays), path)
        base = parsed[0]
        overlays.append((path, parsed[2]))
        if index == len(chain) - 1:  # an overlay with no backing file: its base was lost
            raise CaptureError(f"disk {target}: overlay {path} has no backing file")
    raise CaptureError(f"disk {target}: no backing chain")


class Layers:
    """The overlays of one domain's disks, as the SNAPSHOT mode keeps them (see the module docstring)."""

    def __init__(self, kvm: KvmHost, runner: Runner, domain: str, vm_id: int, where: str, *,
                 command_timeout: float = 120.0, commit_deadline: float = 600.0) -> None:
        self.kvm, self.runner, self.domain, self.vm_id, self.where = kvm, runner, domain, vm_id, where
        self.command_timeout, self.commit_deadline = command_timeout, commit_deadline

    async def command(self, argv: list[str]) -> bytes:
        return (await self.runner.run(argv, timeout=self.command_timeout)).stdout

    async def of(self, disk: Disk) -> Layering:
        assert disk.path
        if not plan.is_snapshot_overlay(disk.path):  # the usual case: no command at all
            return Layering(disk.target, (), disk.path)
        return layering(disk.target, await self.chain(disk.path), self.vm_id)

    async def chain(self, path: str) -> list[str]:
        """The files a disk running on ``path`` reads, top first."""
        return plan.chain_files(await self.command(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                                                    path]))

    async def off(self) -> bool:
        state = await self.kvm.state(self.domain)
        if state not in (DomainState.SHUTOFF, DomainState.RUNNING, DomainState.PAUSED):
            raise CaptureError(f"{self.where}: the domain is {state}: its overlays are not touched now",
                               host=self.kvm.name, retryable=True)
        return state is DomainState.SHUTOFF

    async def file_disks(self) -> list[Disk]:
        return [d for d in await self.kvm.disks(self.domain) if d.type == "file" and d.path and d.writable_disk]

    # ------------------------------------------------------------------ whole chains

    async def fold(self) -> list[str]:
        """Every disk of the domain that runs on this VM's overlays runs on its own file again, with the
        overlays' data committed into it; the overlays removed. The targets folded."""
        folded = []
        for disk in await self.file_disks():
            layers = await self.of(disk)
            if not layers.overlays:
                continue
            await self.commit_above(layers, layers.base, await self.off())
            await self.remove([path for path, _ in layers.overlays])
            log.info("%s: %s runs on %s again (overlay(s) %s committed into it)", self.where, disk.target,
                     layers.base, ", ".join(str(n) for n in layers.numbers()))
            folded.append(disk.target)
        return folded

    async def normalize(self, targets: Sequence[str], number: int) -> dict[str, str]:
        """Each disk in ``targets`` on ``[overlay number, base]``: this VM's overlays above it committed into
        it, those below into the base. ``{target: base file}``; ChainBroken when a disk has no such overlay."""
        disks = {d.target: d for d in await self.file_disks()}
        plans = {}
        for target in targets:
            disk = disks.get(target)
            layers = await self.of(disk) if disk is not None else None
            if layers is None or number not in layers.numbers():
                found = ", ".join(map(str, layers.numbers())) if layers and layers.overlays else "none"
                raise ChainBroken(self.where, f"disk {target} does not run on overlay {number} of the chain (this "
                                  f"VM's overlays on it: {found})", cause="overlay", host=self.kvm.name)
            plans[target] = layers
        off = await self.off()
        for target, layers in plans.items():
            index = layers.numbers().index(number)
            keep = layers.overlays[index][0]
            above, below = layers.overlays[:index], layers.overlays[index + 1:]
            if above:
                await self.commit_above(layers, keep, off)
                log.warning("%s: %s: overlay(s) %s above overlay %d (left by a run that was not kept) committed "
                            "into it", self.where, target, ", ".join(str(n) for _, n in above), number)
            if below:
                await self.commit_below(target, keep, below[0][0], layers.base, off)
            await self.remove([path for path, _ in (*above, *below)])
        return {target: layers.base for target, layers in plans.items()}

    async def commit_above(self, layers: Layering, into: str, off: bool) -> None:
        """The layers above ``into`` (the domain's active file on top) committed into it; the domain on it."""
        if layers.top == into:
            return
        if off:
            await self.command(["qemu-img", "commit", "-q", "-f", "qcow2", "-b", into, layers.top])
            await self.kvm.set_disk_file(self.domain, layers.target, into)
        else:
            await self.kvm.blockcommit(self.domain, layers.target, deadline=self.commit_deadline, base=into)

    async def commit_below(self, target: str, keep: str, top: str, base: str, off: bool) -> None:
        """``top`` (right below ``keep``) and what is between it and ``base`` committed into ``base``; ``keep``
        then backed by ``base``. Between the two steps the data is in both: a crash leaves it readable."""
        if off:
            await self.command(["qemu-img", "commit", "-q", "-f", "qcow2", "-b", base, top])
            await self.command(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", base, keep])
        else:
            await self.kvm.commit_below(self.domain, target, top, base, deadline=self.commit_deadline)

    # ------------------------------------------------------------------ the next overlay

    async def add_next(self, tops: dict[str, str], nexts: dict[str, str], *, off: bool, name: str) -> None:
        """Overlay ``nexts[target]`` on top of each disk (``tops[target]``: the file it runs on now); a running
        domain gets them in one atomic snapshot (the caller quiesces), a shut-off one by ``qemu-img create``
        and its definition."""
        if not off:
            await self.kvm.snapshot_disks(self.domain, nexts, name=name or None)
            return
        for target, path in nexts.items():
            await self.command(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", tops[target], path])
            await self.kvm.set_disk_file(self.domain, target, path)

    async def drop_next(self, target: str, path: str) -> bool:
        """Take overlay ``path`` (added by a run that is not kept) off ``target`` again: what it holds is
        committed into the file below and the domain runs on that; a file nothing runs on is removed. False
        (kept) when it is not the disk's top layer any more (a snapshot was taken on top of it)."""
        disk = next((d for d in await self.file_disks() if d.target == target), None)
        chain = [] if disk is None or not disk.path else await self.chain(disk.path)
        if chain[:1] == [path]:
            if len(chain) < 2:
                raise CaptureError(f"{self.where}: overlay {path} of {target} has no backing file; kept",
                                   host=self.kvm.name)
            if await self.off():
                await self.command(["qemu-img", "commit", "-q", "-f", "qcow2", path])
                await self.kvm.set_disk_file(self.domain, target, chain[1])
            else:
                await self.kvm.blockcommit(self.domain, target, deadline=self.commit_deadline)
        elif path in chain:
            log.error("%s: %s runs on an image backed by overlay %s (a snapshot was taken on top of it): kept",
                      self.where, target, path)
            return False
        await self.remove([path])
        return True

    async def remove(self, paths: Sequence[str]) -> None:
        doomed = [path for path in paths if plan.is_snapshot_overlay(path)]
        if doomed:
            await self.command(["rm", "-f", "--", *doomed])


def base_of(path: str) -> str:
    """The disk file an overlay belongs to; a disk file is its own base."""
    parsed = plan.parse_snapshot_overlay(path)
    return path if parsed is None else parsed[0]
