"""Full backups that cannot be made, through a real daemon: each ends with a clear API error or run MESSAGE,
leaves nothing behind (no image, no backup or ``.tmp-`` directory on the datastore, no staging dir on the
host, no overlay, the domain on its own disks) and the VM as it was, in the API and in libvirt.

The daemon here gives up at the first failure (``RETRY = [ MAX = "0" ]``), so ``vmsched.vm.backupstatus``
says ``given_up`` with the attempt's message. Its known_hosts is a copy of the realenv's, to which the
tests add an sshd's key (the backup server's, or host1's) for the port of a :class:`Forwarder`: a TCP
forwarder on loopback to that sshd, which a test cuts at the moment it chooses (mid-upload, or before a
backup of a VM on host1).

Refusals already covered by tests/test_backup_real.py (not a BACKUP_DS, unbound VM, not authorized) are
not repeated.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest
from lxml import etree

from tests.conftest import REPO, start_daemon
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.test_backup_real import RUNNING, Setup, backup_ids, no_leftovers, states
from tests.test_import_real import Api, real_daemon

pytestmark = pytest.mark.realenv
WAIT = 60.0  # seconds: a backup run, or an upload to start, past that is a failure
CLI_WAIT = 90
SUSPENDED = ("5", "0")
LOST = ("End of file while reading data", "Cannot recv data", "Connection refused")  # libvirt: no host
# rsync's own --bwlimit (KiB/s), not RSYNC_BWLIMIT, which limits the capture on the host too: the upload of a
# few MiB lasts long enough to be cut, the capture before it does not
SLOW = 'RSYNC_ARGS = "-aS --bwlimit=64"'


# ---- a backup server that can go away ------------------------------------------------------------------------


class Forwarder:
    """Forwards TCP connections from a loopback port to ``target_port``; ``sever`` resets every open
    connection (the server is reachable again at once), ``stop`` also stops listening, ``listen`` again
    on the same port."""

    def __init__(self, target_port: int, rate: int | None = None) -> None:
        self.target_port = target_port
        self.rate = rate  # bytes per second in each direction of a connection; None: as fast as it goes
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.listen()

    def listen(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                if self._listener is not listener:
                    return  # stopped
                continue  # e.g. ECONNABORTED: a client that reset before it was accepted; the rest are served
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)  # the rate limit itself, not a wait for an event
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        source.close()  # each socket is the source of one pump: closed once, no descriptor leaks over a long run
        with self._lock:
            self._sockets = [s for s in self._sockets if s is not source]

    def sever(self) -> None:
        """Reset every forwarded connection (RST, as a server that vanished from the network). A socket closed
        while a pump blocks in ``recv`` on it stays open until that ``recv`` returns, which a copy whose data
        flows one way (``ssh cat``) never makes happen: each socket's reading side is shut first, which wakes
        its pump."""
        with self._lock:
            doomed, self._sockets = self._sockets, []
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD)
                sock.close()

    def stop(self) -> None:
        listener, self._listener = self._listener, None  # first: the accepting thread then knows it is stopped
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            listener.close()
        self.sever()


@dataclass
class Faults:
    """The daemon of this module (see :class:`tests.test_backup_real.Setup`) and its known_hosts."""

    s: Setup
    known_hosts: Path
    backup_key: str  # "ssh-ed25519 AAAA..." of the backup server
    forwarders: list[Forwarder] = field(default_factory=list)

    def forwarder(self, port: int | None = None, key: str | None = None) -> Forwarder:
        """A forwarder to the sshd on ``port`` (the backup server's by default) whose own port the daemon
        and the hosts trust with that sshd's host ``key``."""
        forwarder = Forwarder(port or self.s.realenv.backup.ssh_port)
        self.forwarders.append(forwarder)
        with self.known_hosts.open("a") as known:
            known.write(f"[127.0.0.1]:{forwarder.port} {key or self.backup_key}\n")
        return forwarder

    def rsync_datastore(self, name: str, port: int, extra: str = "") -> int:
        backup = self.s.realenv.backup
        return self.s.datastore(
            f'NAME = "{name}"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"\nBASE_PATH = "{self.s.rsync_base}"\n'
            f'RSYNC_HOST = "{backup.address}"\nRSYNC_USER = "{backup.user}"\nRSYNC_PORT = "{port}"\n{extra}')


def host_key_of(known_hosts: Path, port: int) -> str:
    prefix = f"[127.0.0.1]:{port} "
    [line] = [line for line in known_hosts.read_text().splitlines() if line.startswith(prefix)]
    return line.removeprefix(prefix)


def host1_behind(forwarder: Forwarder) -> Callable[[RealEnv, Path], Iterator[Api]]:
    """Like ``real_daemon``, with host1 alone, registered at the port of ``forwarder`` from the start (its
    libvirt URI never changes afterwards)."""

    def start(realenv: RealEnv, state: Path) -> Iterator[Api]:
        daemon = start_daemon(state)
        api = Api(daemon, {})
        try:
            host = realenv.host("host1")
            host_id = int(api.call("one.host.allocate", host.name, "kvm", "kvm", -1))  # type: ignore[call-overload]
            api.call("one.host.update", host_id, f'SSH_HOST = "{host.address}"\nSSH_PORT = "{forwarder.port}"\n'
                     f'SSH_USER = "{host.user}"', 1)
            api.hosts[host.name] = host_id
            yield api
        finally:
            code = daemon.stop()
            assert code == 0, f"daemon exited with {code}; log:\n{daemon.log()}"
            assert "Traceback" not in daemon.log(), daemon.log()

    return start


def fault_daemon(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory, name: str,
                 host1_forwarded: bool = False) -> Iterator[Faults]:
    """A daemon that gives up at the first failure, with its own known_hosts, fs/rsync/image datastores and
    the staging and rsync directories marked ``name``; with ``host1_forwarded``, host1 alone, reached
    through the first of the forwarders (which are stopped afterwards)."""
    marker = f"{name}-{secrets.token_hex(6)}"
    staging = f"/var/tmp/{marker}"
    rsync_base = realenv.backup.data_dir / marker
    state = tmp_path_factory.mktemp("daemon") / "state"
    state.mkdir(parents=True)
    known = state.parent / "known_hosts"
    known.write_text(realenv.ssh.known_hosts.read_text())
    (state / "sched.conf").write_text(
        f'LISTEN = [ ADDRESS = "127.0.0.1", PORT = "0" ]\nBACKUP_BASE_PATH = "{staging}"\nRETRY = [ MAX = "0" ]\n'
        'MONITORING_INTERVAL_HOST = 3600\n'  # hosts are probed when their template changes, not in between
        f'SSH = [ KNOWN_HOSTS = "{known}", KEY = "{realenv.ssh.client_key}" ]\n')
    fs_base = tmp_path_factory.mktemp("fsds")
    key, forwarders = host_key_of(known, realenv.backup.ssh_port), list[Forwarder]()
    daemon = real_daemon
    if host1_forwarded:
        port = realenv.host("host1").ssh_port
        forwarders.append(Forwarder(port))
        with known.open("a") as lines:
            lines.write(f"[127.0.0.1]:{forwarders[0].port} {host_key_of(known, port)}\n")
        daemon = host1_behind(forwarders[0])
    try:
        for api in daemon(realenv, state):
            yield Faults(Setup(api, realenv, fs_base, rsync_base, staging), known, key, forwarders)
    finally:
        for forwarder in forwarders:
            forwarder.stop()
        for server, path in (("backup", str(rsync_base)), ("host1", staging)):  # our marked directories
            subprocess.run(realenv.ssh_argv(server, ["rm", "-rf", "--", path]), timeout=30, check=False)


@pytest.fixture(scope="module")
def faults(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    yield from fault_daemon(realenv, tmp_path_factory, "vmsched-bkfault")


# ---- helpers ----------------------------------------------------------------------------------------------------


def last_run(api: Api, vm_id: int) -> int:
    """The id of the VM's newest one-shot backup run; 0 when it has none."""
    try:
        return int(api.call("vmsched.vm.backupstatus", vm_id)["ID"])  # type: ignore[index]
    except RuntimeError as exc:
        assert "no one-shot backup" in str(exc), exc
        return 0


def wait_run(api: Api, vm_id: int, after: int, until: tuple[str, ...] = ("done", "failed", "given_up",
                                                                        "cancelled")) -> dict:
    """The VM's one-shot run newer than ``after``, once its STATE is one of ``until``."""
    deadline = time.monotonic() + WAIT
    while True:
        status = dict(api.call("vmsched.vm.backupstatus", vm_id))  # type: ignore[call-overload]
        if status["ID"] > after and status["STATE"] in until:
            return status
        assert time.monotonic() < deadline, f"run of VM {vm_id}: {status}\n{api.daemon.log()[-3000:]}"
        time.sleep(0.05)


def backup(api: Api, vm_id: int, ds_id: int) -> dict:
    """one.vm.backup, then the run's final status."""
    before = last_run(api, vm_id)
    api.call("one.vm.backup", vm_id, ds_id, False)
    return wait_run(api, vm_id, before)


def wait_upload(vm_dir: Path) -> Path:
    """The ``.tmp-`` directory of the upload into ``vm_dir`` once rsync has started writing into it."""
    deadline = time.monotonic() + WAIT
    while True:
        tmp = [p for p in vm_dir.iterdir() if p.name.startswith(".tmp-")] if vm_dir.is_dir() else []
        if tmp and any(tmp[0].iterdir()):
            return tmp[0]
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.02)


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def nothing_left(s: Setup, hypervisor: Hypervisor, dom: TinyDomain, vm_id: int, images: list[int],
                 vm_state: tuple[str, str] = RUNNING, domain_state: str = "running") -> None:
    """No image, no backup on either datastore, nothing on the host; the VM as it was."""
    assert s.image_ids() == images and backup_ids(s.api, vm_id) == []
    assert entries(s.fs_base / str(vm_id)) == [] and entries(s.rsync_base / str(vm_id)) == []
    no_leftovers(s, hypervisor, dom, vm_id)  # own disks, no overlay, no staging dir
    assert states(s.api, vm_id) == vm_state and hypervisor.state(dom) == domain_state


# ---- the tests ----------------------------------------------------------------------------------------------------


def wait_monitored(api: Api, host_id: int) -> None:
    deadline = time.monotonic() + WAIT
    while etree.fromstring(str(api.call("one.host.info", host_id)).encode()).findtext("STATE") != "2":
        assert time.monotonic() < deadline, api.daemon.log()[-3000:]
        time.sleep(0.05)


@pytest.fixture
def lone(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    """A daemon of its own that reaches host1 (ssh and libvirt) through ``forwarders[0]``."""
    yield from fault_daemon(realenv, tmp_path_factory, "vmsched-bklone", host1_forwarded=True)


def test_unreachable_host(lone: Faults, tiny_domain: Callable[..., TinyDomain],
                          hypervisors: Callable[[str], Hypervisor]) -> None:
    s, host1 = lone.s, hypervisors("host1")
    wait_monitored(s.api, s.api.hosts["host1"])
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    images = s.image_ids()
    lone.forwarders[0].stop()  # host1 is gone; the daemon learns it from the backup run, not from monitoring
    status = backup(s.api, vm_id, s.fs_ds)
    assert status["STATE"] == "given_up", status
    # the host is named; then the domain, when the backup was under way as the link went, or the connection
    # libvirt could not make again, when it learnt of the loss first
    assert status["MESSAGE"].startswith((f"host1: domain '{host1.lookup(dom).UUIDString()}': ",
                                         "host1: connect qemu+ssh://")), status
    assert any(words in status["MESSAGE"] for words in (*LOST, "Connection refused")), status
    nothing_left(s, host1, dom, vm_id, images)


def test_full_datastore(faults: Faults, tiny_domain: Callable[..., TinyDomain],
                        hypervisors: Callable[[str], Hypervisor]) -> None:
    s, host1 = faults.s, hypervisors("host1")
    full = s.datastore(f'NAME = "fullbk"\nTYPE = "BACKUP_DS"\nDS_MAD = "fs"\nBASE_PATH = "{s.fs_base}"\n'
                       'LIMIT_MB = "1"')  # the VM's disks reserve 96 MB
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    images = s.image_ids()
    deadline = time.monotonic() + 30  # monitored at once on creation: TOTAL_MB is LIMIT_MB
    while etree.fromstring(str(s.api.call("one.datastore.info", full)).encode()).findtext("TOTAL_MB") != "1":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = last_run(s.api, vm_id)
    assert s.api.failure("one.vm.backup", vm_id, full, False).endswith("Not enough free space on target datastore")
    assert last_run(s.api, vm_id) == before  # refused by the API: no run was queued
    nothing_left(s, host1, dom, vm_id, images)
    s.api.call("one.datastore.update", full, 'DATASTORE_CAPACITY_CHECK = "NO"', 1)  # the check is what refused
    status = backup(s.api, vm_id, full)
    assert status["STATE"] == "done", status
    [image_id] = backup_ids(s.api, vm_id)
    assert entries(s.fs_base / str(vm_id)) == [s.image(image_id).findtext("SOURCE")]


def diskless_domain(hypervisor: Hypervisor, directory: Path) -> str:
    """A running TCG domain whose only disk is a CD-ROM (nothing a backup takes)."""
    directory.mkdir(parents=True, exist_ok=True)
    iso = directory / "cdrom.iso"
    with open(iso, "wb") as f:
        f.truncate(1 << 20)
    name = f"vmsched-t-{secrets.token_hex(4)}"
    hypervisor.conn.defineXML(f"""\
<domain type='qemu'>
  <name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='cdrom'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file={quoteattr(str(iso))}/>
      <target dev='hdc' bus='ide'/><readonly/></disk>
    <controller type='usb' model='none'/><memballoon model='none'/>
  </devices>
</domain>""").create()
    return name


def test_vm_without_disks(faults: Faults, hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    s, host1 = faults.s, hypervisors("host1")
    name = diskless_domain(host1, tmp_path / "diskless")
    try:
        vm_id = s.api.import_one("host1", name)
        images = s.image_ids()
        expected = f"[one.vm.backup] VM {vm_id} has no disk to back up (CDROM, swap and volatile disks are not backed up)"
        assert s.api.failure("one.vm.backup", vm_id, s.fs_ds, False) == expected
        ok, message = s.api.run_action(vm_id, "backup", f"{s.fs_ds},0")  # scheduled: the run refuses it too
        assert not ok and message.endswith(" : " + expected.removeprefix("[one.vm.backup] ")), message
        assert s.image_ids() == images and backup_ids(s.api, vm_id) == []
        assert entries(s.fs_base / str(vm_id)) == []
        assert s.on_host1(["test", "-e", f"{s.staging}/{vm_id}"]).returncode == 1
        assert states(s.api, vm_id) == RUNNING and host1.conn.lookupByName(name).state()[0] == 1  # running
    finally:
        domain = host1.conn.lookupByName(name)
        domain.destroy()
        domain.undefine()


def test_suspended_vm(faults: Faults, tiny_domain: Callable[..., TinyDomain],
                      hypervisors: Callable[[str], Hypervisor]) -> None:
    s, host1 = faults.s, hypervisors("host1")
    dom = tiny_domain("host1")
    host1.lookup(dom).suspend()
    vm_id = s.api.import_one("host1", dom.name)
    assert states(s.api, vm_id) == SUSPENDED
    images = s.image_ids()
    expected = f"[one.vm.backup] Could not create a new backup for VM {vm_id}, wrong state SUSPENDED."
    assert s.api.failure("one.vm.backup", vm_id, s.fs_ds, False) == expected
    ok, message = s.api.run_action(vm_id, "backup", f"{s.fs_ds},0")
    assert not ok and message.endswith(" : " + expected.removeprefix("[one.vm.backup] ")), message
    nothing_left(s, host1, dom, vm_id, images, vm_state=SUSPENDED, domain_state="paused")


def test_agent_freeze_without_an_agent(faults: Faults, tiny_domain: Callable[..., TinyDomain],
                                       hypervisors: Callable[[str], Hypervisor]) -> None:
    s, host1 = faults.s, hypervisors("host1")
    dom = tiny_domain("host1")  # an agent channel, but no OS: nobody answers on it
    vm_id = s.api.import_one("host1", dom.name)
    s.api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ FS_FREEZE = "AGENT" ]', 1)
    images = s.image_ids()
    cli = subprocess.run([sys.executable, "-m", "scheduler", "vm", "backup", str(vm_id), "-d", "fsbk", "--wait"],
                         env=s.api.daemon.env, cwd=REPO, capture_output=True, text=True, timeout=CLI_WAIT)
    out = " ".join(cli.stdout.split())
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert f"backup of VM {vm_id}: given_up: host1: domain" in out, cli.stdout + cli.stderr
    assert "not connected" in out, out
    assert "FS_FREEZE=AGENT needs a running QEMU guest agent in the VM; nothing was snapshotted" in out, out
    nothing_left(s, host1, dom, vm_id, images)


def slow_vm(s: Setup, tiny_domain: Callable[..., TinyDomain], hypervisor: Hypervisor) -> tuple[TinyDomain, int]:
    dom = tiny_domain("host1")
    hypervisor.write_pattern(dom, "vda", pattern=0x44, offset="4M", length="3M")
    return dom, s.api.import_one("host1", dom.name)


def test_backup_server_connection_lost_mid_upload(faults: Faults, tiny_domain: Callable[..., TinyDomain],
                                                  hypervisors: Callable[[str], Hypervisor]) -> None:
    s, host1 = faults.s, hypervisors("host1")
    forwarder = faults.forwarder()
    ds_id = faults.rsync_datastore("blipbk", forwarder.port, SLOW)
    dom, vm_id = slow_vm(s, tiny_domain, host1)
    images = s.image_ids()
    before = last_run(s.api, vm_id)
    s.api.call("one.vm.backup", vm_id, ds_id, False)
    wait_upload(s.rsync_base / str(vm_id))
    forwarder.sever()  # the server is reachable again at once: the partial upload can be removed
    status = wait_run(s.api, vm_id, before)
    assert status["STATE"] == "given_up", status
    assert "`rsync " in status["MESSAGE"] and "rsync error: " in status["MESSAGE"], status
    nothing_left(s, host1, dom, vm_id, images)


def test_backup_server_gone_mid_upload(faults: Faults, tiny_domain: Callable[..., TinyDomain],
                                       hypervisors: Callable[[str], Hypervisor]) -> None:
    s, host1 = faults.s, hypervisors("host1")
    forwarder = faults.forwarder()
    ds_id = faults.rsync_datastore("gonebk", forwarder.port, SLOW)
    dom, vm_id = slow_vm(s, tiny_domain, host1)
    images = s.image_ids()
    before = last_run(s.api, vm_id)
    s.api.call("one.vm.backup", vm_id, ds_id, False)
    partial = wait_upload(s.rsync_base / str(vm_id))
    forwarder.stop()  # gone: not even the partial upload can be removed now
    status = wait_run(s.api, vm_id, before)
    assert status["STATE"] == "given_up", status
    assert "`rsync " in status["MESSAGE"] and "rsync error: " in status["MESSAGE"], status
    assert s.image_ids() == images and backup_ids(s.api, vm_id) == []
    no_leftovers(s, host1, dom, vm_id)
    assert states(s.api, vm_id) == RUNNING and host1.state(dom) == "running"
    forwarder.listen()  # the server is back; the next backup into that datastore finds the partial upload
    s.api.call("one.datastore.update", ds_id, 'RSYNC_ARGS = "-aS"', 1)
    status = backup(s.api, vm_id, ds_id)
    assert status["STATE"] == "done", status
    [image_id] = backup_ids(s.api, vm_id)
    assert not partial.exists(), f"the partial upload of the given-up run is still there: {partial}"
    assert entries(s.rsync_base / str(vm_id)) == [s.image(image_id).findtext("SOURCE")]
    no_leftovers(s, host1, dom, vm_id)
