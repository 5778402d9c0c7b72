"""The Ceph RBD disks of one capture, on the hypervisor that reaches the cluster: vmsched's snapshots of them, the
check of a chain's anchors before an increment, and the staging of a full copy or of an increment's link (the
pure parts are in drivers/tm/rbdplan.py).

A chain keeps one snapshot per disk on the cluster, the anchor of its last recorded increment
(``vmsched-chain-<vm>-<n>``); increment ``n + 1`` copies what changed since it. Every other chain snapshot of the
VM is a leftover (of a run that failed, of a crash after a record, of an earlier chain) and is removed before the
next capture; snapshots that are not vmsched's are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from drivers.commands import CommandFailed, Result, Runner, Started
from drivers.tm import dirty, rbdplan
from drivers.tm.chaincheck import Increment
from drivers.tm.errors import CaptureError, ChainBroken
from drivers.tm.plan import chain_snapshot_name, parse_chain_snapshot
from drivers.tm.rbdplan import RbdSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RbdCommands:
    """How the commands on one host's RBD disks run: their deadlines, the heavy ones' IO limits."""

    command_timeout: float = 120.0
    convert_timeout: float = 6 * 3600.0
    rate_limit: int = 0  # qemu-img convert -r, bytes/s
    nice: int | None = None
    ionice: int | None = None


class RbdDisks:
    """The RBD disks a capture (or a recorded increment's follow-up) works on, from one host."""

    def __init__(self, runner: Runner, where: str, host: str, settings: RbdCommands = RbdCommands(), *,
                 started: Started | None = None) -> None:
        self.runner, self.where, self.host, self.settings, self.started = runner, where, host, settings, started

    async def command(self, source: RbdSource, what: str, argv: list[str], *, heavy: bool = False) -> Result:
        """A command on an RBD disk; its failure names the disk, the pool and the image (a client timeout, the
        cluster out of reach, is worth a retry)."""
        s = self.settings
        try:
            return await self.runner.run(argv, timeout=s.convert_timeout if heavy else s.command_timeout,
                                         nice=s.nice if heavy else None, ionice=s.ionice if heavy else None,
                                         started=self.started if heavy else None)
        except CommandFailed as exc:
            timed_out = exc.exit_status == rbdplan.TIMED_OUT or "timed out" in exc.stderr_tail.lower()
            raise CaptureError(f"{self.where}: RBD disk {source.disk_id} ({source.target}, pool {source.pool}, image "
                               f"{source.image}): {what} failed{' (the cluster did not answer in time)' if timed_out else ''}"
                               f": {exc.stderr_tail or exc}", host=self.host,
                               retryable=timed_out or bool(exc.retryable)) from exc

    async def snapshots(self, source: RbdSource) -> list[str]:
        return rbdplan.parse_snapshots((await self.command(source, "list snapshots",
                                                           rbdplan.snap_list_argv(source))).stdout)

    async def create(self, source: RbdSource, snapshot: str) -> None:
        await self.command(source, "snapshot", rbdplan.snap_create_argv(source, snapshot))

    async def remove(self, source: RbdSource, snapshot: str) -> bool:
        """Remove a vmsched snapshot if it is there; whether it was."""
        if snapshot not in await self.snapshots(source):
            return False
        await self.command(source, f"remove snapshot {snapshot}", rbdplan.snap_remove_argv(source, snapshot))
        return True

    async def drop_anchors(self, sources: Sequence[RbdSource], vm_id: int, keep: str | None = None) -> list[str]:
        """Remove VM ``vm_id``'s chain snapshots other than ``keep``; the ``pool/image@snapshot`` removed."""
        removed = []
        for source in sources:
            for name in await self.snapshots(source):
                parsed = parse_chain_snapshot(name)
                if parsed is None or parsed[0] != vm_id or name == keep:
                    continue
                await self.command(source, f"remove snapshot {name}", rbdplan.snap_remove_argv(source, name))
                removed.append(f"{source.spec}@{name}")
        return removed

    async def check_chain(self, sources: Sequence[RbdSource], increment: Increment) -> None:
        """Before increment n: the VM's chain snapshots other than anchor n-1 go (leftovers); anchor n-1 must be
        there and the image the size it was at the chain's base, otherwise :class:`ChainBroken` says why."""
        number = increment.increment_id
        anchor = chain_snapshot_name(increment.vm_id, number - 1) if number else None
        removed = await self.drop_anchors(sources, increment.vm_id, keep=anchor)
        if removed:
            log.warning("%s: RBD snapshot(s) %s left by runs that were not kept, or by an earlier chain: removed",
                        self.where, ", ".join(removed))
        if anchor is None:
            return
        for source in sources:
            if anchor not in await self.snapshots(source):
                raise ChainBroken(self.where, f"RBD disk {source.disk_id} ({source.target}): the snapshot "
                                  f"{source.spec}@{anchor} of increment {number - 1} is gone (removed by hand, or "
                                  "the cluster was restored)", cause="snapshot", host=self.host)
            expected = increment.sizes.get(source.disk_id)
            size = rbdplan.parse_size((await self.command(source, "read the size", rbdplan.info_argv(source))).stdout)
            if expected is not None and size != expected:
                raise ChainBroken(self.where, f"RBD disk {source.disk_id} ({source.target}) is {size} bytes, it was "
                                  f"{expected} at the chain's base (resized)", cause="resized", host=self.host)

    async def used(self, source: RbdSource, snapshot: str | None) -> int:
        """What a full copy of the image (at ``snapshot``) reads at most, for progress reports."""
        return rbdplan.parse_used((await self.command(source, "read the used size",
                                                      rbdplan.du_argv(source, snapshot))).stdout, snapshot)

    async def changes(self, source: RbdSource, since: str, snapshot: str) -> list[tuple[int, int]]:
        """The extents that changed on the image between snapshots ``since`` and ``snapshot``."""
        return rbdplan.parse_diff((await self.command(source, "list the changes",
                                                      rbdplan.diff_argv(source, since, snapshot))).stdout)

    async def stage_full(self, source: RbdSource, snapshot: str | None, target: str) -> Result:
        """``qemu-img convert`` of the image (at ``snapshot``, or as it is) straight from the cluster into ``target``."""
        argv = rbdplan.convert_argv(source, snapshot, target, rate_limit=self.settings.rate_limit)
        return await self.command(source, "copy (qemu-img convert)", argv, heavy=True)

    async def stage_link(self, source: RbdSource, since: str, snapshot: str, target: str,
                         extents: Sequence[tuple[int, int]], size: int | None = None) -> int:
        """``target``: a qcow2 holding ``extents``, what changed on the image between snapshots ``since`` and
        ``snapshot``, read from the cluster by copy-on-read (its backing is then pointed at the previous link);
        the bytes that changed. ``size``: the image's, when :meth:`check_chain` has just confirmed it."""
        if size is None:
            size = rbdplan.parse_size((await self.command(source, "read the size", rbdplan.info_argv(source))).stdout)
        cluster = rbdplan.link_cluster_size(extents)
        await self.command(source, "create the increment",
                           rbdplan.link_create_argv(source, snapshot, target, size, cluster))
        for argv in dirty.copy_argvs(target, dirty.read_commands(extents), dirty.RBD_READS_PER_CALL):
            await self.command(source, "copy the changes", argv, heavy=True)
        changed = dirty.dirty_bytes(extents)
        log.info("%s: RBD disk %d (%s): %d bytes changed between %s and %s copied into %s (%d-byte clusters)",
                 self.where, source.disk_id, source.target, changed, since, snapshot, target, cluster)
        return changed
