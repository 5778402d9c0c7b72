"""libvirt operations on one KVM host: lookup, state, power, freeze, snapshots, blockcommit, events.

Threading: every blocking libvirt call of a host runs on that host's single worker thread (``vmm-<host>``),
one call at a time, under a deadline (``call_timeout``). A thread cannot be cancelled: when a deadline
passes the caller gets a retryable VmmError while the call finishes (or fails) in the background; long
operations are therefore split into short calls (blockcommit polls its job and, at its own deadline,
aborts the job through libvirt). The connection is reopened when ``isAlive()`` says it died; keepalives
(5 s x 3) make a silent peer count as dead.

Domains are named by name or UUID in every method; a string that parses as a UUID is looked up as one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import libvirt
import libvirt_qemu
from lxml import etree

from drivers.commands import shielded
from drivers.vmm import domainxml, events
from drivers.vmm.checkpoints import Bitmap, parse_node_bitmaps
from drivers.vmm.domainxml import Disk
from drivers.vmm.errors import (
    CommitTimeout,
    DomainNotFound,
    OperationRefused,
    VmmError,
    context,
    from_libvirt,
)
from drivers.vmm.states import DomainInfo, DomainState, state_from_libvirt
from drivers.vmm.uri import check_uri
from scheduler.errors import DriverError, ValidationError

log = logging.getLogger(__name__)

T = TypeVar("T")
SNAPSHOT_DISK_ONLY = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                      | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
COMMIT_ACTIVE_SHALLOW = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
KEEPALIVE = (5, 3)  # seconds between probes, unanswered probes before the connection counts as dead
DISK_SNAPSHOT_REASON = "qemu-img cannot change an image QEMU holds open; power the VM off first"


@dataclass(frozen=True)
class Versions:
    """What a host runs, as ``major.minor.release`` texts."""

    libvirt: str
    qemu: str


def version_text(number: int) -> str:
    """libvirt's packed version number (major * 1,000,000 + minor * 1,000 + release) as ``9.0.0``."""
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


class CommandRunner(Protocol):
    """Runs an argv on the host (the SSH layer, or the local runner) and returns its stdout."""

    async def __call__(self, argv: Sequence[str], *, time_limit: float) -> str: ...


def _quiet_libvirt() -> None:
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors arrive as exceptions; keep stderr clean


def _is_uuid(text: str) -> bool:
    try:
        return len(text) == 36 and uuid.UUID(text) is not None
    except ValueError:
        return False


