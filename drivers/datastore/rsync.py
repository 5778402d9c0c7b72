"""The ``rsync`` backup datastore (spec §5.4): directories on a backup server reached over SSH.

Data goes from the hypervisor straight to the backup server: ``rsync`` runs on the hypervisor (through the
caller's runner for it) with ``-e`` set to the caller's ssh command, which must carry the key and the
known_hosts holding the server's verified host key; the scheduler only runs metadata commands on the
server (mkdir, rename, df, cat, rm). Each file's sha256 is computed on the hypervisor while rsync sends it.

Template attributes: ``RSYNC_HOST`` (required), ``RSYNC_USER`` (default ``oneadmin``), ``RSYNC_PORT`` (our
extension, default 22), ``RSYNC_ARGS`` (default ``-aS``; options only), ``RSYNC_NICE``, ``RSYNC_IONICE``,
``RSYNC_BWLIMIT`` (our extension: rsync ``--bwlimit``, e.g. ``10M``), ``BASE_PATH``, ``LIMIT_MB``.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Sequence
from typing import Any, Protocol

from drivers.commands import CommandFailed, Runner
from drivers.datastore.base import (
    COMMAND_TIMEOUT,
    PROGRESS_INTERVAL,
    FetchRequest,
    ProcessStarted,
    Progress,
    TreeDatastore,
    UploadRequest,
    UploadResult,
    fetch_each,
    first_error,
    int_attribute,
    on_side,
    parse_digests,
    rsync_ssh,
    staged_paths,
    streamed_digest,
    streamed_to,
)
from drivers.datastore.limits import checked_bwlimit, priority
from drivers.sink import NO_SINK, DriverSink
from drivers.sshtarget import SshTarget
from scheduler.errors import ValidationError
from scheduler.model.objects.datastore import Datastore

DEFAULT_USER = "oneadmin"
DEFAULT_ARGS = "-aS"
DEFAULT_PORT = 22
# Used when the caller gives no ssh command: AES-GCM first (fastest with AES-NI), batch mode, strict keys.
DEFAULT_SSH = ("ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-c", "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*\Z")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
_OWNED_OPTIONS = ("-e", "--rsh")  # the driver sets the transport itself
# rsync's exit statuses for a connection that failed rather than the data: 10 socket I/O, 12 the data stream
# broke, 30 and 35 timeouts, 255 the ssh under it died. Trying again may succeed.
CONNECTION_LOST = frozenset({10, 12, 30, 35, 255})
# fetch_all, on the backup server: each file's size on a line, then the files one after the other.
_SIZES_THEN_FILES = 'for f; do stat -L -c %s -- "$f" || exit; done; exec cat -- "$@"'
# fetch_all, on the hypervisor: $1 = n, then n destinations, then the command printing the above. Each
# file is cut from the stream by its size (bash's read and head -c never read past what they need from a
# pipe), checked for length, then all are hashed.
_RECEIVE_FILES = (
    'set -o pipefail; n=$1; shift; dests=("${@:1:n}"); shift "$n"; '
    '"$@" | { sizes=(); for d in "${dests[@]}"; do IFS= read -r size || exit 1; sizes+=("$size"); done; '
    'i=0; for d in "${dests[@]}"; do head -c "${sizes[i]}" > "$d" || exit 1; '
    'got=$(stat -c %s -- "$d") || exit 1; '
    '[ "$got" = "${sizes[i]}" ] || { echo "$d: $got of ${sizes[i]} bytes arrived" >&2; exit 1; }; '
    'i=$((i+1)); done; } && openssl dgst -sha256 -r -- "${dests[@]}"'
)


class RunnerFactory(Protocol):
    """An :class:`drivers.ssh.SshPool`, or anything that hands out a runner per SSH target."""

    def runner(self, target: SshTarget) -> Runner: ...


def server_target(datastore: Datastore) -> SshTarget:
    """The backup server named by RSYNC_HOST / RSYNC_PORT / RSYNC_USER."""
    host = (datastore.template.get("RSYNC_HOST") or "").strip()
    if not _HOST.match(host):
        raise ValidationError(f"datastore {datastore.id}: RSYNC_HOST must be a host name or address, got {host!r}")
    user = (datastore.template.get("RSYNC_USER") or "").strip() or DEFAULT_USER
    if not _USER.match(user):
        raise ValidationError(f"datastore {datastore.id}: bad RSYNC_USER {user!r}")
    port = int_attribute(datastore, "RSYNC_PORT", 1, 65535) or DEFAULT_PORT
    return SshTarget(host, port, user)


def rsync_options(datastore: Datastore, prefix: str = "RSYNC") -> list[str]:
    """``<prefix>_ARGS`` (default ``-aS``) plus ``-W`` (new files: no delta algorithm) and ``--bwlimit`` from
    ``<prefix>_BWLIMIT``."""
    raw = datastore.template.get(f"{prefix}_ARGS") or DEFAULT_ARGS
    try:
        words = shlex.split(raw)
    except ValueError as exc:
        raise ValidationError(f"datastore {datastore.id}: {prefix}_ARGS does not parse: {exc}") from None
    for word in words:
        if not word.startswith("-") or word.split("=", 1)[0] in _OWNED_OPTIONS:
            raise ValidationError(f"datastore {datastore.id}: {prefix}_ARGS may only hold rsync options "
                                  f"(not -e/--rsh or file names), got {word!r}")
    words.append("-W")
    bwlimit = checked_bwlimit(datastore, prefix)
    if bwlimit:
        words.append(f"--bwlimit={bwlimit}")
    return words


def remote(target: SshTarget) -> str:
    """``user@host`` as rsync wants it (an IPv6 address in brackets)."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"{target.user}@{host}"


