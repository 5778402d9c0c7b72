"""Commands and processes: run an argv, find a daemon by its pid file, stop exactly the processes we started.

A process is identified by PID *and* start time, read from ``/proc/PID/stat``; a zombie counts as gone
(``kill -0`` would still succeed on it). Waiting for a process to end uses a pidfd, not a sleep loop.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tests.realenv.errors import RealEnvError
from tests.realenv.model import ProcRef


def run(argv: list[str], *, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (never through a shell); on failure raise RealEnvError with its output."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise RealEnvError(f"{argv[0]}: not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise RealEnvError(f"{argv[0]}: no answer within {timeout:g} s: {argv}") from exc
    if check and done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[-2000:]
        raise RealEnvError(f"{argv} exited with {done.returncode}: {output}")
    return done


def stat_fields(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of ``pid`` from /proc, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = text[text.rindex(")") + 2:].split()  # fields 3.. follow the parenthesised command name
    return rest[0], int(rest[19])


def is_running(ref: ProcRef) -> bool:
    fields = stat_fields(ref.pid)
    return fields is not None and fields[0] != "Z" and fields[1] == ref.starttime


def ref_of(role: str, pid: int) -> ProcRef:
    fields = stat_fields(pid)
    if fields is None or fields[0] == "Z":
        raise RealEnvError(f"{role}: process {pid} is not running")
    return ProcRef(role, pid, fields[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` (a file appearing, a daemon answering: no event to wait on) until true or timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RealEnvError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def ref_from_pidfile(role: str, pidfile: Path, timeout: float = 15) -> ProcRef:
    """The daemon whose PID ``pidfile`` holds, once it is written and the process runs."""

    def written() -> bool:
        try:
            pid = int(pidfile.read_text().strip() or "0")
        except (FileNotFoundError, ValueError):
            return False
        return pid > 0 and stat_fields(pid) is not None

    wait_until(written, timeout, f"{role} to write {pidfile}")
    return ref_of(role, int(pidfile.read_text().strip()))


def _wait_gone(ref: ProcRef, timeout: float) -> bool:
    """Wait for ``ref`` to end (or become a zombie); True when it is gone."""
    try:
        fd = os.pidfd_open(ref.pid)
    except ProcessLookupError:
        return True
    try:
        if not is_running(ref):  # checked after opening: the fd is for the right process
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(int(timeout * 1000))
        return not is_running(ref)
    finally:
        os.close(fd)


def stop(refs: Iterable[ProcRef], timeout: float = 10) -> list[ProcRef]:
    """SIGTERM each running ref, wait for it, SIGKILL what is left; return the refs that were running."""
    running = [r for r in refs if is_running(r)]
    for ref in running:
        _signal(ref, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for ref in running:
        if not _wait_gone(ref, max(0.0, deadline - time.monotonic())):
            _signal(ref, signal.SIGKILL)
            if not _wait_gone(ref, 5):
                raise RealEnvError(f"{ref.role} (pid {ref.pid}) survived SIGKILL")
    return running


def _signal(ref: ProcRef, sig: signal.Signals) -> None:
    if is_running(ref):
        try:
            os.kill(ref.pid, sig)
        except ProcessLookupError:
            pass


def mount_ns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def pids_in_mount_ns(ns: str) -> list[ProcRef]:
    """Every live process whose mount namespace is ``ns`` (``mnt:[inode]``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "mnt") != ns:
                continue
            found.append(ref_of("ns-member", int(entry.name)))
        except (FileNotFoundError, ProcessLookupError, PermissionError, RealEnvError):
            continue
    return found
