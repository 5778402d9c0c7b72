"""Hosts for real: first contact (``--accept-hostkey``), refused keys and host monitoring, against real
`vmsched serve` daemons and the realenv hosts (sshd + libvirtd in their own mount namespaces).

The outage test starts a private sshd of its own inside host1's namespace (own port, host key and pid
file), so stopping it never disturbs the shared hosts.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
from lxml import etree

from drivers import hostkeys
from tests.conftest import Daemon, start_daemon
from tests.realenv import hostns, procs, sshsetup
from tests.realenv.model import HostInfo, ProcRef, RealEnv

pytestmark = pytest.mark.realenv

REPO = Path(__file__).resolve().parents[1]
WAIT = 30.0  # seconds any state change may take (monitoring runs every second here)


# -- daemons and the CLI ---------------------------------------------------------------------------


@pytest.fixture
def start(tmp_path: Path, realenv: RealEnv) -> Iterator[Callable[[str], Daemon]]:
    """``start(name)``: a daemon with a fresh known_hosts, the realenv client key, 1 s host monitoring."""
    started: list[Daemon] = []

    def make(name: str = "state") -> Daemon:
        state = tmp_path / name
        state.mkdir()
        config = (f'MONITORING_INTERVAL_HOST = "1"\nBACKUP_BASE_PATH = "{tmp_path}/{name}-staging"\n'
                  f'SSH = [ KNOWN_HOSTS = "{state}/known_hosts", KEY = "{realenv.ssh.client_key}" ]\n')
        daemon = start_daemon(state, config)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        code = daemon.stop()
        assert code == 0, f"daemon exited with {code}; log:\n{daemon.log()}"
        assert "Traceback" not in daemon.log(), daemon.log()


@dataclass
class Cli:
    code: int
    out: str
    err: str


def vmsched(daemon: Daemon, *argv: str) -> Cli:
    done = subprocess.run([sys.executable, "-m", "scheduler", *argv], capture_output=True, text=True,
                          env=daemon.env, cwd=REPO, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return Cli(done.returncode, done.stdout, done.stderr)


def create(daemon: Daemon, name: str, port: int, *extra: str) -> Cli:
    """``host create`` without ``--key``: the daemons' ``SSH = [ KEY ]`` is the realenv client key.

    (``--key`` sets SSH_KEY, which ``scheduler.hosts.links.ssh_target`` cannot read yet: it indexes the
    Template like a dict.)"""
    return vmsched(daemon, "host", "create", name, "--ssh", f"root@127.0.0.1:{port}", *extra)


def host_xml(daemon: Daemon, name: str) -> etree._Element:
    """The host's XML straight from the API (polled often: no CLI start-up per look)."""
    with xmlrpc.client.ServerProxy(daemon.endpoint) as proxy:
        ok, pool = proxy.one.hostpool.info(daemon.session)[:2]
    assert ok, pool
    found = etree.fromstring(pool.encode()).xpath("HOST[NAME=$name]", name=name)
    assert len(found) == 1, pool
    return found[0]


def wait_state(daemon: Daemon, name: str, state: int, timeout: float = WAIT) -> etree._Element:
    """Poll the API (the daemon offers no event to wait on) until host ``name`` has STATE ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        host = host_xml(daemon, name)
        if host.findtext("STATE") == str(state):
            return host
        if time.monotonic() > deadline:
            pytest.fail(f"host {name} is not in state {state} after {timeout} s: "
                        f"{etree.tostring(host, encoding='unicode')}\nlog:\n{daemon.log()}")
        time.sleep(0.1)


MONITORED, ERROR = 2, 3


def fingerprint_of(public_key: Path) -> str:
    return hostkeys.fingerprint(asyncssh.read_public_key(public_key))


def host_key_of(realenv: RealEnv, host: HostInfo) -> Path:
    return realenv.ssh.client_key.with_name(f"{host.name}_host_ed25519.pub")


# -- a private sshd inside host1's namespace ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class PrivateSshd:
    """An sshd this test owns, serving host1's libvirt; stop() ends it and every session it started."""

    def __init__(self, realenv: RealEnv, directory: Path) -> None:
        self.host = realenv.host("host1")
        self.directory = directory
        self.port = free_port()
        self.key = directory / "host_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        server = sshsetup.SshServer("private", self.port, self.key, directory / "sshd.pid", directory / "sshd.log")
        self.server = server
        self.config = directory / "sshd.conf"
        self.config.write_text(sshsetup.sshd_config(server, realenv.ssh.client_key.with_name("authorized_keys")))
        self.proc: ProcRef | None = None

    def start(self) -> None:
        holder = self.host.proc("holder")
        assert holder is not None
        argv = ["/usr/sbin/sshd", "-f", str(self.config), "-E", str(self.server.logfile)]
        self.proc = hostns.start_daemon(holder, "sshd", argv, self.server.pidfile, timeout=30)

    def stop(self) -> None:
        """The listener and every connection it serves (an sshd's sessions outlive its listener)."""
        if self.proc is None or not procs.is_running(self.proc):
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        procs.stop([self.proc])
        self.proc = None


