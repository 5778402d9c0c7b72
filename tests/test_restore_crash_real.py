"""kill -9 of the daemon in the middle of a restore, then a restart; and the backup server lost mid-copy.

The daemon kills itself at a named point (``VMSCHED_CRASH_AT``, test-only) of an in-place restore
(``one.vm.restore``: while a disk's copy runs, once every disk is fetched and verified, after the first disk
was swapped in) or of a restore to new images (``one.image.restore``: while a copy runs, once every copy is
done). While it is dead the test sees what that point leaves (a copy still running on host1, temporary files
next to the disks or in the image datastore, one disk swapped and the other not). The restarted daemon must
clean that up before it listens: before the swap the VM is exactly as it was (its disks as compared with
``qemu-img compare`` against copies taken before the restore, POWEROFF, no ``.vmsched-`` file, no process
left), after the first swap the restore is finished (both disks hold the backup); the images of an
interrupted restore to new images are gone with their files, and no template was made.

Slow copies: the backup datastore is switched, after the backup, to the port of a :class:`Forwarder` (a
rate-limited TCP forwarder on loopback to the backup server's sshd, whose host key the daemon trusts for that
port), so a copy of a few MiB lasts seconds and is still running when the daemon dies at a ``*-fetch`` point,
and can be cut by the test once its temporary file has started to grow.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import signal
import subprocess
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import Daemon, start_daemon
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.test_backup_crash_real import register_host, stop
from tests.test_backup_faults_real import Forwarder, host_key_of
from tests.test_backup_real import POWEROFF, backup_ids, same_image, states
from tests.test_import_real import Api
from tests.test_restore_real import copies, overwrite, untouched

pytestmark = pytest.mark.realenv
WAIT = 60.0  # seconds: a backup or restore of a tiny domain, a daemon's death, a copy to start
RATE = 1024 * 1024  # bytes/s through the slow forwarder: the copy of the 4 MiB written to vda lasts ~4 s
LOST = ("Broken pipe", "Connection reset", "Connection closed", "closed by remote host")  # ssh, server gone
PART = re.compile(r"\.vmsched-(fetch|raw|new|old)-(\d+)\.part")


# ---- a backup server behind a slow (and cuttable) link ----------------------------------------------------------


@dataclass
class Env:
    realenv: RealEnv
    known_hosts: Path  # the daemons' own copy, to which the forwarders' ports are added
    staging: str  # BACKUP_BASE_PATH on host1
    rsync_base: Path  # the rsync datastore's BASE_PATH on the backup server
    slow: Forwarder

    def config(self) -> str:
        return (f'BACKUP_BASE_PATH = "{self.staging}"\nRETRY = [ MAX = "0" ]\nMONITORING_INTERVAL_HOST = 3600\n'
                f'SSH = [ KNOWN_HOSTS = "{self.known_hosts}", KEY = "{self.realenv.ssh.client_key}" ]\n')

    def trust(self, forwarder: Forwarder) -> Forwarder:
        """The backup server's host key, for the forwarder's port."""
        key = host_key_of(self.known_hosts, self.realenv.backup.ssh_port)
        with self.known_hosts.open("a") as known:
            known.write(f"[127.0.0.1]:{forwarder.port} {key}\n")
        return forwarder

    def on_host1(self, script: str, *args: str) -> str:
        argv = self.realenv.ssh_argv("host1", ["sh", "-c", script, "sh", *args])
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture(scope="module")
def env(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    marker = f"vmsched-rscrash-{secrets.token_hex(6)}"
    known = tmp_path_factory.mktemp("ssh") / "known_hosts"
    known.write_text(realenv.ssh.known_hosts.read_text())
    slow = Forwarder(realenv.backup.ssh_port, rate=RATE)
    environment = Env(realenv, known, f"/var/tmp/{marker}", realenv.backup.data_dir / marker, slow)
    environment.trust(slow)
    try:
        yield environment
    finally:
        slow.stop()
        subprocess.run(realenv.ssh_argv("backup", ["rm", "-rf", "--", str(environment.rsync_base)]), timeout=30,
                       check=False)
        environment.on_host1('rm -rf -- "$1"', environment.staging)


# ---- helpers ----------------------------------------------------------------------------------------------------


@dataclass
class Ids:
    rsync_ds: int
    image_ds: int


def register(api: Api, env: Env, images: Path) -> Ids:
    """host1, an rsync backup datastore (direct to the backup server) and an image datastore on host1."""
    register_host(api, env.realenv)
    backup = env.realenv.backup
    rsync_ds = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                            f'NAME = "crashrs"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"\nBASE_PATH = "{env.rsync_base}"\n'
                            f'RSYNC_HOST = "{backup.address}"\nRSYNC_USER = "{backup.user}"\n'
                            f'RSYNC_PORT = "{backup.ssh_port}"', -1))
    image_ds = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                            f'NAME = "crashimgs"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBRIDGE_LIST = "host1"\n'
                            f'BASE_PATH = "{images}"', -1))
    return Ids(rsync_ds, image_ds)


def through(api: Api, ds_id: int, port: int) -> None:
    """The backup datastore reached at ``port`` from now on (a forwarder's, or the backup server's own)."""
    api.call("one.datastore.update", ds_id, f'RSYNC_PORT = "{port}"', 1)


def wait_status(api: Api, method: str, vm_id: int, after: int = 0) -> dict:
    """The VM's newest run (backup or restore) newer than ``after``, once it is over."""
    deadline = time.monotonic() + WAIT
    while True:
        status = dict(api.call(method, vm_id))  # type: ignore[call-overload]
        if status["ID"] > after and status["STATE"] not in ("queued", "running"):
            return status
        assert time.monotonic() < deadline, f"{method} {vm_id}: {status}\n{api.daemon.log()[-3000:]}"
        time.sleep(0.05)


