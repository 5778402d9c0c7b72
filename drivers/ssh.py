"""Commands on hosts over SSH: one multiplexed asyncssh connection per (host, port, user).

Each command runs as ``exec setsid -w sh -c 'echo "$$"; exec "$@"' sh ARGV...``: the inner shell starts
a new session, prints its pid (the new process group's id) as the first line of stdout and execs the
command. A timeout or a cancelled caller then runs ``kill -TERM -PGID`` (SIGKILL after a grace period)
over the same connection, on a channel kept in reserve for that purpose. Host keys are always checked
against the known_hosts file; an unknown or changed key is refused with its fingerprint.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from drivers import hostkeys
from drivers.commands import (
    KILL_GRACE,
    AuthenticationFailed,
    CommandTimeout,
    HostKeyMismatch,
    HostKeyUnknown,
    HostUnreachable,
    Result,
    Started,
    check_argv,
    check_env,
    finish,
    priority_prefix,
    shielded,
)
from drivers.sshtarget import SshTarget as SshTarget  # where it was before: callers import it from here
from scheduler.errors import DriverError

log = logging.getLogger(__name__)

WRAPPER = 'echo "$$"; exec "$@"'
# $1: process group id, $2: checks (every 0.05 s) before SIGKILL. dash's kill takes no "--". Zombies do not
# count as alive: they only wait for their reaper.
KILL_SCRIPT = """\
alive() { ps -e -o pgid= -o stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { n++ } END { exit n == 0 }'; }
kill -TERM "-$1" 2>/dev/null || exit 0
n=$2
while alive "$1"; do
  n=$((n - 1))
  if [ "$n" -le 0 ]; then kill -KILL "-$1" 2>/dev/null; exit 0; fi
  sleep 0.05
done
"""
_CONNECTION_ERRORS = (OSError, asyncssh.Error, asyncssh.ChannelOpenError)


@dataclass(frozen=True)
class SshSettings:
    """How the pool connects; the fields mirror ``SSH = [...]`` in sched.conf."""

    known_hosts: Path
    key: Path | None = None  # default private key; None: the service user's default keys and agent
    connect_timeout: float = 10
    keepalive: float = 30  # seconds between keepalive probes; 0 turns them off
    max_sessions: int = 10  # channels per connection; OpenSSH's sshd allows 10 by default
    kill_grace: float = KILL_GRACE
    reconnect_attempts: int = 3  # after a dropped connection, with exponential backoff
    reconnect_backoff: float = 0.2  # seconds before the second attempt, doubled for each further one

    @classmethod
    def from_config(cls, ssh: Any, state_dir: Path) -> SshSettings:
        """From sched.conf's ``SshConfig``."""
        return cls(known_hosts=ssh.known_hosts_path(state_dir), key=ssh.key,
                   connect_timeout=ssh.connect_timeout, keepalive=ssh.keepalive)


def remote_command(argv: Sequence[str], *, nice: int | None = None, ionice: int | None = None,
                   env: Mapping[str, str] | None = None) -> str:
    """The command line sent to the host's login shell: every word of ``argv`` quoted exactly once."""
    words = priority_prefix(nice, ionice) + check_argv(argv)
    variables = check_env(env)
    if variables:
        if "=" in words[0]:
            raise ValueError(f"a command named {words[0]!r} cannot follow environment assignments")
        words = ["env", *(f"{name}={value}" for name, value in variables.items()), *words]
    return shlex.join(["exec", "setsid", "-w", "sh", "-c", WRAPPER, "sh", *words])


class _Client(asyncssh.SSHClient):
    """Remembers the key a server presented when it was not in known_hosts, for the error message."""

    def __init__(self) -> None:
        self.untrusted_key: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.untrusted_key = key
        return False


@dataclass
class _Link:
    """A live connection with its channel budget: commands get all but one; kills get the last one."""

    conn: asyncssh.SSHClientConnection
    sessions: asyncio.Semaphore
    killer: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))