@pytest.fixture
def private_sshd(realenv: RealEnv, tmp_path: Path) -> Iterator[PrivateSshd]:
    directory = tmp_path / "private-sshd"
    directory.mkdir()
    sshd = PrivateSshd(realenv, directory)
    sshd.start()
    try:
        yield sshd
    finally:
        sshd.stop()


# -- tests -----------------------------------------------------------------------------------------


def test_first_contact_monitoring_and_an_outage(start: Callable[[str], Daemon], realenv: RealEnv,
                                                private_sshd: PrivateSshd, hypervisors: Callable, tmp_path: Path) -> None:
    daemon = start("state")
    done = create(daemon, "hv1", private_sshd.port, "--accept-hostkey")
    assert done.code == 0, done.err
    fingerprint = fingerprint_of(private_sshd.key.with_name("host_ed25519.pub"))
    assert done.out.startswith("ID: ") and f"ssh-ed25519 {fingerprint}" in done.err

    host = wait_state(daemon, "hv1", MONITORED)
    t = host.find("TEMPLATE")
    conn = hypervisors("host1").conn
    assert t.findtext("LIBVIRT_VERSION") == version(conn.getLibVersion())
    assert t.findtext("QEMU_VERSION") == version(conn.getVersion())
    assert 0 < int(t.findtext("FREE_MB")) <= int(t.findtext("TOTAL_MB"))
    assert (t.findtext("TOOL_QEMU_IMG"), t.findtext("TOOL_RSYNC"), t.findtext("TOOL_QEMU_NBD")) == ("YES",) * 3
    assert t.findtext("TOOL_RBD") in ("YES", "NO") and t.findtext("TOOL_RESTIC") in ("YES", "NO")
    assert t.find("ACCEPT_HOSTKEY") is None and t.find("ERROR") is None
    assert t.findtext("SSH_HOSTKEY_FINGERPRINT") == f"ssh-ed25519 {fingerprint}"
    assert int(host.findtext("MONITORING/TIMESTAMP")) > 0
    assert (tmp_path / "state-staging").is_dir()  # BACKUP_BASE_PATH created on the host
    recorded = hostkeys.known_keys(daemon.state_dir / "known_hosts", "127.0.0.1", private_sshd.port)
    assert [hostkeys.fingerprint(k) for k in recorded] == [fingerprint]

    private_sshd.stop()
    host = wait_state(daemon, "hv1", ERROR)
    error = host.findtext("TEMPLATE/ERROR")
    assert f"[127.0.0.1]:{private_sshd.port}" in error and "connect" in error, error
    assert host.findtext("TEMPLATE/LIBVIRT_VERSION") == version(conn.getLibVersion())  # last values kept

    private_sshd.start()
    host = wait_state(daemon, "hv1", MONITORED)
    assert host.find("TEMPLATE/ERROR") is None
    log = daemon.log()
    assert len(re.findall(rf"host hv1: ERROR: .*:{private_sshd.port}", log)) == 1, log  # once, not every second
    assert log.count("host hv1: recovered, MONITORED") == 1, log


def version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