def backed_up(api: Api, ids: Ids, tiny_domain: Callable[..., TinyDomain], host1: Hypervisor,
              tmp_path: Path) -> tuple[TinyDomain, int, int, tuple[Path, Path]]:
    """A powered-off domain with 4 MiB of data on vda and 1 MiB on vdb, imported and backed up into the rsync
    datastore: the domain, the VM, the backup image and copies of the disks as backed up."""
    dom = tiny_domain("host1")
    host1.write_pattern(dom, "vda", pattern=0x31, offset="4M", length="4M")
    host1.write_pattern(dom, "vdb", pattern=0x32, offset="2M", length="1M")
    host1.destroy(dom)
    vm_id = api.import_one("host1", dom.name)
    assert states(api, vm_id) == POWEROFF
    api.call("one.vm.backup", vm_id, ids.rsync_ds, False)
    status = wait_status(api, "vmsched.vm.backupstatus", vm_id)
    assert status["STATE"] == "done", (status, api.daemon.log()[-3000:])
    [image_id] = backup_ids(api, vm_id)
    return dom, vm_id, image_id, copies(dom, tmp_path, "backed-up")


def processes(env: Env, marker: Path) -> set[str]:
    """pids of the host1 processes whose command line names ``marker`` (a directory of this test)."""
    text = str(marker)
    assert re.fullmatch(r"[\w/-]+", text), text  # no character special to pgrep's regular expressions
    return set(env.on_host1('pgrep -f -- "$1" || true', f"[{text[0]}]{text[1:]}").split())


def ps_naming(env: Env, marker: Path) -> str:
    """What host1 runs that names ``marker``: an assertion's explanation."""
    return env.on_host1('ps -eo pid,pgid,args | grep -F -- "$1" | grep -v grep || true', str(marker))