async def run_rsync(runner: Runner, argv: Sequence[str], **options: Any) -> None:
    """``runner.run(argv)`` of an rsync; a failure that was the connection's is marked retryable."""
    try:
        await runner.run(argv, **options)
    except CommandFailed as exc:
        if exc.exit_status not in CONNECTION_LOST:
            raise
        raise CommandFailed(exc.argv, exc.exit_status, exc.stderr_tail.encode(), host=exc.host,
                            retryable=True) from exc


class RsyncDatastore(TreeDatastore):
    """Backups as directories on RSYNC_HOST; uploads sent from the hypervisor by rsync over ssh."""

    HYPERVISOR_TOOLS = ("qemu-img", "rsync")
    SHARED_UPLOAD_CONNECTION = True
    REQUIRED_ATTRIBUTES = ("RSYNC_HOST", "RSYNC_USER")  # as OpenNebula's DS_MAD_CONF
    PORT_ATTRIBUTES = ("RSYNC_PORT",)
    SERVER_ATTRIBUTES = ("RSYNC_HOST", "RSYNC_PORT", "RSYNC_USER")

    def __init__(self, datastore: Datastore, server: Runner, *, command_timeout: float = COMMAND_TIMEOUT,
                 progress_interval: float = PROGRESS_INTERVAL) -> None:
        super().__init__(datastore, server, command_timeout=command_timeout, progress_interval=progress_interval)
        self.target = server_target(datastore)
        self.options = rsync_options(datastore)
        self.nice, self.ionice = priority(datastore, "RSYNC")

    @classmethod
    def connect(cls, datastore: Datastore, pool: RunnerFactory, **settings: float) -> RsyncDatastore:
        return cls(datastore, pool.runner(server_target(datastore)), **settings)

    async def upload(self, request: UploadRequest, sink: DriverSink = NO_SINK) -> UploadResult:
        """Send ``files`` of ``staging_dir`` (on the hypervisor ``source`` runs on) into backup ``backup_id``."""
        source, staging_dir, files, timeout = request.source, request.staging_dir, request.files, request.timeout
        vm_id, backup_id, ssh_command = request.vm_id, request.backup_id, request.ssh_command
        progress: Progress | None = sink.files_progress if request.progress else None
        started: ProcessStarted = sink.process_started
        paths = staged_paths(staging_dir, files)
        remote_shell = rsync_ssh(ssh_command or DEFAULT_SSH, self.target.port)

        async def transfer(tmp: str) -> None:
            argv = ["rsync", *self.options, "-e", remote_shell, "--", *paths, f"{remote(self.target)}:{tmp}/"]
            await run_rsync(source, argv, timeout=timeout, nice=self.nice, ionice=self.ionice,
                            started=on_side(started, "source"))

        return await self._upload(source, paths, vm_id, backup_id, timeout, transfer, progress,
                                  self.nice, self.ionice, started)

    async def fetch(self, request: FetchRequest, sink: DriverSink = NO_SINK) -> str:
        """``ssh <server> cat`` run on the hypervisor into the destination, hashing the bytes on the way."""
        source = self.layout.file_path(request.vm_id, request.backup_id, request.name)
        argv = streamed_to(request.destination, [*self._ssh(request), "cat -- " + shlex.quote(source)])
        result = await request.target.run(argv, timeout=request.timeout, nice=self.nice, ionice=self.ionice,
                                          started=on_side(sink.process_started, "host"))
        return streamed_digest(result.stdout)

    def _ssh(self, request: FetchRequest) -> list[str]:
        """The hypervisor's ssh to the backup server, for a command there."""
        server = self.target
        return [*(request.ssh_command or DEFAULT_SSH), "-p", str(server.port), f"{server.user}@{server.host}"]

    async def fetch_all(self, requests: Sequence[FetchRequest], sink: DriverSink = NO_SINK) -> list[str | None]:
        """The first file (a chain's base, the big one) through :meth:`fetch`, in its own ssh session whose
        output is the file itself; at the same time all the others through one more session, so that a chain
        costs two handshakes, not one per link (a stream cut up by the receiver costs an extra copy through a
        pipe: measured 1.5x slower for a 1 GiB file, so the base is never in it)."""
        if len(requests) < 3:
            return await fetch_each(self.fetch, requests, sink)
        first, rest = requests[0], requests[1:]
        try:
            async with asyncio.TaskGroup() as group:
                base = group.create_task(self.fetch(first, sink))
                others = group.create_task(self._fetch_stream(rest, sink))
        except BaseExceptionGroup as failed:
            raise first_error(failed) from None
        return [base.result(), *others.result()]

    async def _fetch_stream(self, requests: Sequence[FetchRequest], sink: DriverSink) -> list[str]:
        """The files through one ssh session: the server prints the sizes, then the files; the hypervisor cuts
        the stream into the destinations and hashes them."""
        first = requests[0]
        if any(request.target is not first.target for request in requests):
            raise ValueError("fetch_all copies to one host")
        sources = [self.layout.file_path(r.vm_id, r.backup_id, r.name) for r in requests]
        destinations = [request.destination for request in requests]
        sender = shlex.join(["sh", "-c", _SIZES_THEN_FILES, "sh", *sources])
        argv = ["bash", "-c", _RECEIVE_FILES, "bash", str(len(requests)), *destinations, *self._ssh(first), sender]
        result = await first.target.run(argv, timeout=first.timeout, nice=self.nice, ionice=self.ionice,
                                        started=on_side(sink.process_started, "host"))
        digests = parse_digests(result.stdout, destinations)
        return [digests[destination] for destination in destinations]