class KvmHost:
    """One hypervisor's libvirt, used from asyncio."""

    def __init__(self, name: str, uri: str, *, call_timeout: float = 60.0, runner: CommandRunner | None = None,
                 command_timeout: float = 120.0) -> None:
        _quiet_libvirt()
        self.name = name
        self.uri = check_uri(uri)
        self.call_timeout = call_timeout
        self.command_timeout = command_timeout
        self._runner = runner
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vmm-{name}")
        self._closed = False
        self._conn: libvirt.virConnect | None = None
        self._subscriber: tuple[asyncio.AbstractEventLoop, events.StateCallback] | None = None
        self._callback_id: int | None = None

    # ------------------------------------------------------------------ connection and calls (host thread)

    def _open(self) -> libvirt.virConnect:
        events.ensure_event_thread()  # before open, or the connection never delivers events
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            error = from_libvirt(exc, self.name, None, f"connect {self.uri}")
            error.retryable = True  # an unreachable host may come back
            raise error from exc
        try:
            conn.setKeepAlive(*KEEPALIVE)
        except libvirt.libvirtError as exc:
            log.warning("%s: no keepalive on %s: %s", self.name, self.uri, exc)
        if self._subscriber is not None:
            loop, callback = self._subscriber
            handler = events.lifecycle_handler(self.name, loop, callback)
            self._callback_id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, handler, None)
        log.info("%s: connected to %s", self.name, self.uri)
        return conn

    def _connection(self) -> libvirt.virConnect:
        if self._conn is not None and self._conn.isAlive():
            return self._conn
        if self._conn is not None:
            log.warning("%s: libvirt connection lost; reconnecting", self.name)
            self._drop_connection()
        self._conn = self._open()
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn, self._callback_id = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError as exc:
                log.debug("%s: closing a dead connection: %s", self.name, exc)

    def _lookup(self, conn: libvirt.virConnect, domain: str) -> libvirt.virDomain:
        by_uuid = _is_uuid(domain)
        try:
            return conn.lookupByUUIDString(domain) if by_uuid else conn.lookupByName(domain)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            raise DomainNotFound(f"{self.name}: domain {domain!r} not found (looked up by "
                                 f"{'UUID' if by_uuid else 'name'})", host=self.name,
                                 code=libvirt.VIR_ERR_NO_DOMAIN) from exc

    def _in_thread(self, operation: str, domain: str | None, fn: Callable[..., T]) -> T:
        try:
            conn = self._connection()
            return fn(conn) if domain is None else fn(self._lookup(conn, domain))
        except libvirt.libvirtError as exc:
            raise from_libvirt(exc, self.name, domain, operation) from exc

    async def _call(self, operation: str, domain: str | None, fn: Callable[..., T]) -> T:
        """``fn(domain object)`` (or ``fn(connection)`` without a domain) on the host thread, under a deadline."""
        timeout = self.call_timeout
        loop = asyncio.get_running_loop()
        if self._closed:  # replaced (the host's settings changed) or shut down: the caller tries again later
            raise VmmError(f"{context(self.name, domain, operation)}: this libvirt connection was closed (the host's "
                           "connection settings changed?)", host=self.name, retryable=True)
        future = loop.run_in_executor(self._executor, self._in_thread, operation, domain, fn)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise VmmError(f"{context(self.name, domain, operation)}: no answer from libvirt within {timeout:g} s",
                           host=self.name, retryable=True) from None

    async def connect(self) -> None:
        """Open the connection now (otherwise the first operation opens it)."""
        await self._call("connect", None, lambda conn: None)

    async def close(self) -> None:
        """Deregister events and close the connection; the host object cannot be used afterwards."""
        def close() -> None:
            self._unsubscribe_in_thread()
            self._drop_connection()

        self._subscriber = None
        self._closed = True
        try:
            async with asyncio.timeout(self.call_timeout):
                await asyncio.get_running_loop().run_in_executor(self._executor, close)
        finally:
            self._executor.shutdown(wait=False)

    async def versions(self) -> Versions:
        """The libvirt daemon's version and the hypervisor's (QEMU) version on this host."""
        return await self._call("versions", None,
                                lambda conn: Versions(version_text(conn.getLibVersion()),
                                                      version_text(conn.getVersion())))

    # ------------------------------------------------------------------ inventory

    async def find(self, domain: str) -> DomainInfo:
        """Name, UUID and state of a domain given by name or UUID; DomainNotFound otherwise."""
        return await self._call("find", domain, _info)

    async def state(self, domain: str) -> DomainState:
        return await self._call("state", domain, lambda dom: state_from_libvirt(dom.state()[0]))

    async def xml(self, domain: str, *, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return await self._call("xml", domain, lambda dom: dom.XMLDesc(flags))

    async def disks(self, domain: str) -> list[Disk]:
        """The domain's disks as they are now (sources change with snapshots and pivots)."""
        return domainxml.parse_disks(await self.xml(domain))

    async def block_capacity(self, domain: str, target: str) -> int:
        """The virtual size in bytes of one disk of the domain (libvirt's blockInfo capacity)."""
        return int(await self._call(f"block info {target}", domain, lambda dom: dom.blockInfo(target)[0]))

    async def list_domains(self) -> list[DomainInfo]:
        """Every domain defined or running on the host, sorted by name (one that goes while it is read, a
        migration's source for one, is left out)."""
        return sorted(await self._call("list domains", None, lambda conn: [
            info for d in conn.listAllDomains() if (info := _info_unless_gone(d)) is not None]),
            key=lambda info: info.name)

    async def poll_states(self) -> dict[str, DomainState]:
        """UUID -> state of every domain on the host (the monitoring fallback when events are not flowing)."""
        return {info.uuid: info.state for info in await self.list_domains()}

    # ------------------------------------------------------------------ definition

    async def define(self, xml: str) -> DomainInfo:
        """Define a new persistent domain from ``xml``, checked by libvirt against its schema; not started.

        OperationRefused when the host already has a domain of that name or UUID: libvirt would replace
        that domain's definition instead."""
        try:
            name, wanted_uuid = _identity(xml)
        except ValidationError as exc:
            raise OperationRefused(f"{context(self.name, None, 'define')}: {exc}", host=self.name) from exc

        def define(conn: libvirt.virConnect) -> DomainInfo:
            clash = _existing(conn, name, wanted_uuid)
            if clash is not None:
                raise OperationRefused(f"{context(self.name, name, 'define')}: refused: the host already has "
                                       f"domain {clash.name!r} ({clash.uuid})", host=self.name)
            return _info(conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE))

        return await self._call(f"define {name!r}", None, define)

    async def undefine(self, domain: str) -> None:
        """Remove a shut-off domain's definition (its disks stay)."""
        await self._call("undefine", domain, lambda dom: dom.undefineFlags(0))

    # ------------------------------------------------------------------ power

    async def start(self, domain: str) -> None:
        await self._call("start", domain, lambda dom: dom.create())

    async def shutdown(self, domain: str) -> None:
        """ACPI power button: the guest decides (nothing happens without an OS that listens)."""
        await self._call("shutdown", domain, lambda dom: dom.shutdown())

    async def destroy(self, domain: str) -> None:
        """Hard power-off."""
        await self._call("destroy", domain, lambda dom: dom.destroy())

    async def reboot(self, domain: str) -> None:
        """ACPI reboot request to the guest."""
        await self._call("reboot", domain, lambda dom: dom.reboot(0))

    async def reset(self, domain: str) -> None:
        """Hard reset, like the reset button."""
        await self._call("reset", domain, lambda dom: dom.reset(0))

    async def suspend(self, domain: str) -> None:
        await self._call("suspend", domain, lambda dom: dom.suspend())

    async def resume(self, domain: str) -> None:
        await self._call("resume", domain, lambda dom: dom.resume())

    # ------------------------------------------------------------------ guest agent

    async def fsfreeze(self, domain: str) -> int:
        """Freeze the guest's filesystems through the guest agent; the number frozen (0 is reported as is).

        GuestAgentError carries libvirt's words ("QEMU guest agent is not configured" / "... not connected").
        """
        return int(await self._call("fsfreeze", domain, lambda dom: dom.fsFreeze()))

    async def fsthaw(self, domain: str) -> int:
        """Thaw what fsfreeze froze; the number thawed."""
        return int(await self._call("fsthaw", domain, lambda dom: dom.fsThaw()))

    # ------------------------------------------------------------------ disk-only snapshot + blockcommit

    async def snapshot_disks(self, domain: str, overlays: Mapping[str, str], name: str | None = None) -> None:
        """External disk-only snapshot: each disk in ``overlays`` (target -> overlay file) gets a new qcow2
        overlay, atomically, without libvirt metadata; every other disk is left out (``snapshot='no'``).
        The guest keeps running and writes into the overlays from now on."""
        def snapshot(dom: libvirt.virDomain) -> None:
            try:
                xml = domainxml.disk_only_snapshot_xml(domainxml.parse_disks(dom.XMLDesc(0)), overlays, name)
            except ValidationError as exc:
                raise OperationRefused(f"{context(self.name, domain, 'snapshot')}: {exc}", host=self.name) from exc
            dom.snapshotCreateXML(xml, SNAPSHOT_DISK_ONLY)

        await self._call("snapshot", domain, snapshot)

    async def blockcommit(self, domain: str, disk: str, *, deadline: float, bandwidth_mib: int = 0,
                          poll_interval: float = 0.05, base: str | None = None) -> None:
        """Commit the active overlay of ``disk`` into the image it was taken on, then pivot back to it.

        SHALLOW makes the overlay's immediate backing file the base (not the deepest template); ``base`` (a
        file of the disk's backing chain) commits every layer above it into it instead. The job is
        polled until QEMU accepts the pivot. After ``deadline`` seconds the job is aborted and CommitTimeout
        raised: the guest then still runs on the overlay, which must not be deleted. ``bandwidth_mib``
        (MiB/s, 0 = unlimited) throttles the copy."""
        operation = f"blockcommit {disk}"
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline
        if await self._call(operation, domain, lambda dom: _start_or_adopt_commit(dom, disk, bandwidth_mib, base)):
            log.warning("%s: domain %s: %s: an active commit of this disk was running already (started by a daemon "
                        "that died?): it is finished here", self.name, domain, operation)
        while True:
            pivoted = await self._call(operation, domain, lambda dom: _try_pivot(dom, disk))
            if pivoted:
                log.info("%s: domain %s: %s pivoted", self.name, domain, operation)
                return
            if pivoted is None:
                raise VmmError(f"{context(self.name, domain, operation)}: the block job ended without a pivot "
                               "(cancelled or failed on the host)", host=self.name)
            if loop.time() >= give_up:
                await self._abort_commit(domain, disk, operation, deadline)
            await asyncio.sleep(poll_interval)

    async def commit_below(self, domain: str, disk: str, top: str, base: str, *, deadline: float,
                           poll_interval: float = 0.05) -> None:
        """Commit the layers of ``disk``'s backing chain from ``top`` (not the active one) down to ``base`` into
        ``base``; QEMU then points the layer above ``top`` at ``base``. The guest runs on meanwhile. After
        ``deadline`` seconds the job is aborted (the chain stays as it was) and CommitTimeout raised."""
        operation = f"blockcommit {disk} {top} into {base}"
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline
        await self._call(operation, domain, lambda dom: _start_or_adopt_commit(dom, disk, 0, base, top))
        while await self._call(operation, domain, lambda dom: bool(dom.blockJobInfo(disk, 0))):
            if loop.time() >= give_up:
                await self._call(operation, domain, lambda dom: dom.blockJobAbort(disk, 0))
                raise CommitTimeout(f"{context(self.name, domain, operation)}: not done within {deadline:g} s; job "
                                    "aborted, the chain is as it was", host=self.name)
            await asyncio.sleep(poll_interval)

    async def set_disk_file(self, domain: str, target: str, path: str) -> None:
        """Point file disk ``target`` of a shut-off domain at ``path`` (its definition rewritten)."""
        operation = f"set {target} to {path}"

        def redefine(dom: libvirt.virDomain) -> None:
            if dom.isActive():
                raise OperationRefused(f"{context(self.name, domain, operation)}: the domain runs: only a shut-off "
                                       "domain's disk files are changed this way", host=self.name)
            flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
            try:
                xml = domainxml.with_disk_file(dom.XMLDesc(flags), target, path)
            except ValidationError as exc:
                raise OperationRefused(f"{context(self.name, domain, operation)}: {exc}", host=self.name) from exc
            dom.connect().defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)

        await self._call(operation, domain, redefine)

    async def _abort_commit(self, domain: str, disk: str, operation: str, deadline: float) -> None:
        await self._call(operation, domain, lambda dom: dom.blockJobAbort(disk, 0))
        sources = {d.target: d.path for d in await self.disks(domain)}
        raise CommitTimeout(f"{context(self.name, domain, operation)}: not ready to pivot within {deadline:g} s; "
                            f"job aborted, the guest still runs on overlay {sources.get(disk)}", host=self.name)

    # ------------------------------------------------------------------ checkpoints and backup jobs (CBT)

    async def checkpoints(self, domain: str) -> list[str]:
        """The names of the domain's checkpoints, parents before children."""
        def names(dom: libvirt.virDomain) -> list[str]:
            return [c.getName() for c in dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)]

        return await self._call("list checkpoints", domain, names)

    async def redefine_checkpoint(self, domain: str, xml: str) -> None:
        """Give libvirt back its record of a checkpoint whose bitmaps are in the disks (metadata only)."""
        await self._call("redefine checkpoint", domain,
                         lambda dom: dom.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE))

    async def disk_bitmaps(self, domain: str) -> dict[str, list[Bitmap]]:
        """``{image file: its dirty bitmaps}`` as the running QEMU of ``domain`` has them (QMP)."""
        return parse_node_bitmaps(await self._call("query bitmaps", domain, _block_nodes))

    async def remove_bitmap(self, domain: str, path: str, name: str) -> None:
        """Remove the dirty bitmap ``name`` from the image ``path`` the running domain has open (QMP): one no
        checkpoint names any more, which would make the next checkpoint of that name fail."""
        def remove(dom: libvirt.virDomain) -> None:
            nodes = [n["node-name"] for n in json.loads(_block_nodes(dom))["return"]
                     if n.get("drv") == "qcow2" and n.get("file") == path]
            for node in nodes:
                _qmp(dom, "block-dirty-bitmap-remove", node=node, name=name)

        await self._call(f"remove bitmap {name}", domain, remove)

    async def delete_checkpoint(self, domain: str, name: str, *, metadata_only: bool = False) -> bool:
        """Delete checkpoint ``name`` and (unless ``metadata_only``) its bitmaps, merged into its parent's;
        False when there was no such checkpoint."""
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0

        def delete(dom: libvirt.virDomain) -> bool:
            try:
                dom.checkpointLookupByName(name, 0).delete(flags)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                    return False
                raise
            return True

        return await self._call(f"delete checkpoint {name}", domain, delete)

    async def backup(self, domain: str, backup_xml: str, checkpoint_xml: str, checkpoint: str, *,
                     deadline: float, poll_interval: float = 0.05) -> int:
        """Run a push-mode backup job to its end, creating checkpoint ``checkpoint`` as it starts; the bytes
        it copied. If the job fails, is cancelled or outlasts ``deadline`` seconds, it is aborted and the
        checkpoint it created deleted again, so the next attempt never meets a leftover bitmap."""
        await self.begin_backup(domain, backup_xml, checkpoint_xml)
        return await self.finish_backup(domain, checkpoint, deadline=deadline, poll_interval=poll_interval)

    async def begin_backup(self, domain: str, backup_xml: str, checkpoint_xml: str) -> None:
        """Start a push-mode backup job and, atomically with it, the checkpoint: the point in time of the
        backup is now (a frozen guest may be thawed as soon as this returns)."""
        await self._call("backup", domain, lambda dom: dom.backupBegin(backup_xml, checkpoint_xml, 0))

    async def finish_backup(self, domain: str, checkpoint: str, *, deadline: float,
                            poll_interval: float = 0.05) -> int:
        """Wait for the backup job begun with checkpoint ``checkpoint``; the bytes it copied (see backup)."""
        operation = "backup"
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline
        try:
            while await self._call(operation, domain, _job_running):
                if loop.time() >= give_up:
                    raise VmmError(f"{context(self.name, domain, operation)}: not finished within {deadline:g} s; "
                                   "aborted", host=self.name, retryable=True)
                await asyncio.sleep(poll_interval)
            stats: dict[str, Any] = await self._call(operation, domain, _completed_job)
            if stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
                raise VmmError(f"{context(self.name, domain, operation)}: the backup job failed: "
                               f"{stats.get('errmsg') or 'no reason given'}", host=self.name)
        except BaseException:
            await shielded(self._undo_backup(domain, checkpoint))
            raise
        return int(stats.get("disk_processed", stats.get("data_processed", 0)))

    async def abort_backup(self, domain: str) -> None:
        """Abort the domain's backup job, if one runs (a daemon that died left it: the job goes on in QEMU)."""
        await self._call("abort backup", domain, _abort_job)

    async def _undo_backup(self, domain: str, checkpoint: str) -> None:
        try:
            await self.abort_backup(domain)
        finally:
            await self.delete_checkpoint(domain, checkpoint)

    # ------------------------------------------------------------------ system snapshots (internal)

    async def create_system_snapshot(self, domain: str, name: str, description: str | None = None) -> None:
        """Internal snapshot of memory (when running) and all disks, kept inside the qcow2 images.

        Refused when a writable disk is not a qcow2 file or block device: libvirt 9.0 cannot revert
        external snapshots and internal ones need qcow2."""
        operation = f"system snapshot {name!r}"

        def create(dom: libvirt.virDomain) -> None:
            reason = domainxml.internal_snapshot_blocker(domainxml.parse_disks(dom.XMLDesc(0)))
            if reason:
                raise OperationRefused(f"{context(self.name, domain, operation)}: refused: {reason}", host=self.name)
            dom.snapshotCreateXML(domainxml.internal_snapshot_xml(name, description), 0)

        await self._call(operation, domain, create)

    async def revert_system_snapshot(self, domain: str, name: str) -> None:
        await self._call(f"revert system snapshot {name!r}", domain,
                         lambda dom: dom.revertToSnapshot(dom.snapshotLookupByName(name), 0))

    async def delete_system_snapshot(self, domain: str, name: str) -> None:
        await self._call(f"delete system snapshot {name!r}", domain,
                         lambda dom: dom.snapshotLookupByName(name).delete(0))

    async def system_snapshots(self, domain: str) -> list[str]:
        return sorted(await self._call("list system snapshots", domain, lambda dom: dom.snapshotListNames(0)))

    # ------------------------------------------------------------------ metadata of replaced disks

    async def drop_snapshot_metadata(self, domain: str) -> list[str]:
        """Forget every libvirt snapshot of the domain, metadata only (the disk files are not touched: after
        an in-place restore they hold none of it); the names forgotten."""
        return await self._call("drop snapshot metadata", domain, _drop_snapshots)

    async def drop_checkpoint_metadata(self, domain: str) -> list[str]:
        """Forget every libvirt checkpoint of the domain, metadata only; the names forgotten."""
        return await self._call("drop checkpoint metadata", domain, _drop_checkpoints)

    # ------------------------------------------------------------------ disk snapshots (qemu-img, VM off)

    async def disk_snapshots(self, domain: str, disk: str) -> list[str]:
        """Internal snapshot names inside the qcow2 image of ``disk`` (works while the VM runs)."""
        target = await self._snapshot_disk(domain, disk, "list disk snapshots", need_off=False)
        out = await self._run(domain, f"list disk snapshots of {disk}",
                              ["qemu-img", "info", "-U", "--output=json", target.path or ""])
        return [entry["name"] for entry in json.loads(out).get("snapshots", [])]

    async def create_disk_snapshot(self, domain: str, disk: str, name: str) -> None:
        await self._disk_snapshot(domain, disk, name, "-c", "create")

    async def revert_disk_snapshot(self, domain: str, disk: str, name: str) -> None:
        await self._disk_snapshot(domain, disk, name, "-a", "revert")

    async def delete_disk_snapshot(self, domain: str, disk: str, name: str) -> None:
        await self._disk_snapshot(domain, disk, name, "-d", "delete")

    async def _disk_snapshot(self, domain: str, disk: str, name: str, flag: str, verb: str) -> None:
        operation = f"{verb} disk snapshot {name!r} of {disk}"
        target = await self._snapshot_disk(domain, disk, operation, need_off=True)
        await self._run(domain, operation, ["qemu-img", "snapshot", flag, name, target.path or ""])

    async def _snapshot_disk(self, domain: str, disk: str, operation: str, *, need_off: bool) -> Disk:
        if need_off and (state := await self.state(domain)) != DomainState.SHUTOFF:
            raise OperationRefused(f"{context(self.name, domain, operation)}: refused: the VM is {state}; "
                                   f"{DISK_SNAPSHOT_REASON}", host=self.name)
        try:
            target = domainxml.disk_by_target(await self.disks(domain), disk)
        except ValidationError as exc:
            raise OperationRefused(f"{context(self.name, domain, operation)}: {exc}", host=self.name) from exc
        if target.type != "file" or target.format != "qcow2" or not target.path:
            raise OperationRefused(f"{context(self.name, domain, operation)}: refused: disk {disk} is a "
                                   f"{target.format or 'unknown'} {target.type} disk; internal disk snapshots "
                                   "need a qcow2 file", host=self.name)
        return target

    async def _run(self, domain: str, operation: str, argv: list[str]) -> str:
        if self._runner is None:
            raise VmmError(f"{context(self.name, domain, operation)}: no command runner for this host", host=self.name)
        try:
            return await self._runner(argv, time_limit=self.command_timeout)
        except DriverError as exc:
            raise VmmError(f"{context(self.name, domain, operation)}: {exc}", host=self.name,
                           retryable=exc.retryable) from exc

    # ------------------------------------------------------------------ lifecycle events

    async def watch_states(self, callback: events.StateCallback) -> None:
        """Deliver every lifecycle change of the host's domains to ``callback`` on the running loop.

        One subscriber per host; it survives reconnections. Events can be lost while the connection is
        down, so keep calling :meth:`poll_states` now and then as well."""
        loop = asyncio.get_running_loop()
        self._subscriber = (loop, callback)

        def subscribe(conn: libvirt.virConnect) -> None:
            self._unsubscribe_in_thread()
            handler = events.lifecycle_handler(self.name, loop, callback)
            self._callback_id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, handler, None)

        await self._call("watch states", None, subscribe)

    async def unwatch_states(self) -> None:
        self._subscriber = None
        await self._call("unwatch states", None, lambda _conn: self._unsubscribe_in_thread())

    def _unsubscribe_in_thread(self) -> None:
        callback_id, self._callback_id = self._callback_id, None
        if callback_id is not None and self._conn is not None:
            try:
                self._conn.domainEventDeregisterAny(callback_id)
            except libvirt.libvirtError as exc:
                log.debug("%s: deregistering events: %s", self.name, exc)


