"""Commands on the scheduler's own machine, with the same contract as the SSH layer and no shell at all.

Each command starts in a new session (its own process group); a timeout or a cancelled caller sends
SIGTERM to the whole group, then SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from subprocess import DEVNULL, PIPE

from drivers.commands import (
    KILL_GRACE,
    CommandTimeout,
    Result,
    Started,
    check_argv,
    check_env,
    finish,
    priority_prefix,
    shielded,
)

log = logging.getLogger(__name__)

HOST = "local"
_GROUP_POLL = 0.01  # seconds between checks that a terminated process group has emptied


class LocalRunner:
    """:class:`drivers.commands.Runner` for this machine."""

    host = HOST

    def __init__(self, *, kill_grace: float = KILL_GRACE) -> None:
        self.kill_grace = kill_grace

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
        words = check_argv(argv)
        command = priority_prefix(nice, ionice) + words
        environ = {**os.environ, **check_env(env)} if env else None
        began = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=DEVNULL if input is None else PIPE, stdout=PIPE, stderr=PIPE,
                start_new_session=True, env=environ,
            )
        except OSError as exc:  # as a shell reports it: 127 not found, 126 not executable
            status = 127 if isinstance(exc, FileNotFoundError) else 126
            result = Result(status, b"", f"{command[0]}: {exc.strerror}\n".encode(), time.monotonic() - began)
            return finish(words, result, check=check, host=HOST)
        stdout, stderr = await self._communicate(process, words, input, timeout, started)
        assert process.returncode is not None
        result = Result(process.returncode, stdout, stderr, time.monotonic() - began)
        return finish(words, result, check=check, host=HOST)

    async def _communicate(
        self, process: asyncio.subprocess.Process, words: list[str], input: bytes | None, limit: float,
        started: Started | None,
    ) -> tuple[bytes, bytes]:
        try:
            async with asyncio.timeout(limit):
                if started is not None:
                    await started(process.pid)  # start_new_session: the pid is the group's id
                return await process.communicate(input)
        except TimeoutError:
            await shielded(kill_group(process, self.kill_grace))
            raise CommandTimeout(words, limit, host=HOST) from None
        except BaseException:  # cancelled, or ``started`` failed: the command must not outlive its caller
            await shielded(kill_group(process, self.kill_grace))
            raise


def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the group; False when no process is left in it."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process other than a zombie is left in the group (zombies wait for a slow reaper, harmless)."""
    if not _signal_group(pgid, 0):
        return False
    return any(_live_member(entry.name, pgid) for entry in os.scandir("/proc") if entry.name.isdigit())


def _live_member(pid: str, pgid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:  # exited meanwhile
        return False
    return fields[0] != b"Z" and int(fields[2]) == pgid


async def kill_group(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the process group led by ``process``; SIGKILL what is left after ``grace`` seconds; reap."""
    pgid = process.pid
    _signal_group(pgid, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await process.wait()
            while _group_alive(pgid):  # noqa: ASYNC110 - no event tells when a process group empties
                await asyncio.sleep(_GROUP_POLL)
            return
    except TimeoutError:
        log.warning("process group %d outlived SIGTERM for %g s; sending SIGKILL", pgid, grace)
    _signal_group(pgid, signal.SIGKILL)
    await process.wait()