def parts(directory: Path) -> list[str]:
    """The names of vmsched's temporary files in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if PART.search(p.name))


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def appeared(directory: Path, names: Callable[[Path], list[str]]) -> list[str]:
    """``names(directory)`` once it lists something. A copy's temporary file is opened by the copy's shell a
    moment after the daemon learns that the copy started (and may die)."""
    deadline = time.monotonic() + WAIT
    while not (found := names(directory)):
        assert time.monotonic() < deadline, f"nothing appeared in {directory}: {entries(directory)}"
        time.sleep(0.02)
    return found


def wait_killed(daemon: Daemon, point: str) -> None:
    try:
        code = daemon.process.wait(timeout=WAIT)
    finally:
        daemon.stop(signal.SIGKILL)  # closes its log pipe too
    assert code == -signal.SIGKILL, daemon.log()[-3000:]
    assert f"crash point '{point}' reached" in daemon.log()


def unchanged(dom: TinyDomain, host1: Hypervisor, before: tuple[Path, Path]) -> None:
    assert same_image(dom.vda, before[0]) and same_image(dom.vdb, before[1])
    assert host1.state(dom) == "shutoff" and host1.disk_sources(dom) == {"vda": dom.vda, "vdb": dom.vdb}


# ---- in-place restores ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["restore-fetch", "restore-fetched"])
def test_kill_9_before_the_swap_leaves_the_vm_as_it_was(env: Env, point: str, tiny_domain: Callable[..., TinyDomain],
                                                       hypervisors: Callable[[str], Hypervisor],
                                                       tmp_path: Path) -> None:
    host1, state = hypervisors("host1"), tmp_path / "state"
    api = Api(start_daemon(state, env.config(), extra_env={"VMSCHED_CRASH_AT": point}), {})
    try:
        ids = register(api, env, tmp_path / "images")
        dom, vm_id, image_id, backed = backed_up(api, ids, tiny_domain, host1, tmp_path)
        overwrite(dom, 0x77)
        before = copies(dom, tmp_path, "before-restore")
        if point == "restore-fetch":
            through(api, ids.rsync_ds, env.slow.port)  # the copy still runs when the daemon dies
        api.call("one.vm.restore", vm_id, image_id, -1, -1)
        wait_killed(api.daemon, point)
    finally:
        api.daemon.stop(signal.SIGKILL)  # closes its log pipe too

    # what the dead daemon left: its temporary files beside the disks, which are untouched
    if point == "restore-fetch":  # vda's copy runs on, into its temporary file
        assert processes(env, dom.directory), f"the crash left no copy running: {parts(dom.directory)}"
        [temp] = appeared(dom.directory, parts)
        run_id = PART.search(temp).group(2)  # type: ignore[union-attr]
        assert temp == f"vda.qcow2.vmsched-new-{run_id}.part.vmsched-fetch-{run_id}.part", temp
    else:  # both disks fetched and verified, neither swapped
        left = parts(dom.directory)
        run_id = PART.search(left[0]).group(2)  # type: ignore[union-attr]
        assert left == [f"vda.qcow2.vmsched-new-{run_id}.part", f"vdb.raw.vmsched-new-{run_id}.part"], left
        assert same_image(dom.directory / left[0], backed[0])
    unchanged(dom, host1, before)

    api.daemon = start_daemon(state, env.config())  # listens only once start-up recovery is done
    try:
        assert processes(env, dom.directory) == set(), ps_naming(env, dom.directory)
        assert parts(dom.directory) == []
        untouched(dom, host1)  # own files, own formats, nothing else in the directory
        unchanged(dom, host1, before)
        assert states(api, vm_id) == POWEROFF
        status = dict(api.call("vmsched.vm.restorestatus", vm_id))  # type: ignore[call-overload]
        assert status["STATE"] == "interrupted", status
        if point == "restore-fetch":
            assert "killed process group" in api.daemon.log(), api.daemon.log()[-3000:]

        through(api, ids.rsync_ds, env.realenv.backup.ssh_port)
        api.call("one.vm.restore", vm_id, image_id, -1, -1)  # a new restore works
        status = wait_status(api, "vmsched.vm.restorestatus", vm_id, after=status["ID"])
        assert status["STATE"] == "done", status
        assert same_image(dom.vda, backed[0]) and same_image(dom.vdb, backed[1])
        untouched(dom, host1)
        assert states(api, vm_id) == POWEROFF
    finally:
        stop(api.daemon)


def test_kill_9_after_the_first_swap_finishes_the_restore(env: Env, tiny_domain: Callable[..., TinyDomain],
                                                          hypervisors: Callable[[str], Hypervisor],
                                                          tmp_path: Path) -> None:
    host1, state, point = hypervisors("host1"), tmp_path / "state", "restore-swap"
    api = Api(start_daemon(state, env.config(), extra_env={"VMSCHED_CRASH_AT": point}), {})
    try:
        ids = register(api, env, tmp_path / "images")
        dom, vm_id, image_id, backed = backed_up(api, ids, tiny_domain, host1, tmp_path)
        overwrite(dom, 0x78)
        before = copies(dom, tmp_path, "before-restore")
        api.call("one.vm.restore", vm_id, image_id, -1, -1)
        wait_killed(api.daemon, point)
    finally:
        api.daemon.stop(signal.SIGKILL)  # closes its log pipe too

    # vda swapped in (its old file aside), vdb's new file still waiting
    left = parts(dom.directory)
    run_id = PART.search(left[0]).group(2)  # type: ignore[union-attr]
    assert left == [f"vda.qcow2.vmsched-old-{run_id}.part", f"vdb.raw.vmsched-new-{run_id}.part"], left
    assert same_image(dom.vda, backed[0]) and same_image(dom.vdb, before[1])
    assert same_image(dom.directory / left[0], before[0])

    api.daemon = start_daemon(state, env.config())
    try:
        assert same_image(dom.vda, backed[0]) and same_image(dom.vdb, backed[1])  # both disks restored
        assert parts(dom.directory) == []
        untouched(dom, host1)  # the domain still names its own files (domblklist), formats kept
        assert states(api, vm_id) == POWEROFF and host1.state(dom) == "shutoff"
        assert f"VM {vm_id}: interrupted restore finished" in api.daemon.log()
        status = dict(api.call("vmsched.vm.restorestatus", vm_id))  # type: ignore[call-overload]
        assert "the swap was finished at start-up, the VM is restored" in status["MESSAGE"], status
        host1.start(dom)  # QEMU opens both restored files
        assert host1.state(dom) == "running"
        host1.destroy(dom)
    finally:
        stop(api.daemon)


# ---- restores to new images -------------------------------------------------------------------------------------


def template_ids(api: Api) -> list[int]:
    pool = etree.fromstring(str(api.call("one.templatepool.info", -2, -1, -1)).encode())
    return [int(i.text or "") for i in pool.iterfind("VMTEMPLATE/ID")]


def image_ids(api: Api) -> list[int]:
    pool = etree.fromstring(str(api.call("one.imagepool.info", -2, -1, -1)).encode())
    return [int(i.text or "") for i in pool.iterfind("IMAGE/ID")]


def datastore_images(api: Api, ds_id: int) -> list[str]:
    ds = etree.fromstring(str(api.call("one.datastore.info", ds_id)).encode())
    return [i.text or "" for i in ds.iterfind("IMAGES/ID")]


@pytest.mark.parametrize("point", ["image-restore-fetch", "image-restore-fetched"])
def test_kill_9_during_a_restore_to_new_images_leaves_no_image(env: Env, point: str,
                                                               tiny_domain: Callable[..., TinyDomain],
                                                               hypervisors: Callable[[str], Hypervisor],
                                                               tmp_path: Path) -> None:
    host1, state, images = hypervisors("host1"), tmp_path / "state", tmp_path / "images"
    api = Api(start_daemon(state, env.config(), extra_env={"VMSCHED_CRASH_AT": point}), {})
    try:
        ids = register(api, env, images)
        _, _, backup, _ = backed_up(api, ids, tiny_domain, host1, tmp_path)
        before_images, before_templates = image_ids(api), template_ids(api)
        if point == "image-restore-fetch":
            through(api, ids.rsync_ds, env.slow.port)
        with pytest.raises((OSError, xmlrpc.client.ProtocolError)):  # the daemon dies under the call
            api.call("one.image.restore", backup, ids.image_ds, 'NAME = "crashdrill"')
        wait_killed(api.daemon, point)
    finally:
        api.daemon.stop(signal.SIGKILL)  # closes its log pipe too

    # what the dead daemon left in the image datastore's directory on host1
    if point == "image-restore-fetch":  # the first image's copy runs on, into its temporary file
        assert processes(env, images), f"the crash left no copy running: {entries(images)}"
        [temp] = appeared(images, entries)
        assert re.fullmatch(r"(\d+)\.qcow2\.vmsched-fetch-\1\.part", temp), temp
    else:  # both copies complete, under their final names
        left = entries(images)
        assert len(left) == 2 and all(name.endswith(".qcow2") for name in left), left

    api.daemon = start_daemon(state, env.config())
    try:
        assert image_ids(api) == before_images  # no image of the restore, LOCKED or not
        assert datastore_images(api, ids.image_ds) == []
        assert template_ids(api) == before_templates
        assert entries(images) == []
        assert processes(env, images) == set(), ps_naming(env, images)
        assert api.daemon.log().count("of a restore interrupted by the daemon's death was removed") == 2
    finally:
        stop(api.daemon)


# ---- the backup server lost mid-copy ----------------------------------------------------------------------------


def wait_copying(directory: Path) -> Path:
    """The temporary file of the first disk's copy once it has grown (the copy runs: it is not about to)."""
    deadline = time.monotonic() + WAIT
    while True:
        for path in directory.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if ".vmsched-fetch-" in path.name and path.stat().st_size > 0:
                    return path
        assert time.monotonic() < deadline, f"no copy started: {sorted(p.name for p in directory.iterdir())}"
        time.sleep(0.02)


