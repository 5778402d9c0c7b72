"""kill -9 of the daemon at each step of a live backup, then a restart (issue: crash recovery).

The daemon kills itself at a named point (``VMSCHED_CRASH_AT``, test-only): after the guest is suspended,
after the snapshot, while a convert runs, before the commit, while the upload runs, after the upload but
before the record. While it is dead the test sees the mess that point leaves (a paused guest, a guest on
its overlay, qemu-img or rsync still running on the host, an unrecorded backup on the server). The
restarted daemon must clean it up before it listens (recovery runs first), then retry the backup:
afterwards the guest runs on its own disks, unpaused, the processes the first attempt left are gone,
no overlay, staging dir or partial upload is left, and exactly one backup, complete, is recorded.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import Daemon, start_daemon
from tests.realenv.agentguest import AgentGuest, check_filesystem
from tests.realenv.domains import Hypervisor, TinyDomain, disk_sources
from tests.realenv.model import RealEnv
from tests.test_backup_real import same_image, snapshot_copy
from tests.test_import_real import Api

pytestmark = pytest.mark.realenv
DONE_WAIT = 90.0  # seconds: the retried backup of a tiny domain through a rate-limited datastore
RATE = "1024"  # KiB/s, RSYNC_BWLIMIT: also the convert's rate (past a burst of ~2 MiB), so both last seconds


@dataclass
class Env:
    realenv: RealEnv
    base: Path  # the rsync datastore's BASE_PATH on the backup server
    staging: str  # BACKUP_BASE_PATH on the hypervisors

    def config(self) -> str:
        ssh = self.realenv.ssh
        return (f'BACKUP_BASE_PATH = "{self.staging}"\nRETRY = [ MAX = "2", BACKOFF = "1" ]\n'
                f'SSH = [ KNOWN_HOSTS = "{ssh.known_hosts}", KEY = "{ssh.client_key}" ]\n')

    def on_host1(self, script: str, *args: str) -> str:
        argv = self.realenv.ssh_argv("host1", ["sh", "-c", script, "sh", *args])
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture(scope="module")
def env(realenv: RealEnv) -> Iterator[Env]:
    marker = f"vmsched-crash-{secrets.token_hex(6)}"
    environment = Env(realenv, realenv.backup.data_dir / marker, f"/var/tmp/{marker}")
    yield environment
    subprocess.run(realenv.ssh_argv("backup", ["rm", "-rf", "--", str(environment.base)]), timeout=30, check=False)
    environment.on_host1('rm -rf -- "$1"', environment.staging)


def register_host(api: Api, realenv: RealEnv, name: str = "host1") -> int:
    """A host of the real environment, reached over its sshd; its id."""
    host = realenv.host(name)
    host_id = int(api.call("one.host.allocate", host.name, "kvm", "kvm", -1))  # type: ignore[call-overload]
    api.call("one.host.update", host_id,
             f'SSH_HOST = "{host.address}"\nSSH_PORT = "{host.ssh_port}"\nSSH_USER = "{host.user}"', 1)
    api.hosts[host.name] = host_id
    return host_id


def register(api: Api, env: Env, base: Path) -> tuple[int, int]:
    """host1 and a rate-limited rsync datastore on the backup server: (host id, datastore id)."""
    host_id = register_host(api, env.realenv)
    backup = env.realenv.backup
    ds_id = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                         f'NAME = "crashbk"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"\nBASE_PATH = "{base}"\n'
                         f'RSYNC_HOST = "{backup.address}"\nRSYNC_USER = "{backup.user}"\n'
                         f'RSYNC_PORT = "{backup.ssh_port}"\nRSYNC_BWLIMIT = "{RATE}"', -1))
    return host_id, ds_id


def wait_done(api: Api, vm_id: int) -> dict:
    deadline = time.monotonic() + DONE_WAIT
    while True:
        status = dict(api.call("vmsched.vm.backupstatus", vm_id))  # type: ignore[call-overload]
        if status["STATE"] in ("done", "given_up", "failed", "cancelled"):
            return status
        assert time.monotonic() < deadline, f"backup still {status}; log:\n{api.daemon.log()[-4000:]}"
        time.sleep(0.1)


def images_of(api: Api, vm_id: int) -> list[int]:
    return [int(i.text or "") for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]


def processes(env: Env, marker: str) -> set[str]:
    """pids of the host1 processes whose command line names ``marker`` (the run's staging dir)."""
    pattern = f"[{marker[0]}]{marker[1:]}"
    return set(env.on_host1('pgrep -f -- "$1" || true', pattern).split())


# (crash point, FS_FREEZE, what the dead daemon must have left)
POINTS = [
    ("quiesced", "SUSPEND", "paused"),
    ("snapshot", "SUSPEND", "overlay"),
    ("convert", "NONE", "process"),
    ("converted", "NONE", "overlay"),
    ("upload", "NONE", "process"),
    ("uploaded", "NONE", "unrecorded"),
]


@pytest.mark.parametrize(("point", "freeze", "left"), POINTS, ids=[p[0] for p in POINTS])
def test_kill_9_at_each_step_then_restart(env: Env, point: str, freeze: str, left: str, tmp_path: Path,
                                          tiny_domain: Callable[..., TinyDomain],
                                          hypervisors: Callable[[str], Hypervisor]) -> None:
    host1 = hypervisors("host1")
    dom = tiny_domain("host1")
    host1.write_pattern(dom, "vda", pattern=0x4C, offset="4M", length="3M")
    host1.write_pattern(dom, "vdb", pattern=0x4D, offset="1M", length="3M")  # either convert may be the first
    before = snapshot_copy(dom.vda, tmp_path / "before.qcow2", "qcow2")
    state = tmp_path / "state"
    first = start_daemon(state, env.config(), extra_env={"VMSCHED_CRASH_AT": point})
    api = Api(first, {})
    try:
        _, ds_id = register(api, env, env.base / point)
        [result] = api.import_domains("host1", [dom.name])
        vm_id = int(result["ID"])
        api.call("one.vm.updateconf", vm_id, f'BACKUP_CONFIG = [ FS_FREEZE = "{freeze}" ]', 1)
        api.call("one.vm.backup", vm_id, ds_id, False)
        assert first.process.wait(timeout=60) == -signal.SIGKILL, first.log()[-3000:]
    finally:
        first.stop(signal.SIGKILL)  # closes its log pipe too
    assert f"crash point '{point}' reached" in first.log()

    staging = f"{env.staging}/{vm_id}"
    vm_dir = env.base / point / str(vm_id)
    leftovers = check_left(env, host1, dom, left, staging, vm_dir)

    second = start_daemon(state, env.config())  # listens only once start-up recovery is done
    api.daemon = second
    try:
        # recovered before the retry: guest unpaused on its own disks, the first attempt's processes dead
        assert host1.state(dom) == "running"
        assert not leftovers & processes(env, staging), env.on_host1("ps -ef")
        status = wait_done(api, vm_id)
        assert status["STATE"] == "done", (status, second.log()[-4000:])
        [image_id] = images_of(api, vm_id)
        backup_id = etree.fromstring(str(api.call("one.image.info", image_id)).encode()).findtext("SOURCE")
        assert sorted(p.name for p in vm_dir.iterdir()) == [backup_id]  # no partial or unrecorded upload
        assert same_image(vm_dir / backup_id / "disk.0.0", before)
        assert host1.disk_sources(dom) == {"vda": dom.vda, "vdb": dom.vdb}
        assert host1.state(dom) == "running"
        assert not list(dom.directory.glob("*vmsched*"))  # no overlay file
        assert env.on_host1('test -e "$1" && echo left', staging) == ""
        assert processes(env, staging) == set()
        assert api.vm(vm_id).findtext("LCM_STATE") == "3"
        if left == "process":
            assert "killed process group" in second.log()
    finally:
        stop(second)


def check_left(env: Env, host1: Hypervisor, dom: TinyDomain, left: str, staging: str, vm_dir: Path) -> set[str]:
    """Assert that the crash left what its point implies; returns the pids of the processes it left."""
    sources = host1.disk_sources(dom)
    if left == "paused":
        assert host1.state(dom) == "paused"
        assert sources == {"vda": dom.vda, "vdb": dom.vdb}
    if left == "overlay":
        assert all(".overlay" in str(path) for path in sources.values()), sources
    pids = processes(env, staging)
    if left == "process":
        assert pids, "the crash left no convert or upload running"
    if left == "unrecorded":
        assert [p.name for p in vm_dir.iterdir() if not p.name.startswith(".")], "no complete upload"
    return pids


def stop(daemon: Daemon) -> None:
    code = daemon.stop()
    assert code == 0, daemon.log()[-3000:]
    assert "Traceback" not in daemon.log(), daemon.log()


def test_kill_9_while_the_guest_agent_holds_the_filesystems_frozen(env: Env, agent_guest: AgentGuest,
                                                                   hypervisors: Callable[[str], Hypervisor],
                                                                   tmp_path: Path) -> None:
    """FS_FREEZE=AGENT with the real agent guest: the daemon dies after the snapshot, before the thaw."""
    state = tmp_path / "state"
    first = start_daemon(state, env.config(), extra_env={"VMSCHED_CRASH_AT": "snapshot"})
    api = Api(first, {})
    try:
        _, ds_id = register(api, env, env.base / "agent")
        vm_id = api.import_one("host1", agent_guest.name)
        api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ FS_FREEZE = "AGENT" ]', 1)
        api.call("one.vm.backup", vm_id, ds_id, False)
        assert first.process.wait(timeout=60) == -signal.SIGKILL, first.log()[-3000:]
    finally:
        first.stop(signal.SIGKILL)  # closes its log pipe too
    assert agent_guest.fsfreeze_status() == "frozen"  # what the crash left
    second = start_daemon(state, env.config())
    api.daemon = second
    try:
        assert agent_guest.fsfreeze_status() == "thawed"  # recovered before the daemon listens
        status = wait_done(api, vm_id)
        assert status["STATE"] == "done", (status, second.log()[-4000:])
        assert agent_guest.fsfreeze_status() == "thawed"
        assert disk_sources(agent_guest.dom.XMLDesc()) == {"vda": agent_guest.disks[0]}
        agent_guest.write_file("/mnt/vda/after-crash", b"after")  # would block while frozen
        [image_id] = images_of(api, vm_id)
        backup_id = etree.fromstring(str(api.call("one.image.info", image_id)).encode()).findtext("SOURCE")
        vm_dir = env.base / "agent" / str(vm_id)
        assert sorted(p.name for p in vm_dir.iterdir()) == [backup_id]
        check_filesystem(vm_dir / str(backup_id) / "disk.0.0", tmp_path)  # e2fsck -fn passes, or it raises
    finally:
        stop(second)
