"""SSH-only behaviour: the command line sent, host keys, one shared connection, unreachable hosts, reconnects.

The runner contract itself (output, quoting, timeouts, cancellation, priorities) is tested for both runners
in ``test_local_runner.py``.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import socket
import stat
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from drivers import hostkeys
from drivers.commands import (
    AuthenticationFailed,
    HostKeyMismatch,
    HostKeyUnknown,
    HostUnreachable,
)
from drivers.ssh import WRAPPER, SshTarget, remote_command
from scheduler.logs import log_context
from tests.realenv.model import RealEnv
from tests.test_local_runner import host1, ssh_pool


def fingerprints(keys: list[asyncssh.SSHKey]) -> list[str]:
    return [hostkeys.fingerprint(key) for key in keys]


WRAP = f"exec setsid -w sh -c {shlex.quote(WRAPPER)} sh"


@pytest.mark.parametrize(
    ("argv", "options", "line"),
    [
        (["true"], {}, f"{WRAP} true"),
        (["echo", "a b", "it's"], {}, f"{WRAP} echo 'a b' 'it'\"'\"'s'"),
        (["true"], {"nice": 10, "ionice": 7}, f"{WRAP} nice -n 10 ionice -c2 -n7 true"),
        (["true"], {"env": {"A": "x y"}}, f"{WRAP} env 'A=x y' true"),
    ],
)
def test_remote_command_line(argv: list[str], options: dict, line: str) -> None:
    assert remote_command(argv, **options) == line


@pytest.mark.parametrize(
    "argv",
    [["plain"], ["a b", "", "'", '"', "$(x)", "`x`", ";", "\n", "*", "-n", "\\", "ü"]],
)
def test_remote_command_line_parses_back_to_argv(argv: list[str]) -> None:
    assert shlex.split(remote_command(argv))[7:] == argv


def test_env_cannot_precede_a_command_named_like_an_assignment() -> None:
    with pytest.raises(ValueError, match="cannot follow environment"):
        remote_command(["A=b"], env={"X": "1"})


@pytest.mark.parametrize(
    ("host", "port", "pattern"), [("h1", 22, "h1"), ("h1", 2222, "[h1]:2222"), ("10.0.0.1", 23, "[10.0.0.1]:23")]
)
def test_known_hosts_entry_line(host: str, port: int, pattern: str) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    line = hostkeys.entry_line(host, port, key)
    assert line == f"{pattern} {key.export_public_key('openssh').decode().split()[0]} " \
        f"{key.export_public_key('openssh').decode().split()[1]}\n"


def test_accept_host_key_creates_a_private_file_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "state" / "known_hosts"
    key = asyncssh.generate_private_key("ssh-ed25519")
    assert hostkeys.accept_host_key(path, "h1", 2222, key) is True
    assert hostkeys.accept_host_key(path, "h1", 2222, key) is False
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == hostkeys.entry_line("h1", 2222, key)
    assert fingerprints(hostkeys.known_keys(path, "h1", 2222)) == [hostkeys.fingerprint(key)]
    assert hostkeys.known_keys(path, "h1", 22) == []


def test_accept_host_key_appends_after_a_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    first, second = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    path.write_text(hostkeys.entry_line("h1", 22, first).rstrip("\n"))
    hostkeys.accept_host_key(path, "h2", 22, second)
    assert fingerprints(hostkeys.known_keys(path, "h1", 22)) == [hostkeys.fingerprint(first)]
    assert fingerprints(hostkeys.known_keys(path, "h2", 22)) == [hostkeys.fingerprint(second)]


def test_accept_host_key_refuses_to_add_a_second_key(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    old, new = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    hostkeys.accept_host_key(path, "h1", 22, old)
    with pytest.raises(HostKeyMismatch) as caught:
        hostkeys.accept_host_key(path, "h1", 22, new)
    assert caught.value.fingerprint == hostkeys.fingerprint(new) and hostkeys.fingerprint(old) in str(caught.value)
    assert fingerprints(hostkeys.known_keys(path, "h1", 22)) == [hostkeys.fingerprint(old)]


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "k.pub").write_bytes(key.export_public_key("openssh"))
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "k.pub")], capture_output=True, text=True,
                            check=True).stdout
    assert listed.split()[1] == hostkeys.fingerprint(key)


realenv = pytest.mark.realenv


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def ssh_client_port(pool, target: SshTarget) -> str:
    """The client-side TCP port of the connection the command ran over (from sshd's SSH_CLIENT)."""
    result = await pool.run(target, ["sh", "-c", 'echo "$SSH_CLIENT"'], timeout=30)
    return result.stdout.split()[1].decode()


@realenv
async def test_concurrent_commands_share_one_connection(realenv: RealEnv) -> None:
    pool = ssh_pool(realenv)
    target = host1(realenv)
    try:
        ports = await asyncio.gather(*(ssh_client_port(pool, target) for _ in range(20)))
    finally:
        await pool.close()
    assert len(set(ports)) == 1


@realenv
async def test_fetch_host_key_returns_the_recorded_key(realenv: RealEnv) -> None:
    target = host1(realenv)
    key = await hostkeys.fetch_host_key(target.host, target.port, timeout=5)
    assert fingerprints(hostkeys.known_keys(realenv.ssh.known_hosts, target.host, target.port)) == [
        hostkeys.fingerprint(key)]


@realenv
async def test_unknown_host_is_refused_until_its_key_is_accepted(realenv: RealEnv, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    target = host1(realenv)
    pool = ssh_pool(realenv, known_hosts)
    try:
        with pytest.raises(HostKeyUnknown) as caught:
            await pool.run(target, ["true"], timeout=10)
        key = await hostkeys.fetch_host_key(target.host, target.port, timeout=5)
        assert caught.value.fingerprint == hostkeys.fingerprint(key) != ""
        assert hostkeys.fingerprint(key) in str(caught.value) and "--accept-hostkey" in str(caught.value)
        assert not caught.value.retryable and not known_hosts.exists()
        assert hostkeys.accept_host_key(known_hosts, target.host, target.port, key)
        assert (await pool.run(target, ["echo", "in"], timeout=10)).stdout == b"in\n"
    finally:
        await pool.close()


@realenv
async def test_changed_host_key_is_refused(realenv: RealEnv, tmp_path: Path) -> None:
    target = host1(realenv)
    known_hosts = tmp_path / "known_hosts"
    wrong = asyncssh.generate_private_key("ssh-ed25519")
    others = [line for line in realenv.ssh.known_hosts.read_text().splitlines(keepends=True)
              if not line.startswith(hostkeys.host_pattern(target.host, target.port) + " ")]
    known_hosts.write_text("".join(others) + hostkeys.entry_line(target.host, target.port, wrong))
    real = await hostkeys.fetch_host_key(target.host, target.port, timeout=5)
    pool = ssh_pool(realenv, known_hosts)
    try:
        with pytest.raises(HostKeyMismatch) as caught:
            await pool.run(target, ["true"], timeout=10)
        with pytest.raises(HostKeyMismatch):
            hostkeys.accept_host_key(known_hosts, target.host, target.port, real)
    finally:
        await pool.close()
    assert caught.value.fingerprint == hostkeys.fingerprint(real)
    assert "CHANGED" in str(caught.value) and hostkeys.fingerprint(real) in str(caught.value)
    assert not caught.value.retryable


@realenv
async def test_a_refused_client_key_is_an_authentication_failure(realenv: RealEnv, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    stranger.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    pool = ssh_pool(realenv)
    target = host1(realenv)
    try:
        with pytest.raises(AuthenticationFailed):
            await pool.run(SshTarget(target.host, target.port, target.user, stranger), ["true"], timeout=10)
    finally:
        await pool.close()


@realenv
async def test_host_without_sshd_is_unreachable_quickly(realenv: RealEnv) -> None:
    pool = ssh_pool(realenv)
    started = time.monotonic()
    try:
        with pytest.raises(HostUnreachable) as caught:
            await pool.run(SshTarget("127.0.0.1", closed_port()), ["true"], timeout=10)
    finally:
        await pool.close()
    assert caught.value.retryable and caught.value.host == "127.0.0.1"
    assert time.monotonic() - started < 1


@realenv
async def test_reconnects_after_the_connection_is_dropped(realenv: RealEnv) -> None:
    pool = ssh_pool(realenv)
    target = host1(realenv)
    kill_own_sshd = ["sh", "-c", "kill -KILL $(ps -o ppid= -p $PPID)"]  # $PPID is setsid; its parent is sshd
    try:
        before = await ssh_client_port(pool, target)
        with pytest.raises(HostUnreachable):
            await pool.run(target, kill_own_sshd, timeout=10)
        after = await ssh_client_port(pool, target)
    finally:
        await pool.close()
    assert before != after


@realenv
async def test_known_hosts_of_other_servers_do_not_vouch_for_this_one(realenv: RealEnv, tmp_path: Path) -> None:
    """The backup server's key is recorded, host1's is not: host1 stays unknown (no fallback, no default file)."""
    known_hosts = tmp_path / "known_hosts"
    backup = realenv.backup
    key = await hostkeys.fetch_host_key(backup.address, backup.ssh_port, timeout=5)
    hostkeys.accept_host_key(known_hosts, backup.address, backup.ssh_port, key)
    pool = ssh_pool(realenv, known_hosts)
    try:
        assert (await pool.run(SshTarget(backup.address, backup.ssh_port), ["true"], timeout=10)).exit_status == 0
        with pytest.raises(HostKeyUnknown):
            await pool.run(host1(realenv), ["true"], timeout=10)
    finally:
        await pool.close()


@realenv
async def test_a_pooled_connection_does_not_log_under_the_context_that_opened_it(realenv: RealEnv) -> None:
    """The connection outlives the run that opened it: its own log lines (exit statuses of later commands)
    must not be tagged with that run."""
    seen: list[object] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "exit status" in record.getMessage():
                seen.append(log_context.get())

    handler = Capture()
    logging.getLogger("asyncssh").addHandler(handler)
    level = logging.getLogger("asyncssh").level
    logging.getLogger("asyncssh").setLevel(logging.INFO)
    pool = ssh_pool(realenv)
    try:
        token = log_context.set({"run": 1})
        await pool.run(host1(realenv), ["true"], timeout=30)  # opens the connection inside run 1
        log_context.reset(token)
        seen.clear()
        token = log_context.set({"run": 2})
        await pool.run(host1(realenv), ["true"], timeout=30)
        log_context.reset(token)
    finally:
        await pool.close()
        logging.getLogger("asyncssh").removeHandler(handler)
        logging.getLogger("asyncssh").setLevel(level)
    assert seen and {"run": 1} not in seen