class SshPool:
    """One connection per (host, port, user), shared by every command to it; reconnects when dropped."""

    def __init__(self, settings: SshSettings) -> None:
        if settings.max_sessions < 2:
            raise ValueError("max_sessions must be at least 2 (one channel is kept for killing commands)")
        self.settings = settings
        self._links: dict[tuple[str, int, str], _Link] = {}
        self._locks: dict[tuple[str, int, str], asyncio.Lock] = {}
        self._keys: dict[Path, asyncssh.SSHKey] = {}

    def runner(self, target: SshTarget) -> SshRunner:
        return SshRunner(self, target)

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            link.conn.close()
        for link in links:
            await link.conn.wait_closed()

    async def run(
        self,
        target: SshTarget,
        argv: Sequence[str],
        *,
        timeout: float,  # noqa: ASYNC109 - the contract: every command has a deadline, enforced inside
        input: bytes | None = None,
        nice: int | None = None,
        ionice: int | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        started: Started | None = None,
    ) -> Result:
        """Run ``argv`` on ``target``. ``timeout`` covers waiting for a free channel and the command itself;
        connecting is bounded by ``connect_timeout``."""
        words = check_argv(argv)
        line = remote_command(words, nice=nice, ionice=ionice, env=env)
        began = time.monotonic()
        for attempt in range(2):
            link = await self._link(target)
            deadline = asyncio.get_running_loop().time() + timeout - (time.monotonic() - began)
            await self._acquire(link, deadline, words, timeout, target)
            try:
                try:
                    process = await link.conn.create_process(line, encoding=None)
                except _CONNECTION_ERRORS as exc:
                    if attempt == 0 and link.conn.is_closed():
                        continue  # the connection died while idle and nothing ran: reconnect once
                    raise self._channel_error(target, link, exc) from exc
                status, stdout, stderr = await self._communicate(target, link, process, words, input, deadline,
                                                                 timeout, started)
            finally:
                link.sessions.release()
            result = Result(status, stdout, stderr, time.monotonic() - began)
            return finish(words, result, check=check, host=target.host)
        raise AssertionError("unreachable")

    @staticmethod
    async def _acquire(link: _Link, deadline: float, words: list[str], limit: float, target: SshTarget) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await link.sessions.acquire()
        except TimeoutError:
            raise CommandTimeout(words, limit, host=target.host) from None

    @staticmethod
    def _channel_error(target: SshTarget, link: _Link, exc: BaseException) -> DriverError:
        if link.conn.is_closed():
            return HostUnreachable(f"{target}: connection lost: {exc}", host=target.host)
        return DriverError(f"{target}: cannot open a channel: {exc}", host=target.host, retryable=True)

    async def _communicate(
        self, target: SshTarget, link: _Link, process: asyncssh.SSHClientProcess[bytes],
        words: list[str], input: bytes | None, deadline: float, limit: float, started: Started | None,
    ) -> tuple[int, bytes, bytes]:
        pgid = asyncio.ensure_future(_read_pgid(process))
        try:
            async with asyncio.timeout_at(deadline):
                group = await asyncio.shield(pgid)
                if started is not None and group is not None:
                    await started(group)
                if not input:
                    process.stdin.write_eof()
                stdout, stderr = await process.communicate(input or None)
        except TimeoutError:
            await shielded(self._stop(target, link, process, pgid))
            raise CommandTimeout(words, limit, host=target.host) from None
        except asyncio.CancelledError:
            await shielded(self._stop(target, link, process, pgid))
            raise
        except _CONNECTION_ERRORS as exc:
            raise HostUnreachable(f"{target}: connection lost while running a command: {exc}",
                                  host=target.host) from exc
        except Exception:  # ``started`` failed: the command must not outlive its caller's knowledge
            await shielded(self._stop(target, link, process, pgid))
            raise
        if process.returncode is None:
            raise HostUnreachable(f"{target}: connection lost while running a command", host=target.host)
        return process.returncode, stdout, stderr

    async def _stop(self, target: SshTarget, link: _Link, process: asyncssh.SSHClientProcess[bytes],
                    pgid: asyncio.Future[int | None]) -> None:
        """Kill the command's process group on the host, then close its channel."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                group = await pgid
        except (TimeoutError, *_CONNECTION_ERRORS):
            group = None
        if group is not None:
            await self._kill_group(target, link, group)
        process.close()

    async def _kill_group(self, target: SshTarget, link: _Link, pgid: int) -> None:
        checks = max(1, round(self.settings.kill_grace / 0.05))
        command = shlex.join(["sh", "-c", KILL_SCRIPT, "sh", str(pgid), str(checks)])
        try:
            async with link.killer, asyncio.timeout(self.settings.kill_grace + self.settings.connect_timeout):
                await link.conn.run(command, check=False)
        except (TimeoutError, *_CONNECTION_ERRORS) as exc:
            log.warning("%s: could not kill process group %d: %s", target, pgid, exc or "timed out")

    async def _link(self, target: SshTarget) -> _Link:
        key = target.connection_key
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            link = self._links.get(key)
            if link is not None and not link.conn.is_closed():
                return link
            attempts = self.settings.reconnect_attempts if link is not None else 1
            if link is not None:
                log.info("%s: connection dropped; reconnecting", target)
            # A fresh context: the connection outlives the caller, and its tasks must not log under the
            # caller's context (e.g. the run that happened to open it).
            conn = await asyncio.create_task(self._connect_with_backoff(target, attempts), context=contextvars.Context())
            link = _Link(conn, asyncio.Semaphore(self.settings.max_sessions - 1))
            self._links[key] = link
            return link

    async def _connect_with_backoff(self, target: SshTarget, attempts: int) -> asyncssh.SSHClientConnection:
        for attempt in range(attempts):
            try:
                return await self._connect(target)
            except HostUnreachable:
                if attempt == attempts - 1:
                    raise
                delay = self.settings.reconnect_backoff * 2**attempt
                log.info("%s: unreachable; next attempt in %g s", target, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _connect(self, target: SshTarget) -> asyncssh.SSHClientConnection:
        client = _Client()
        timeout = self.settings.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                return await asyncssh.connect(
                    target.host, target.port, username=target.user, client_factory=lambda: client,
                    known_hosts=self._known_hosts(), config=None, **self._auth(target),
                    keepalive_interval=self.settings.keepalive, keepalive_count_max=3,
                )
        except asyncssh.HostKeyNotVerifiable:
            raise self._host_key_error(target, client.untrusted_key) from None
        except asyncssh.PermissionDenied as exc:
            raise AuthenticationFailed(f"{target}: key refused: {exc}", host=target.host) from None
        except TimeoutError:
            raise HostUnreachable(f"{target}: no SSH connection within {timeout:g} s", host=target.host) from None
        except _CONNECTION_ERRORS as exc:
            raise HostUnreachable(f"{target}: cannot connect: {exc}", host=target.host) from exc

    def _known_hosts(self) -> str | tuple[list[Any], list[Any], list[Any]]:
        path = self.settings.known_hosts
        return str(path) if path.exists() else ([], [], [])  # never asyncssh's default: trust nothing

    def _auth(self, target: SshTarget) -> dict[str, Any]:
        path = target.key or self.settings.key
        if path is None:
            return {}
        if path not in self._keys:
            try:
                self._keys[path] = asyncssh.read_private_key(path)
            except (OSError, asyncssh.KeyImportError) as exc:
                raise AuthenticationFailed(f"{target}: cannot read private key {path}: {exc}",
                                           host=target.host) from exc
        return {"client_keys": [self._keys[path]], "agent_path": None}

    def _host_key_error(self, target: SshTarget, key: asyncssh.SSHKey | None) -> DriverError:
        presented = hostkeys.describe(key) if key is not None else "unknown key"
        fingerprint = hostkeys.fingerprint(key) if key is not None else ""
        known = self.settings.known_hosts
        if hostkeys.known_keys(known, target.host, target.port):
            return HostKeyMismatch(
                f"{target}: HOST KEY CHANGED: the server presented {presented}, which differs from the key "
                f"recorded in {known}; refusing to connect", host=target.host, fingerprint=fingerprint)
        return HostKeyUnknown(
            f"{target}: host key not known ({presented}); verify the fingerprint and accept it with "
            f"--accept-hostkey", host=target.host, fingerprint=fingerprint)


async def _read_pgid(process: asyncssh.SSHClientProcess[bytes]) -> int | None:
    """The process group id the wrapper prints first; None when the wrapper failed before printing it."""
    line = await process.stdout.readline()
    text = line.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and int(text) > 1 else None


@dataclass(frozen=True)
class SshRunner:
    """:class:`drivers.commands.Runner` for one host of a pool."""

    pool: SshPool
    target: SshTarget

    @property
    def host(self) -> str:
        return self.target.host

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,  # noqa: ASYNC109 - the contract: every command has a deadline, enforced inside
        input: bytes | None = None,
        nice: int | None = None,
        ionice: int | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        started: Started | None = None,
    ) -> Result:
        return await self.pool.run(self.target, argv, timeout=timeout, input=input, nice=nice, ionice=ionice,
                                   check=check, env=env, started=started)
