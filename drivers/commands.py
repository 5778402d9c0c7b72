"""The contract every command runner keeps, on a host over SSH or on the scheduler's own machine.

A command is an argv list, never a shell string: the runner quotes it (SSH) or execs it directly (local),
so template values cannot reach a shell unquoted. Every command has a timeout; a timeout or a cancelled
caller kills the command's whole process group. Failures are typed :class:`DriverError` subclasses.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from scheduler.errors import DriverError

STDERR_TAIL_BYTES = 2048
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of a cancelled command's process group
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Told the process group id of a command once it runs (before it is awaited): callers journal it, so
# that after a crash of the daemon the group can be found and killed (``drivers.processes``).
Started = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Result:
    """What a finished command left: exit status (negative: killed by that signal), output, seconds taken."""

    exit_status: int
    stdout: bytes
    stderr: bytes
    duration: float


class Runner(Protocol):
    """Runs argv lists somewhere; ``check`` turns a non-zero exit status into :class:`CommandFailed`."""

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
    ) -> Result: ...


class HostUnreachable(DriverError):
    """No connection to the host (refused, timed out, dropped); trying later may help."""

    retryable = True


class CommandTimeout(DriverError):
    """The command ran past its timeout and was killed."""

    retryable = True

    def __init__(self, argv: Sequence[str], timeout: float, *, host: str | None = None) -> None:
        self.argv = tuple(argv)
        self.timeout = timeout
        super().__init__(f"{host or 'local'}: `{display(argv)}` timed out after {timeout:g} s and was killed", host=host)


class CommandFailed(DriverError):
    """The command exited with a non-zero status; ``stderr_tail`` holds the end of what it printed."""

    def __init__(self, argv: Sequence[str], exit_status: int, stderr: bytes, *, host: str | None = None,
                 retryable: bool | None = None) -> None:
        self.argv = tuple(argv)
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail(stderr)
        detail = f": {self.stderr_tail}" if self.stderr_tail else ""
        super().__init__(f"{host or 'local'}: `{display(argv)}` {_status_words(exit_status)}{detail}", host=host,
                         retryable=retryable)


class AuthenticationFailed(DriverError):
    """The host refused our key."""


class HostKeyError(DriverError):
    """The host's key cannot be trusted; ``fingerprint`` is what the server presented (``SHA256:...``)."""

    def __init__(self, message: str, *, host: str | None = None, fingerprint: str = "") -> None:
        self.fingerprint = fingerprint
        super().__init__(message, host=host)


class HostKeyMismatch(HostKeyError):
    """The host presented a key other than the one recorded for it: refused."""


class HostKeyUnknown(HostKeyError):
    """No key is recorded for the host; an operator must accept it first (``--accept-hostkey``)."""


def display(argv: Sequence[str], limit: int = 200) -> str:
    """``argv`` as a shell-quoted line for messages, shortened to ``limit`` characters."""
    line = shlex.join(argv)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def stderr_tail(stderr: bytes, limit: int = STDERR_TAIL_BYTES) -> str:
    """The last ``limit`` bytes of ``stderr`` as text, stripped."""
    return stderr[-limit:].decode("utf-8", "replace").strip()


def _status_words(exit_status: int) -> str:
    if exit_status < 0:
        return f"was killed by signal {-exit_status}"
    return f"exited with status {exit_status}"


def check_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` as a list, after refusing what no exec can carry (empty argv, non-strings, NUL bytes)."""
    if isinstance(argv, str | bytes):
        raise TypeError("argv must be a list of strings, not a single string")
    words = list(argv)
    if not words:
        raise ValueError("argv is empty")
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"argv items must be str, got {type(word).__name__}: {word!r}")
        if "\0" in word:
            raise ValueError(f"argv item contains a NUL byte: {word!r}")
    return words


def priority_prefix(nice: int | None, ionice: int | None) -> list[str]:
    """``nice -n N`` and ``ionice -c2 -nN`` (best-effort class) words to put before a command."""
    prefix: list[str] = []
    if nice is not None:
        if not -20 <= nice <= 19:
            raise ValueError(f"nice must be between -20 and 19, got {nice}")
        prefix += ["nice", "-n", str(nice)]
    if ionice is not None:
        if not 0 <= ionice <= 7:
            raise ValueError(f"ionice level must be between 0 and 7, got {ionice}")
        prefix += ["ionice", "-c2", f"-n{ionice}"]
    return prefix


def check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` after checking names are plain identifiers and values carry no NUL byte."""
    checked = dict(env or {})
    for name, value in checked.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"bad environment variable name {name!r}")
        if "\0" in value:
            raise ValueError(f"environment variable {name} contains a NUL byte")
    return checked


def finish(argv: Sequence[str], result: Result, *, check: bool, host: str | None) -> Result:
    """``result``, or :class:`CommandFailed` when ``check`` is set and the command did not exit with 0."""
    if check and result.exit_status != 0:
        raise CommandFailed(argv, result.exit_status, result.stderr, host=host)
    return result


_cleanups: set[asyncio.Task[None]] = set()


async def shielded(cleanup: Coroutine[Any, Any, None]) -> None:
    """Run ``cleanup`` to its end even when the caller is cancelled again while it waits for it."""
    task = asyncio.ensure_future(cleanup)
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)
    await asyncio.shield(task)