def test_backup_server_lost_mid_copy(env: Env, tiny_domain: Callable[..., TinyDomain],
                                     hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    host1 = hypervisors("host1")
    forwarder = env.trust(Forwarder(env.realenv.backup.ssh_port, rate=RATE))
    api = Api(start_daemon(tmp_path / "state", env.config()), {})
    try:
        ids = register(api, env, tmp_path / "images")
        dom, vm_id, image_id, _ = backed_up(api, ids, tiny_domain, host1, tmp_path)
        overwrite(dom, 0x79)
        before = copies(dom, tmp_path, "before-restore")
        through(api, ids.rsync_ds, forwarder.port)
        api.call("one.vm.restore", vm_id, image_id, -1, -1)
        partial = wait_copying(dom.directory)
        assert processes(env, dom.directory)  # the copy is running
        forwarder.stop()  # the backup server is gone: every connection reset, no new one accepted
        status = wait_status(api, "vmsched.vm.restorestatus", vm_id)
        assert status["STATE"] == "failed", status
        message = status["MESSAGE"]
        # the copy's command failed with ssh's own status and its words for the lost connection
        assert "exited with status 255: " in message, message
        assert any(words in message for words in LOST), message
        assert not partial.exists()
        assert parts(dom.directory) == []
        assert processes(env, dom.directory) == set(), ps_naming(env, dom.directory)
        untouched(dom, host1)
        unchanged(dom, host1, before)
        assert states(api, vm_id) == POWEROFF
    finally:
        forwarder.stop()
        stop(api.daemon)
