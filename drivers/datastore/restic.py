"""The ``restic`` backup datastore (spec §5.5): one restic repository per VM on an SFTP server.

The repository of VM ``n`` is ``<BASE_PATH>/<n>`` on RESTIC_SFTP_SERVER. Repository commands (init,
snapshots, dump, forget, unlock) run *on the server* against the plain path; the upload runs ``restic
backup`` *on the hypervisor* against ``sftp:<user>@<server>:<path>``, through the caller's ssh command, so
disk data goes from the hypervisor to the server directly. Each upload is one snapshot tagged
``vmsched-<vm_id>``; its backup id is the first 8 characters of the snapshot id. The id the caller chose
before the upload (``new_backup_id``) is also kept as tag ``vmsched-backup-<id>``, and every lookup accepts
either. The files are backed up from inside their directory, so each is at ``/<name>`` in the snapshot (tag
``vmsched-flat``): a read selects the snapshot by the backup's tag in the ``restic dump`` itself, with no
listing of the repository first (each restic command pays the key's derivation, about half a second).

RESTIC_PASSWORD never appears in a command line: each restic command runs inside a fixed ``sh`` script that
writes its stdin (the password) to a fresh 0600 file, runs restic with ``--password-file`` and removes the
file; the driver removes it again when the command did not finish. Error texts are scanned for it.

Changes to a repository are serialised per repository inside this process. A command that finds the
repository locked runs ``restic unlock`` (which removes stale locks only, e.g. left by a killed restic) and
tries again with backoff until ``lock_wait`` seconds have passed, then reports who holds the lock.

Template attributes: ``RESTIC_PASSWORD`` (required), ``RESTIC_SFTP_SERVER`` (required), ``RESTIC_SFTP_USER``
(default ``oneadmin``), ``RESTIC_SFTP_PORT`` (our extension, default 22), ``RESTIC_COMPRESSION``
(``auto``/``off``/``max``), ``RESTIC_BWLIMIT`` (KiB/s), ``RESTIC_CONNECTIONS`` (default 5),
``RESTIC_MAXPROC`` (``GOMAXPROCS``), ``RESTIC_NICE``, ``RESTIC_IONICE``, ``RESTIC_PRUNE_MAX_REPACK``,
``RESTIC_PRUNE_MAX_UNUSED`` (default 0), ``BASE_PATH``, ``LIMIT_MB``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import shlex
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from drivers.commands import Result, Runner, Started, shielded, stderr_tail
from drivers.datastore import layout, merge
from drivers.datastore.base import (
    COMMAND_TIMEOUT,
    MAX_SMALL_FILE,
    MIB,
    PROGRESS_INTERVAL,
    Capacity,
    FetchRequest,
    FlattenRequest,
    ProcessStarted,
    Progress,
    UploadRequest,
    UploadResult,
    apply_limit,
    fetch_each,
    first_error,
    hash_files,
    int_attribute,
    keep_probing,
    on_side,
    parse_df,
    run_label,
    staged_paths,
    staged_sizes,
    streamed_digest,
    streamed_to,
)
from drivers.datastore.check import ImageCheck, qemu_img_check
from drivers.datastore.layout import Layout
from drivers.datastore.limits import priority
from drivers.datastore.rsync import _HOST, _USER, DEFAULT_SSH, DEFAULT_USER, RunnerFactory
from drivers.sink import NO_SINK, DriverSink
from drivers.sshtarget import SshTarget
from scheduler.errors import DriverError, NotFound, ValidationError
from scheduler.model.objects.datastore import Datastore

log = logging.getLogger(__name__)

DEFAULT_PORT = 22
DEFAULT_CONNECTIONS = 5
SHORT_ID = 8  # characters of a snapshot id that make the backup id (OpenNebula's driver does the same)
TAG_PREFIX = "vmsched-"
URL_DIR = "backup"  # backup URLs name a restic file as <BASE_PATH>/<vm_id>/backup/<file>
BACKUP_TAG_PREFIX = "vmsched-backup-"
# On a snapshot whose files were backed up from inside their directory: each is at /<name> in it, so a read
# needs neither the snapshot id nor its paths (no listing of the repository first, itself one more restic
# command). Snapshots without it (older vmsched) are found by a listing.
FLAT_TAG = "vmsched-flat"
NO_SNAPSHOT = b"latest snapshot for criteria not found"
NO_FILE = b"not found in snapshot"
LOCK_WAIT = 300.0  # seconds a command waits for a repository locked elsewhere (spec: 60 x 5 s)
LOCK_BACKOFF = (0.5, 5.0)  # first and longest pause between two attempts on a locked repository
PASSWORD_FILE_PREFIX = "vmsched-restic-"
PASSWORD_FILE_DIR = "/tmp"
MASK = "******"
WRITE_PASSWORD_FAILED = 125
# $1: the password file, "$@" after it: the restic command. The file is created with O_EXCL (set -C), mode
# 0600, from stdin, and removed however the shell ends short of SIGKILL.
# $1 a private directory, $2 the repository, $3 the password file, then (snapshot id, path) pairs: each
# dumped to $1/<n>. Run by _WITH_PASSWORD, which writes and removes the password file.
_DUMP_FILES = """\
umask 077
d=$1; repo=$2; password=$3; shift 3
n=0
while [ "$#" -ge 2 ]; do
  restic --repo "$repo" --password-file "$password" dump --no-lock "$1" "$2" > "$d/$n" || exit 1
  n=$((n + 1)); shift 2