def _info(dom: libvirt.virDomain) -> DomainInfo:
    return DomainInfo(name=dom.name(), uuid=dom.UUIDString(), state=state_from_libvirt(dom.state()[0]))


def _info_unless_gone(dom: libvirt.virDomain) -> DomainInfo | None:
    try:
        return _info(dom)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _identity(xml: str) -> tuple[str, str | None]:
    """The name and the UUID (None when libvirt is to choose one) of a domain XML."""
    try:
        root = etree.fromstring(xml.encode(), etree.XMLParser(resolve_entities=False, no_network=True))
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise ValidationError(f"domain XML does not parse: {exc}") from None
    name, wanted_uuid = (root.findtext("name") or "").strip(), (root.findtext("uuid") or "").strip()
    if root.tag != "domain" or not name:
        raise ValidationError("not a libvirt domain XML with a <name>")
    return name, wanted_uuid or None


def _existing(conn: libvirt.virConnect, name: str, wanted_uuid: str | None) -> DomainInfo | None:
    """The domain called ``name`` or with UUID ``wanted_uuid``, if the host has one."""
    lookups: list[Callable[[], libvirt.virDomain]] = [lambda: conn.lookupByName(name)]
    if wanted_uuid:
        lookups.append(lambda: conn.lookupByUUIDString(wanted_uuid))
    for lookup in lookups:
        try:
            return _info(lookup())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    return None