def test_an_unknown_key_is_not_trusted_until_accepted(start: Callable[[str], Daemon], realenv: RealEnv) -> None:
    daemon = start("state")
    host2 = realenv.host("host2")
    done = create(daemon, "hv2", host2.ssh_port)
    assert done.code == 0, done.err
    host = wait_state(daemon, "hv2", ERROR)
    error = host.findtext("TEMPLATE/ERROR")
    fingerprint = fingerprint_of(host_key_of(realenv, host2))
    assert "host key not known" in error and fingerprint in error and "--accept-hostkey" in error, error
    assert not (daemon.state_dir / "known_hosts").exists() or \
        not hostkeys.known_keys(daemon.state_dir / "known_hosts", "127.0.0.1", host2.ssh_port)

    accepted = vmsched(daemon, "host", "accept-hostkey", "hv2")
    assert accepted.code == 0 and fingerprint in accepted.err, accepted.err
    host = wait_state(daemon, "hv2", MONITORED)
    assert host.find("TEMPLATE/ERROR") is None


def test_a_changed_key_is_refused_and_replaced_only_after_removal(start: Callable[[str], Daemon],
                                                                   realenv: RealEnv, tmp_path: Path) -> None:
    daemon = start("state")
    host1 = realenv.host("host1")
    known_hosts = daemon.state_dir / "known_hosts"
    other = asyncssh.generate_private_key("ssh-ed25519")
    hostkeys.accept_host_key(known_hosts, "127.0.0.1", host1.ssh_port, other)  # a tampered line
    tampered = known_hosts.read_text()

    done = create(daemon, "hv1", host1.ssh_port)
    assert done.code == 0, done.err
    error = wait_state(daemon, "hv1", ERROR).findtext("TEMPLATE/ERROR")
    real = fingerprint_of(host_key_of(realenv, host1))
    assert "HOST KEY CHANGED" in error and real in error and hostkeys.fingerprint(other) in error, error
    assert "ssh-keygen -R" in error

    refused = vmsched(daemon, "host", "accept-hostkey", "hv1")  # accepting never replaces a key
    assert refused.code != 0 and "ssh-keygen -R" in refused.err, refused.err
    assert known_hosts.read_text() == tampered
    assert wait_state(daemon, "hv1", ERROR) is not None

    again = create(daemon, "hv1-again", host1.ssh_port, "--accept-hostkey")  # nor does first contact
    assert again.code != 0 and "already has another key" in again.err, again.err
    assert "hv1-again" not in vmsched(daemon, "host", "list").out  # the CLI did not leave it behind

    pattern = f"[127.0.0.1]:{host1.ssh_port}"
    subprocess.run(["ssh-keygen", "-R", pattern, "-f", str(known_hosts)], check=True, capture_output=True)
    accepted = vmsched(daemon, "host", "accept-hostkey", "hv1")
    assert accepted.code == 0 and real in accepted.err, accepted.err
    assert wait_state(daemon, "hv1", MONITORED).find("TEMPLATE/ERROR") is None


def test_two_hosts_are_monitored_each_on_its_own(start: Callable[[str], Daemon], realenv: RealEnv,
                                                 hypervisors: Callable) -> None:
    daemon = start("state")
    names = {"hv-a": realenv.host("host1"), "hv-b": realenv.host("host2")}
    for name, info in names.items():
        done = create(daemon, name, info.ssh_port, "--accept-hostkey")
        assert done.code == 0, done.err
    for name, info in names.items():
        t = wait_state(daemon, name, MONITORED).find("TEMPLATE")
        conn = hypervisors(info.name).conn
        assert t.findtext("SSH_PORT") == str(info.ssh_port)
        assert t.findtext("LIBVIRT_VERSION") == version(conn.getLibVersion())
        assert t.findtext("QEMU_VERSION") == version(conn.getVersion())
        assert t.findtext("SSH_HOSTKEY_FINGERPRINT") == f"ssh-ed25519 {fingerprint_of(host_key_of(realenv, info))}"
    listed = vmsched(daemon, "host", "list").out.splitlines()
    assert [line.split()[1] for line in listed[1:]] == ["hv-a", "hv-b"]
    assert all(line.split()[-1] == "on" for line in listed[1:]), listed