done
"""
_WITH_PASSWORD = """\
umask 077; set -C
f=$1; shift
cat > "$f" || exit 125
trap 'rm -f -- "$f"' EXIT; trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM
"$@"
"""
_MONITOR = 'mkdir -p -- "$1" && df -PB1M -- "$1"'
# bash -c: $1 a file, "$@" after it restic: its (JSON) output goes to stdout and to the file, where the
# progress probe reads the last status line; pipefail keeps restic's exit status. A SIGTERM to the process group
# (a cancel) ends restic, and bash waits for it: a restic re-parented to an init that reaps late would look
# alive to the ``restic unlock`` that follows, which then keeps its lock.
_TEE_STATUS = 'trap : TERM INT; set -o pipefail; cd -- "$1" || exit 1; f=$2; shift 2; "$@" | tee -- "$f"'
_IN_DIR = 'cd -- "$1" || exit 1; shift; exec "$@"'
# waits up to 10 s until none of the process groups "$@" has a process left
_GONE = 'for _ in $(seq 100); do a=; for g; do kill -0 -- "-$g" 2>/dev/null && a=1; done; [ -z "$a" ] && exit 0; ' \
        'sleep 0.1; done; exit 1'
STATUS_FILE = "restic-status.json"  # in the backup's staging directory, which goes with it
_SIZE = re.compile(r"[0-9]+[kKmMgGtT]?\Z")
_UNUSED = re.compile(r"([0-9]+[kKmMgGtT%]?|unlimited)\Z")
_LOCKED = re.compile(r"repository is already locked (?:exclusively )?by (.+?)(?: \(UID [^)]*\))?\n"
                     r"(?:lock was created at (.+?) \()?")
_NO_REPO = ("Is there a repository at the following location?", "unable to open config file")


# --- template attributes (pure) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ResticSettings:
    """What the datastore template says about the repositories and how to reach them."""

    password: str = field(repr=False)
    target: SshTarget
    compression: str | None = None  # off | max; None: restic's auto
    bwlimit: int | None = None  # KiB/s, both directions
    connections: int | None = None  # only when not restic's default 5
    maxproc: int | None = None
    nice: int | None = None
    ionice: int | None = None
    prune_options: tuple[str, ...] = ("--max-unused", "0")


def restic_settings(datastore: Datastore) -> ResticSettings:
    template = datastore.template
    password = (template.get("RESTIC_PASSWORD") or "").strip()
    if len(password) >= 2 and password[0] == password[-1] and password[0] in "'\"":
        password = password[1:-1]
    if not password:
        raise ValidationError(f"datastore {datastore.id}: RESTIC_PASSWORD is required")
    if "\n" in password or "\0" in password:
        raise ValidationError(f"datastore {datastore.id}: RESTIC_PASSWORD must be a single line")
    compression = (template.get("RESTIC_COMPRESSION") or "auto").strip()
    connections = int_attribute(datastore, "RESTIC_CONNECTIONS", 1, 1024)
    nice, ionice = priority(datastore, "RESTIC")
    return ResticSettings(
        password=password, target=sftp_target(datastore),
        compression=compression if compression in ("off", "max") else None,
        bwlimit=int_attribute(datastore, "RESTIC_BWLIMIT", 1),
        connections=None if connections in (None, DEFAULT_CONNECTIONS) else connections,
        maxproc=int_attribute(datastore, "RESTIC_MAXPROC", 1, 4096), nice=nice, ionice=ionice,
        prune_options=prune_options(datastore))


def sftp_target(datastore: Datastore) -> SshTarget:
    """The SFTP server named by RESTIC_SFTP_SERVER / RESTIC_SFTP_PORT / RESTIC_SFTP_USER."""
    host = (datastore.template.get("RESTIC_SFTP_SERVER") or "").strip()
    if not _HOST.match(host):
        raise ValidationError(f"datastore {datastore.id}: RESTIC_SFTP_SERVER must be a host name or address, "
                              f"got {host!r}")
    user = (datastore.template.get("RESTIC_SFTP_USER") or "").strip() or DEFAULT_USER
    if not _USER.match(user):
        raise ValidationError(f"datastore {datastore.id}: bad RESTIC_SFTP_USER {user!r}")
    return SshTarget(host, int_attribute(datastore, "RESTIC_SFTP_PORT", 1, 65535) or DEFAULT_PORT, user)


def prune_options(datastore: Datastore) -> tuple[str, ...]:
    """``--max-unused`` (RESTIC_PRUNE_MAX_UNUSED, default 0) and ``--max-repack-size`` when set."""
    unused = (datastore.template.get("RESTIC_PRUNE_MAX_UNUSED") or "0").strip()
    repack = (datastore.template.get("RESTIC_PRUNE_MAX_REPACK") or "").strip()
    if not _UNUSED.match(unused):
        raise ValidationError(f"datastore {datastore.id}: RESTIC_PRUNE_MAX_UNUSED must be like 10%, 5G or "
                              f"unlimited, got {unused!r}")
    if repack and not _SIZE.match(repack):
        raise ValidationError(f"datastore {datastore.id}: RESTIC_PRUNE_MAX_REPACK must be like 500M, got {repack!r}")
    return ("--max-unused", unused) + (("--max-repack-size", repack) if repack else ())


# --- command lines and outputs (pure) ---------------------------------------------------------------------

_REMOVE_PREFIXED = 'for f in "$1"*; do if [ -e "$f" ]; then rm -f -- "$f"; fi; done'


async def remove_password_files(runner: Runner, prefix: str, timeout: float) -> None:  # noqa: ASYNC109
    """Remove the password files whose names begin with ``prefix`` (a killed restic cannot remove its own)."""
    await runner.run(["sh", "-c", _REMOVE_PREFIXED, "sh", prefix], timeout=timeout)


def labelled_password_files(label: str) -> str:
    """How the names of the password files of restic commands run with ``label`` begin."""
    return f"{PASSWORD_FILE_DIR}/{PASSWORD_FILE_PREFIX}{label}-"


def password_file_prefix(staging_dir: str, vm_id: int) -> str:
    """How the names of the password files a backup's restic commands write on the hypervisor begin."""
    return f"{PASSWORD_FILE_DIR}/{PASSWORD_FILE_PREFIX}{run_label(staging_dir, vm_id)}-"