def _start_or_adopt_commit(dom: libvirt.virDomain, disk: str, bandwidth_mib: int, base: str | None = None,
                           top: str | None = None) -> bool:
    """Start the commit of ``disk``: active and shallow, active into ``base``, or of ``top`` into ``base``;
    True when a commit of that kind was running already (the same job, left by a daemon that died before
    its end), which the caller then takes over."""
    job = dom.blockJobInfo(disk, 0)
    kind = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT if top else libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
    if job and job.get("type") == kind:
        return True
    if top is not None:
        dom.blockCommit(disk, base, top, bandwidth_mib, 0)
    elif base is not None:
        dom.blockCommit(disk, base, None, bandwidth_mib, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
    else:
        dom.blockCommit(disk, None, None, bandwidth_mib, COMMIT_ACTIVE_SHALLOW)
    return False


def _try_pivot(dom: libvirt.virDomain, disk: str) -> bool | None:
    """Pivot ``disk`` to its committed base if the job is ready; False while it is still copying, None when
    there is no job any more."""
    info: dict[str, Any] = dom.blockJobInfo(disk, 0)
    if not info:
        return None
    if info.get("cur") != info.get("end"):
        return False
    try:
        dom.blockJobAbort(disk, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:  # "not ready for pivot yet"
            return False
        raise
    return True


def _job_running(dom: libvirt.virDomain) -> bool:
    kind = int(dom.jobInfo()[0])
    return bool(kind != libvirt.VIR_DOMAIN_JOB_NONE)


def _completed_job(dom: libvirt.virDomain) -> dict[str, Any]:
    stats: dict[str, Any] = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    return stats


def _qmp(dom: libvirt.virDomain, command: str, **arguments: object) -> str:
    """One QMP command to the domain's QEMU (through libvirt); its JSON reply."""
    reply: str = libvirt_qemu.qemuMonitorCommand(dom, json.dumps({"execute": command, "arguments": arguments}), 0)
    return reply


def _block_nodes(dom: libvirt.virDomain) -> str:
    return _qmp(dom, "query-named-block-nodes", flat=True)


def _abort_job(dom: libvirt.virDomain) -> None:
    """Abort the domain's job if one runs (a backup that already ended has none)."""
    if _job_running(dom):
        dom.abortJob()


def _drop_snapshots(dom: libvirt.virDomain) -> list[str]:
    return _forget_all(dom.listAllSnapshots(0), libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY,
                       libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT)


def _drop_checkpoints(dom: libvirt.virDomain) -> list[str]:
    return _forget_all(dom.listAllCheckpoints(0), libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY,
                       libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT)


def _forget_all(objects: list[Any], flags: int, gone: int) -> list[str]:
    """``delete(flags)`` each snapshot or checkpoint; one already gone (with its parent) is not an error."""
    names = []
    for obj in objects:
        try:
            obj.delete(flags)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != gone:
                raise
        names.append(obj.getName())
    return sorted(names)