def new_password_file(label: str = "") -> str:
    """A fresh password file name; ``label`` (a run's) lets a recovery find the file a killed restic left."""
    return f"{PASSWORD_FILE_DIR}/{PASSWORD_FILE_PREFIX}{label + '-' if label else ''}{secrets.token_hex(8)}"


def with_password(password_file: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run by the script that writes its stdin (the password) to ``password_file`` first."""
    return ["sh", "-c", _WITH_PASSWORD, "sh", password_file, *argv]


def sftp_repository(target: SshTarget, path: str) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return f"sftp:{target.user}@{host}:{path}"


def sftp_command(ssh_command: Sequence[str], target: SshTarget) -> str:
    """restic's ``sftp.command``: the caller's ssh argv, ``-p port`` unless it names one, ``-s sftp``. restic
    splits its ``-o`` options at commas, so a cipher list (``-c a,b``) keeps its first cipher only."""
    words = [word.split(",", 1)[0] if previous == "-c" else word
             for previous, word in zip(["", *ssh_command], ssh_command, strict=False)]
    comma = next((word for word in words if "," in word), None)
    if comma is not None:
        raise ValidationError(f"restic's sftp.command cannot carry a comma (restic splits its options there): "
                              f"{comma!r}")
    if "-p" not in words:
        words[1:1] = ["-p", str(target.port)]
    return shlex.join([*words, f"{target.user}@{target.host}", "-s", "sftp"])


def transfer_options(settings: ResticSettings) -> list[str]:
    """Global options of the commands that move data: compression, bandwidth, connections."""
    words = [] if settings.compression is None else ["--compression", settings.compression]
    if settings.bwlimit is not None:
        words += ["--limit-upload", str(settings.bwlimit), "--limit-download", str(settings.bwlimit)]
    if settings.connections is not None:
        words += ["-o", f"sftp.connections={settings.connections}"]
    return words


def parse_summary(stdout: bytes) -> dict[str, Any]:
    """The ``summary`` message of ``restic backup --json`` (the last JSON line of that type)."""
    for line in reversed(stdout.decode("utf-8", "replace").splitlines()):
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("message_type") == "summary" and message.get("snapshot_id"):
            return message
    raise DriverError(f"restic backup printed no summary: {stdout[-300:]!r}")


def parse_status(output: bytes) -> tuple[int, int] | None:
    """(bytes done, bytes in total) of the last ``status`` line of ``restic backup --json``; None before
    the first one (or when the last line is cut short)."""
    lines = output.decode("utf-8", "replace").strip().splitlines()
    try:
        message = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("message_type") != "status":
        return None
    total = int(message.get("total_bytes") or 0)
    return min(int(message.get("bytes_done") or 0), total), total


def node_size(stdout: bytes, path: str) -> int:
    """The size of file ``path`` in the output of ``restic ls --json``."""
    for line in stdout.decode("utf-8", "replace").splitlines():
        try:
            node = json.loads(line)
        except ValueError:
            continue
        if isinstance(node, dict) and node.get("path") == path and node.get("type") == "file":
            return int(node.get("size") or 0)
    raise NotFound(f"restic lists no file {path}")


def parse_snapshots(stdout: bytes) -> list[dict[str, Any]]:
    try:
        snapshots = json.loads(stdout or b"[]")
    except ValueError:
        raise DriverError(f"cannot read restic snapshots output: {stdout[-200:]!r}") from None
    if not isinstance(snapshots, list):
        raise DriverError("restic snapshots printed no list")
    return snapshots


def backup_tags(vm_id: int, backup_id: str) -> list[str]:
    """The tags of a backup's snapshot: the VM's, the backup id's, and FLAT_TAG (files at /<name>)."""
    return ["--tag", f"{TAG_PREFIX}{vm_id}", "--tag", f"{BACKUP_TAG_PREFIX}{backup_id}", "--tag", FLAT_TAG]


def matches(snapshot: dict[str, Any], source: str) -> bool:
    """A backup id names a snapshot by its id's prefix or by the tag given at upload."""
    return str(snapshot.get("id", "")).startswith(source) or f"{BACKUP_TAG_PREFIX}{source}" in (
        snapshot.get("tags") or [])


def lock_holder(stderr: bytes) -> str | None:
    """``PID 12 on host1 by root since 2026-11-26 07:19:15`` when restic says the repository is locked."""
    match = _LOCKED.search(stderr.decode("utf-8", "replace"))
    if match is None:
        return None
    return match.group(1) + (f" since {match.group(2)}" if match.group(2) else "")


def mask(text: str, secret: str) -> str:
    return text.replace(secret, MASK) if secret else text


# --- per-repository serialisation -----------------------------------------------------------------------------

_repo_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int, str], asyncio.Lock]] = (
    weakref.WeakKeyDictionary())


_known_repositories: set[tuple[str, int, str]] = set()  # opened with our password once: no check before each use
LISTING_TTL = 60.0  # seconds a repository's listing answers the lookup of a snapshot it names
_listings: dict[tuple[str, int, str], tuple[float, list[dict[str, Any]]]] = {}  # (host, port, repo) -> when, what


def repository_lock(target: SshTarget, path: str) -> asyncio.Lock:
    """The lock of one repository (server, port, path) in the running event loop."""
    locks = _repo_locks.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault((target.host, target.port, path), asyncio.Lock())


# --- the driver -------------------------------------------------------------------------------------------------

class ResticFailed(DriverError):
    """A restic command failed; the message holds the end of its stderr, password masked."""


class ResticDatastore:
    """Backups as restic snapshots, one repository per VM under BASE_PATH on the SFTP server."""

    HYPERVISOR_TOOLS = ("qemu-img", "restic")
    # no: restic behind a shared connection dies with a daemon that dies, leaving recovery nothing to find
    SHARED_UPLOAD_CONNECTION = False
    REQUIRED_ATTRIBUTES = ("RESTIC_PASSWORD",)  # as OpenNebula's DS_MAD_CONF
    PORT_ATTRIBUTES = ("RESTIC_SFTP_PORT",)
    SERVER_ATTRIBUTES = ("RESTIC_SFTP_SERVER", "RESTIC_SFTP_PORT", "RESTIC_SFTP_USER")

    @staticmethod
    def url_path(datastore: Datastore, vm_id: int, backup_id: str, name: str) -> str:
        """The path a backup URL names: the file as ``restic backup`` stored it (the snapshot is found by tag)."""
        return f"{Layout(datastore.base_path).vm_dir(vm_id)}/{URL_DIR}/{name}"

    @staticmethod
    async def remove_leftovers(runner: Runner, label: str, timeout: float) -> None:  # noqa: ASYNC109
        """The password files of the run's restic commands: a killed restic cannot remove its own."""
        await remove_password_files(runner, labelled_password_files(label), timeout)

    def __init__(self, datastore: Datastore, server: Runner, *, command_timeout: float = COMMAND_TIMEOUT,
                 lock_wait: float = LOCK_WAIT, progress_interval: float = PROGRESS_INTERVAL, **_: float) -> None:
        self.datastore = datastore
        self.server = server
        self.settings = restic_settings(datastore)
        self.layout = Layout(datastore.base_path)
        self.command_timeout = command_timeout
        self.lock_wait = lock_wait
        self.progress_interval = progress_interval
        self.limit_mb = int_attribute(datastore, "LIMIT_MB", 0)

    @classmethod
    def connect(cls, datastore: Datastore, pool: RunnerFactory, **settings: float) -> ResticDatastore:
        return cls(datastore, pool.runner(sftp_target(datastore)), **settings)

    # --- running restic ---

    async def _restic(self, runner: Runner, repo: str, args: Sequence[str], *, timeout: float | None = None,  # noqa: ASYNC109
                      options: Sequence[str] = (), priority: bool = False, label: str = "",
                      started: Started | None = None, wrap: Sequence[str] = (),
                      env: dict[str, str] | None = None) -> Result:
        """``restic --repo REPO --password-file F OPTIONS ARGS`` on ``runner``, F written and removed around it
        (``label`` goes into F's name, so that a run's recovery finds the file a killed restic left)."""
        password_file = new_password_file(label)
        argv = with_password(password_file, [*wrap, "restic", "--repo", repo, "--password-file", password_file,
                                             *options, *args])
        s = self.settings
        env = {**(env or {}), **({"GOMAXPROCS": str(s.maxproc)} if s.maxproc is not None else {})} or None
        finished = False
        try:
            result = await runner.run(argv, timeout=timeout or self.command_timeout, check=False,
                                      input=s.password.encode() + b"\n", env=env, started=started,
                                      nice=s.nice if priority else None, ionice=s.ionice if priority else None)
            finished = True
        finally:
            if not finished:
                await shielded(_remove_quietly(runner, password_file, self.command_timeout))
        if result.exit_status == WRITE_PASSWORD_FAILED:
            raise ResticFailed(f"{_host(runner)}: cannot write a password file in {PASSWORD_FILE_DIR}: "
                               f"{self._tail(result.stderr)}", host=_host(runner))
        return result

    def _tail(self, stderr: bytes) -> str:
        return mask(stderr_tail(stderr, 600), self.settings.password)

    def _failed(self, runner: Runner, repo: str, args: Sequence[str], result: Result) -> ResticFailed:
        tail = self._tail(result.stderr)
        if "wrong password or no key found" in tail:
            detail = "wrong RESTIC_PASSWORD (or no key) for this repository"
        elif "unable to start the sftp session" in tail:  # restic may exit before relaying ssh's own reason
            detail = (f"cannot reach the SFTP server {self.settings.target} from {_host(runner)} (exit status "
                      f"{result.exit_status}): {tail}")
        else:
            detail = f"exited with status {result.exit_status}: {tail}"
        return ResticFailed(f"datastore {self.datastore.id}: {_host(runner)}: `restic {args[0]}` on {repo} {detail}",
                            host=_host(runner), retryable=result.exit_status < 0)

    async def _checked(self, runner: Runner, repo: str, args: Sequence[str], **kw: Any) -> Result:
        result = await self._restic(runner, repo, args, **kw)
        if result.exit_status != 0:
            raise self._failed(runner, repo, args, result)
        return result

    async def _changing(self, runner: Runner, repo: str, args: Sequence[str], **kw: Any) -> Result:
        """A command that needs the repository unlocked: on a lock, ``restic unlock`` (stale locks only) and try
        again with backoff until ``lock_wait`` has passed."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + self.lock_wait, LOCK_BACKOFF[0]
        while True:
            result = await self._restic(runner, repo, args, **kw)
            holder = lock_holder(result.stderr) if result.exit_status != 0 else None
            if holder is None:
                if result.exit_status != 0:
                    raise self._failed(runner, repo, args, result)
                return result
            await self._unlock(runner, repo, holder)
            if loop.time() + delay > deadline:
                raise ResticFailed(f"datastore {self.datastore.id}: repository {repo} locked by {holder}; gave up "
                                   f"after {self.lock_wait:g} s", host=_host(runner), retryable=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, LOCK_BACKOFF[1])

    async def _unlock(self, runner: Runner, repo: str, holder: str) -> None:
        result = await self._restic(runner, repo, ["unlock"])
        log.warning("datastore %s: %s was locked by %s; restic unlock (stale locks only) on %s: %s",
                    self.datastore.id, repo, holder, _host(runner),
                    self._tail(result.stdout + result.stderr) or result.exit_status)

    @asynccontextmanager
    async def _repository(self, vm_id: int) -> AsyncIterator[str]:
        """The VM's repository path on the server, created when missing, held for a change."""
        path = self.layout.vm_dir(vm_id)
        key = (self.settings.target.host, self.settings.target.port, path)
        async with repository_lock(self.settings.target, path):
            _listings.pop(self._listing_key(path), None)  # it is about to change
            if key not in _known_repositories:
                result = await self._restic(self.server, path, ["cat", "config"])
                if result.exit_status != 0:
                    if not any(text in result.stderr.decode("utf-8", "replace") for text in _NO_REPO):
                        raise self._failed(self.server, path, ["cat", "config"], result)
                    await self._init(path)
                _known_repositories.add(key)
            try:
                yield path
            finally:
                _listings.pop(self._listing_key(path), None)

    async def _init(self, path: str) -> None:
        result = await self._restic(self.server, path, ["init"])
        if result.exit_status != 0 and b"config file already exists" not in result.stderr:  # another scheduler won
            raise self._failed(self.server, path, ["init"], result)
        log.info("datastore %s: initialised restic repository %s", self.datastore.id, path)

    async def _snapshots(self, vm_id: int) -> list[dict[str, Any]]:
        """The VM's snapshots, oldest first; none when its repository does not exist."""
        path = self.layout.vm_dir(vm_id)
        result = await self._restic(self.server, path, ["snapshots", "--json", "--no-lock"])
        if result.exit_status != 0:
            if any(text in result.stderr.decode("utf-8", "replace") for text in _NO_REPO):
                return []
            raise self._failed(self.server, path, ["snapshots"], result)
        snapshots = parse_snapshots(result.stdout)
        _listings[self._listing_key(path)] = (time.monotonic(), snapshots)
        return snapshots

    def _listing_key(self, path: str) -> tuple[str, int, str]:
        return self.settings.target.host, self.settings.target.port, path

    async def _snapshot(self, vm_id: int, source: str) -> dict[str, Any]:
        """The snapshot of backup ``source``: from a listing of the last LISTING_TTL seconds when it names
        it (a snapshot never changes once made, and vmsched's own changes to the repository drop the listing),
        else from a new one. Each restic command pays the repository key's derivation (about half a second),
        so a restore does not list the repository once per file it reads."""
        layout.check_backup_id(source)
        stamp, listed = _listings.get(self._listing_key(self.layout.vm_dir(vm_id)), (-math.inf, []))
        found = [s for s in listed if matches(s, source)] if time.monotonic() - stamp < LISTING_TTL else []
        if not found:
            found = [s for s in await self._snapshots(vm_id) if matches(s, source)]
        if len(found) != 1:
            what = "no" if not found else "more than one"
            raise NotFound(f"datastore {self.datastore.id}: {what} restic snapshot {source} of VM {vm_id}")
        return found[0]

    # --- the contract ---

    async def monitor(self) -> Capacity:
        """Space where BASE_PATH lives on the server (created when missing), LIMIT_MB applied."""
        result = await self.server.run(["sh", "-c", _MONITOR, "sh", self.layout.base_path],
                                       timeout=self.command_timeout)
        return apply_limit(*parse_df(result.stdout), self.limit_mb)

    async def new_backup_id(self, vm_id: int) -> str:
        """A random id no snapshot of the VM answers to; creates the VM's repository when missing."""
        async with self._repository(vm_id):
            pass
        taken = await self._snapshots(vm_id)
        while True:
            backup_id = secrets.token_hex(SHORT_ID // 2)
            if not any(matches(s, backup_id) for s in taken):
                return backup_id

    async def upload(self, request: UploadRequest, sink: DriverSink = NO_SINK) -> ResticUpload:
        """``restic backup`` of ``files`` run on the hypervisor ``source``, hashing them meanwhile."""
        source, staging_dir, files, timeout = request.source, request.staging_dir, request.files, request.timeout
        vm_id, backup_id, ssh_command = request.vm_id, request.backup_id, request.ssh_command
        progress: Progress | None = sink.files_progress if request.progress else None
        started: ProcessStarted = sink.process_started
        paths = staged_paths(staging_dir, files)
        layout.check_backup_id(backup_id)
        target = self.settings.target
        async with self._repository(vm_id) as path:
            repo = sftp_repository(target, path)
            options = ["-o", f"sftp.command={sftp_command(ssh_command or DEFAULT_SSH, target)}",
                       *transfer_options(self.settings)]
            args = ["backup", "--json", "--force", *backup_tags(vm_id, backup_id), "--", *files]
            status = f"{staging_dir.rstrip('/')}/{STATUS_FILE}"
            groups: list[int] = []  # restic's process groups on the hypervisor
            try:
                async with asyncio.TaskGroup() as group:
                    digests = group.create_task(hash_files(source, paths, timeout, self.settings.nice,
                                                           self.settings.ionice, on_side(started, "source")))
                    backup = group.create_task(self._changing(
                        source, repo, args, timeout=timeout, options=options, priority=True,
                        label=run_label(staging_dir, vm_id), started=noted(on_side(started, "source"), groups),
                        wrap=["bash", "-c", _TEE_STATUS, "bash", staging_dir, status],
                        env={"RESTIC_PROGRESS_FPS": str(1 / self.progress_interval)}))
                    if progress is not None:
                        probe = group.create_task(self._report_progress(source, status, progress))
                        backup.add_done_callback(lambda _: probe.cancel())
            except BaseException as exc:
                await shielded(self._release(source, repo, options, groups))
                if isinstance(exc, BaseExceptionGroup):
                    raise first_error(exc) from None
                raise
        summary = parse_summary(backup.result().stdout)
        processed = int(summary.get("total_bytes_processed") or 0)
        if progress is not None:
            progress({"*": processed}, {"*": processed})  # restic reports the whole backup, not per file
        snapshot_id = str(summary["snapshot_id"])
        log.info("datastore %s: VM %s backup %s is snapshot %s (%s bytes processed, %s added)", self.datastore.id,
                 vm_id, backup_id, snapshot_id[:SHORT_ID], processed, summary.get("data_added"))
        return ResticUpload(size_mb=math.ceil(processed / MIB),
                            sha256={p.rsplit("/", 1)[-1]: d for p, d in digests.result().items()},
                            backup_id=snapshot_id[:SHORT_ID], snapshot_id=snapshot_id,
                            data_added=int(summary.get("data_added") or 0))

    async def _release(self, source: Runner, repo: str, options: Sequence[str], groups: Sequence[int]) -> None:
        """After a failed or cancelled backup: once its killed restic is gone, ``restic unlock`` where it ran
        (restic judges a lock stale by its host and PID, so only that host sees it is); logged, never raised."""
        try:
            if groups:
                await source.run(["sh", "-c", _GONE, "sh", *map(str, groups)], timeout=self.command_timeout,
                                 check=False)
            result = await self._restic(source, repo, ["unlock"], options=options)
            log.info("datastore %s: restic unlock of %s on %s after the backup stopped: %s", self.datastore.id,
                     repo, _host(source), self._tail(result.stdout + result.stderr) or result.exit_status)
        except DriverError as exc:
            log.warning("datastore %s: cannot unlock %s on %s: %s", self.datastore.id, repo, _host(source), exc)

    async def _report_progress(self, source: Runner, status: str, progress: Progress) -> None:
        """Feed ``progress`` from the last status line restic wrote, until cancelled."""
        async def probe() -> None:
            result = await source.run(["tail", "-n", "1", "--", status], timeout=self.command_timeout, check=False)
            done = parse_status(result.stdout) if result.exit_status == 0 else None
            if done is not None:
                progress({"*": done[0]}, {"*": done[1]})

        await keep_probing(probe, self.progress_interval, f"datastore {self.datastore.id}: restic backup")

    async def rm(self, vm_id: int, sources: Sequence[str]) -> None:
        """``restic forget --prune`` of the snapshots of every increment; an error when none of them existed."""
        if not sources:
            raise ValidationError("rm: no backup sources given")
        for source in sources:
            layout.check_backup_id(source)
        snapshots = await self._snapshots(vm_id)
        ids = [s["id"] for s in snapshots if any(matches(s, source) for source in sources)]
        if not ids:
            raise NotFound(f"datastore {self.datastore.id}: nothing to remove for VM {vm_id}: {', '.join(sources)}")
        async with self._repository(vm_id) as path:
            await self._changing(self.server, path, ["forget", *ids, "--prune", *self.settings.prune_options])

    async def flatten(self, request: FlattenRequest, sink: DriverSink = NO_SINK) -> UploadResult:
        """On the server: each link's disk files dumped beside the repository, merged by qemu-img into one file
        per disk, and backed up with the last link's descriptions as a new snapshot (tagged with
        ``backup_id``); the dumps are removed whatever happens."""
        vm_id, (last, newest) = request.vm_id, request.links[-1]
        repo = self.layout.vm_dir(vm_id)
        work = f"{repo}.vmsched-flatten-{layout.check_backup_id(request.backup_id)}"
        started = on_side(sink.process_started, "server")
        snapshots = {source: await self._snapshot(vm_id, source) for _, source in request.links}
        try:
            await self._run_on_server(["mkdir", "-p", "--", f"{work}/out"])
            names = []
            for disk_id in request.disk_ids:
                chain = []
                for n, source in request.links:
                    name = layout.disk_file_name(disk_id, n)
                    chain.append(await self._dump(vm_id, snapshots[source], source, name, f"{work}/{name}",
                                                  request.timeout, started))
                names.append(layout.disk_file_name(disk_id, last))
                await self.server.run(merge.convert_argv(chain, f"{work}/out/{names[-1]}"), timeout=request.timeout,
                                      started=started)
            for name in (layout.VM_XML, layout.DOMAIN_XML):
                await self._dump(vm_id, snapshots[newest], newest, name, f"{work}/out/{name}", request.timeout, started)
            paths = [f"{work}/out/{name}" for name in (*names, layout.VM_XML, layout.DOMAIN_XML)]
            digests = await hash_files(self.server, paths, request.timeout)
            async with self._repository(vm_id) as path:
                await self._changing(self.server, path, ["backup", "--json", "--force",
                                                         *backup_tags(vm_id, request.backup_id), "--",
                                                         *(p.rsplit("/", 1)[-1] for p in paths)],
                                     timeout=request.timeout, priority=True, started=started,
                                     wrap=["sh", "-c", _IN_DIR, "sh", f"{work}/out"])
            sizes = await staged_sizes(self.server, paths, self.command_timeout)
        finally:
            await shielded(_remove_quietly(self.server, work, self.command_timeout, recursive=True))
        return UploadResult(size_mb=math.ceil(sum(allocated for _, allocated in sizes) / MIB),
                            sha256={path.rsplit("/", 1)[-1]: digest for path, digest in digests.items()})

    async def _dump(self, vm_id: int, snapshot: dict[str, Any], source: str, name: str, into: str,
                    timeout: float, started: Started | None) -> str:  # noqa: ASYNC109
        """File ``name`` of backup ``source`` restored into the file ``into`` on the server; ``into``."""
        path = self._path_in(snapshot, vm_id, source, name)
        repo = self.layout.vm_dir(vm_id)
        result = await self._restic(self.server, repo, ["dump", "--no-lock", str(snapshot["id"]), path], timeout=timeout,
                                    priority=True, started=started, wrap=["sh", "-c", 'f=$1; shift; "$@" > "$f"', "sh", into])
        if result.exit_status != 0:
            raise self._failed(self.server, repo, ["dump"], result)
        return into

    async def _run_on_server(self, argv: Sequence[str]) -> bytes:
        return (await self.server.run(argv, timeout=self.command_timeout)).stdout

    async def stat(self, vm_id: int, source: str, disk_id: int) -> int:
        """Virtual size (MB) of disk ``disk_id`` as recorded in the snapshot's vm.xml."""
        return layout.disk_size_mb(await self.read_file(vm_id, source, layout.VM_XML), disk_id)

    async def read_file(self, vm_id: int, source: str, name: str) -> bytes:
        """``restic dump`` of one (small) file of the snapshot."""
        repo = self.layout.vm_dir(vm_id)

        async def dump(selector: list[str], path: str) -> Result:
            return await self._restic(self.server, repo, ["dump", "--no-lock", *selector, path])

        result = await self._read(vm_id, source, name, dump)
        if result.exit_status != 0:
            raise self._failed(self.server, repo, ["dump"], result)
        if len(result.stdout) > MAX_SMALL_FILE:
            raise DriverError(f"datastore {self.datastore.id}: {name} of backup {source} is larger than "
                              f"{MAX_SMALL_FILE} bytes")
        return result.stdout

    async def fetch(self, request: FetchRequest, sink: DriverSink = NO_SINK) -> str:
        """``restic dump`` of the file, run on the hypervisor (against the SFTP server) into the destination
        there; the sha256 of the bytes written."""
        runner, vm_id, destination, timeout = request.target, request.vm_id, request.destination, request.timeout
        ssh_command, label, started = request.ssh_command, request.label, on_side(sink.process_started, "host")
        target = self.settings.target
        repo = sftp_repository(target, self.layout.vm_dir(vm_id))
        options = ["-o", f"sftp.command={sftp_command(ssh_command or DEFAULT_SSH, target)}",
                   *transfer_options(self.settings)]

        async def dump(selector: list[str], path: str) -> Result:
            return await self._restic(runner, repo, ["dump", "--no-lock", *selector, path], timeout=timeout,
                                      options=options, priority=True, label=label, started=started,
                                      wrap=streamed_to(destination, []))

        result = await self._read(vm_id, request.backup_id, request.name, dump)
        if result.exit_status != 0:
            raise self._failed(runner, repo, ["dump"], result)
        return streamed_digest(result.stdout)

    async def fetch_all(self, requests: Sequence[FetchRequest], sink: DriverSink = NO_SINK) -> list[str | None]:
        """One ``restic dump`` per file (a link per snapshot), a few at a time."""
        return await fetch_each(self.fetch, requests, sink)

    async def snapshot_file(self, vm_id: int, source: str, name: str) -> tuple[str, str, int]:
        """(snapshot id, the file's path in the snapshot, its size in bytes) of file ``name`` of backup
        ``source``; NotFound when the backup has no such file."""
        snapshot_id, path = await self._find(vm_id, source, name)
        result = await self._checked(self.server, self.layout.vm_dir(vm_id), ["ls", "--json", "--no-lock", snapshot_id,
                                                                             path])
        return snapshot_id, path, node_size(result.stdout, path)

    async def _read(self, vm_id: int, source: str, name: str,
                    dump: Callable[[list[str], str], Awaitable[Result]]) -> Result:
        """``dump(snapshot selector, path)`` of file ``name`` of backup ``source``: straight by the backup's tag
        (a snapshot of FLAT_TAG), else after a listing found the snapshot and the file's path in it."""
        layout.check_backup_id(source)
        layout.check_file_name(name)
        result = await dump(["--tag", f"{BACKUP_TAG_PREFIX}{source},{FLAT_TAG}", "latest"], f"/{name}")
        if result.exit_status != 0 and NO_FILE in result.stderr:
            raise NotFound(f"datastore {self.datastore.id}: backup {source} of VM {vm_id} has no {name}")
        if result.exit_status == 0 or NO_SNAPSHOT not in result.stderr:
            return result
        snapshot_id, path = await self._find(vm_id, source, name)
        return await dump([snapshot_id], path)

    async def _find(self, vm_id: int, source: str, name: str) -> tuple[str, str]:
        """(snapshot id, path in the snapshot) of file ``name`` of backup ``source``."""
        layout.check_file_name(name)  # before any command runs
        snapshot = await self._snapshot(vm_id, source)
        return str(snapshot["id"]), self._path_in(snapshot, vm_id, source, name)

    def _path_in(self, snapshot: dict[str, Any], vm_id: int, source: str, name: str) -> str:
        """The path of file ``name`` in ``snapshot`` (backup ``source`` of VM ``vm_id``); NotFound without it."""
        layout.check_file_name(name)
        path = next((p for p in snapshot.get("paths") or [] if p.rsplit("/", 1)[-1] == name), None)
        if path is None:
            raise NotFound(f"datastore {self.datastore.id}: backup {source} of VM {vm_id} has no {name}")
        return f"/{name}" if FLAT_TAG in (snapshot.get("tags") or []) else str(path)

    def dump_command(self, vm_id: int, snapshot_id: str, path: str) -> tuple[list[str], bytes]:
        """The command that prints a file of a snapshot, to run on the server, and what goes to its stdin
        (the password: it never appears in the command)."""
        password_file = new_password_file("dump")
        return with_password(password_file, ["restic", "--repo", self.layout.vm_dir(vm_id), "--password-file",
                                             password_file, "dump", "--no-lock", snapshot_id, path]), (
            self.settings.password.encode() + b"\n")

    def dump_files_command(self, vm_id: int, files: Sequence[tuple[str, str]], into: str) -> tuple[list[str], bytes]:
        """The command, to run on the server, that writes each ``(snapshot id, path)`` of ``files`` to
        ``into/<n>`` (n from 0; ``into`` an existing private directory), and what goes to its stdin (the
        password, in a password file while it runs as for every restic command, never in an argv)."""
        password_file = new_password_file("dump")
        pairs = [word for snapshot_id, path in files for word in (snapshot_id, path)]
        return with_password(password_file, ["sh", "-c", _DUMP_FILES, "sh", into, self.layout.vm_dir(vm_id),
                                             password_file, *pairs]), self.settings.password.encode() + b"\n"

    async def verify_files(self, vm_id: int, source: str, names: Sequence[str], disks: Collection[str],
                           timeout: float) -> tuple[dict[str, str], dict[str, ImageCheck]]:  # noqa: ASYNC109
        """Each file read back out of the repository on the server (into a temporary file beside the
        repository, removed after): its sha256, and ``qemu-img check`` of those named in ``disks``."""
        digests: dict[str, str] = {}
        checks: dict[str, ImageCheck] = {}
        snapshot = await self._snapshot(vm_id, source)  # one listing for every file
        repo = self.layout.vm_dir(vm_id)
        for name in names:
            snapshot_id, path = str(snapshot["id"]), self._path_in(snapshot, vm_id, source, name)
            temp = f"{repo}.vmsched-verify-{secrets.token_hex(4)}.part"
            try:
                result = await self._restic(self.server, repo, ["dump", "--no-lock", snapshot_id, path],
                                            timeout=timeout, priority=True, wrap=streamed_to(temp, []))
                if result.exit_status != 0:
                    raise self._failed(self.server, repo, ["dump"], result)
                digests[name] = streamed_digest(result.stdout)
                if name in disks:
                    checks[name] = await qemu_img_check(self.server, temp, timeout)
            finally:
                await shielded(_remove_quietly(self.server, temp, self.command_timeout))
        return digests, checks

    async def list_backup(self, vm_id: int, source: str) -> list[str]:
        snapshot = await self._snapshot(vm_id, source)
        return sorted(p.rsplit("/", 1)[-1] for p in snapshot.get("paths") or [])

    async def exists(self, vm_id: int, source: str) -> bool:
        layout.check_backup_id(source)
        return any(matches(s, source) for s in await self._snapshots(vm_id))

    async def cleanup_partial(self, vm_id: int) -> list[str]:
        """``restic unlock`` of the VM's repository: stale locks of dead restic processes go. A killed backup
        leaves no snapshot, only unreferenced data that the next prune removes; nothing to return."""
        path = self.layout.vm_dir(vm_id)
        if await self._repository_exists(path):
            async with repository_lock(self.settings.target, path):
                result = await self._checked(self.server, path, ["unlock"])
                log.info("datastore %s: restic unlock of %s: %s", self.datastore.id, path,
                         self._tail(result.stdout + result.stderr))
        return []

    async def _repository_exists(self, path: str) -> bool:
        result = await self.server.run(["test", "-f", f"{path}/config"], timeout=self.command_timeout, check=False)
        return result.exit_status == 0


@dataclass(frozen=True)
class ResticUpload(UploadResult):
    """An upload's result plus the snapshot it made: ``backup_id`` is the snapshot id's first 8 characters."""

    backup_id: str = ""
    snapshot_id: str = ""
    data_added: int = 0  # bytes new to the repository (after deduplication, before compression)


def noted(started: Started | None, groups: list[int]) -> Started:
    """A ``started`` hook that also appends each process group to ``groups``."""
    async def hook(pgid: int) -> None:
        groups.append(pgid)
        if started is not None:
            await started(pgid)

    return hook


def _host(runner: Runner) -> str:
    return str(getattr(runner, "host", None) or "local")


async def _remove_quietly(runner: Runner, path: str, timeout: float, *, recursive: bool = False) -> None:  # noqa: ASYNC109
    try:
        await runner.run(["rm", "-rf" if recursive else "-f", "--", path], timeout=timeout, check=False)
    except DriverError as exc:
        log.warning("%s: cannot remove %s: %s", _host(runner), path, exc)
