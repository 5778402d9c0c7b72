"""Full backups end to end against the real environment: a daemon, TCG domains on host1, an ``fs``
datastore on this machine and an ``rsync`` datastore on the backup server.

Expected contents come from outside the code under test: a copy of the disk taken with ``qemu-img convert``
before the backup is compared (``qemu-img compare``) with the backed-up file, and checksums are computed
here with hashlib.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import subprocess
import sys
import time
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import REPO
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.realenv.procs import run
from tests.test_import_real import Api, real_daemon

pytestmark = pytest.mark.realenv
CLI_WAIT = 60  # seconds: a tiny domain's backup through the CLI
NAME_RE = re.compile(r"\d+ \d\d-[A-Z][a-z]{2} \d\d\.\d\d\.\d\d\Z")
RUNNING, POWEROFF = ("3", "3"), ("8", "0")


class Setup:
    def __init__(self, api: Api, realenv: RealEnv, fs_base: Path, rsync_base: Path, staging: str) -> None:
        self.api, self.realenv, self.staging = api, realenv, staging
        self.fs_base, self.rsync_base = fs_base, rsync_base
        self.fs_ds = self.datastore(f'NAME = "fsbk"\nTYPE = "BACKUP_DS"\nDS_MAD = "fs"\nBASE_PATH = "{fs_base}"')
        backup = realenv.backup
        self.rsync_ds = self.datastore(
            f'NAME = "rsyncbk"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"\nBASE_PATH = "{rsync_base}"\n'
            f'RSYNC_HOST = "{backup.address}"\nRSYNC_USER = "{backup.user}"\nRSYNC_PORT = "{backup.ssh_port}"')
        self.image_ds = self.datastore('NAME = "imgs"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"')

    def datastore(self, text: str) -> int:
        return int(self.api.call("one.datastore.allocate", text, -1))  # type: ignore[call-overload]

    def image(self, image_id: int) -> etree._Element:
        return etree.fromstring(str(self.api.call("one.image.info", image_id)).encode())

    def image_ids(self) -> list[int]:
        pool = etree.fromstring(str(self.api.call("one.imagepool.info", -2, -1, -1)).encode())
        return [int(i.text or "") for i in pool.iterfind("IMAGE/ID")]

    def backup_dir(self, ds_id: int, vm_id: int, source: str) -> Path:
        return (self.fs_base if ds_id == self.fs_ds else self.rsync_base) / str(vm_id) / source

    def on_host1(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.realenv.ssh_argv("host1", argv), capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def setup(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    marker = f"vmsched-bktest-{secrets.token_hex(6)}"
    staging = f"/var/tmp/{marker}"
    rsync_base = realenv.backup.data_dir / marker
    state = tmp_path_factory.mktemp("daemon") / "state"
    state.mkdir(parents=True)
    (state / "sched.conf").write_text(
        f'LISTEN = [ ADDRESS = "127.0.0.1", PORT = "0" ]\nBACKUP_BASE_PATH = "{staging}"\n'
        f'SSH = [ KNOWN_HOSTS = "{realenv.ssh.known_hosts}", KEY = "{realenv.ssh.client_key}" ]\n')
    fs_base = tmp_path_factory.mktemp("fsds")
    for api in real_daemon(realenv, state):
        yield Setup(api, realenv, fs_base, rsync_base, staging)
    subprocess.run(realenv.ssh_argv("backup", ["rm", "-rf", "--", str(rsync_base)]), timeout=30, check=False)


def states(api: Api, vm_id: int) -> tuple[str, str]:
    vm = api.vm(vm_id)
    return vm.findtext("STATE") or "", vm.findtext("LCM_STATE") or ""


def backup_ids(api: Api, vm_id: int) -> list[int]:
    return [int(i.text or "") for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_image(first: Path, second: Path) -> bool:
    compared = subprocess.run(["qemu-img", "compare", "-U", str(first), str(second)], capture_output=True,
                              text=True, timeout=60)
    assert compared.returncode in (0, 1), compared.stderr
    return compared.returncode == 0


def snapshot_copy(source: Path, target: Path, fmt: str) -> Path:
    run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "qcow2", str(source), str(target)])
    return target


def check_image(s: Setup, vm_id: int, ds_id: int, image_id: int) -> Path:
    """The image's attributes (spec §7.2) and its files; the backup's directory."""
    image = s.image(image_id)
    source = image.findtext("SOURCE") or ""
    assert (image.findtext("TYPE"), image.findtext("FORMAT"), image.findtext("STATE")) == ("6", "raw", "1")
    assert NAME_RE.match(image.findtext("NAME") or ""), image.findtext("NAME")
    assert image.findtext("NAME", "").startswith(f"{vm_id} ")
    assert (image.findtext("DATASTORE_ID"), image.findtext("UID")) == (str(ds_id), s.api.vm(vm_id).findtext("UID"))
    assert [i.text for i in image.iterfind("VMS/ID")] == [str(vm_id)]
    assert [i.text for i in image.iterfind("BACKUP_DISK_IDS/ID")] == ["0", "1"]  # vda, vdb
    assert int(image.findtext("SIZE") or "0") > 0
    directory = s.backup_dir(ds_id, vm_id, source)
    assert sorted(p.name for p in directory.iterdir()) == ["disk.0.0", "disk.1.0", "domain.xml", "vm.xml"]
    sums = {c.findtext("FILE"): c.findtext("SHA256") for c in image.iterfind("TEMPLATE/CHECKSUMS")}
    assert sums == {p.name: sha256(p) for p in directory.iterdir()}
    assert etree.fromstring((directory / "vm.xml").read_bytes()).findtext("ID") == str(vm_id)
    ds = etree.fromstring(str(s.api.call("one.datastore.info", ds_id)).encode())
    assert str(image_id) in [i.text for i in ds.iterfind("IMAGES/ID")]
    assert image_id in backup_ids(s.api, vm_id)
    return directory


def no_leftovers(s: Setup, hypervisor: Hypervisor, dom: TinyDomain, vm_id: int) -> None:
    assert hypervisor.disk_sources(dom) == {"vda": dom.vda, "vdb": dom.vdb}
    assert not list(dom.directory.glob("*vmsched*"))
    assert s.on_host1(["test", "-e", f"{s.staging}/{vm_id}"]).returncode == 1


@pytest.mark.parametrize("which", ["fs", "rsync"])
def test_scheduled_live_backup(setup: Setup, which: str, tiny_domain: Callable[..., TinyDomain],
                               hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    s, host1 = setup, hypervisors("host1")
    ds_id = s.fs_ds if which == "fs" else s.rsync_ds
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    host1.write_pattern(dom, "vda", pattern=0x11, offset="4M", length="1M")
    before = snapshot_copy(dom.vda, tmp_path / "before.qcow2", "qcow2")
    ok, message = s.api.run_action(vm_id, "backup", f"{ds_id},0")
    assert ok, message
    [image_id] = backup_ids(s.api, vm_id)
    directory = check_image(s, vm_id, ds_id, image_id)
    assert same_image(directory / "disk.0.0", before)
    assert same_image(directory / "disk.1.0", dom.vdb)
    assert states(s.api, vm_id) == RUNNING and host1.state(dom) == "running"
    no_leftovers(s, host1, dom, vm_id)
    host1.write_pattern(dom, "vda", pattern=0x22, offset="6M", length="1M")  # the VM writes its own disk
    assert not same_image(dom.vda, before) and same_image(directory / "disk.0.0", before)


def test_keep_last_removes_the_oldest_backup(setup: Setup, tiny_domain: Callable[..., TinyDomain]) -> None:
    s = setup
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    s.api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ KEEP_LAST = "1" ]', 1)
    assert s.api.run_action(vm_id, "backup", f"{s.fs_ds},0")[0]
    [first] = backup_ids(s.api, vm_id)
    first_dir = s.backup_dir(s.fs_ds, vm_id, s.image(first).findtext("SOURCE") or "")
    assert first_dir.is_dir()
    ok, message = s.api.run_action(vm_id, "backup", f"{s.fs_ds},0")
    assert ok, message
    deadline = time.monotonic() + 30  # KEEP_LAST is its own step, after the backup is recorded (DONE)
    while len(backup_ids(s.api, vm_id)) > 1:
        assert time.monotonic() < deadline, s.api.daemon.log()[-3000:]
        time.sleep(0.05)
    [second] = backup_ids(s.api, vm_id)
    assert second != first and not first_dir.exists()
    assert first not in s.image_ids() and second in s.image_ids()
    check_image(s, vm_id, s.fs_ds, second)


def test_refused_requests_create_nothing(setup: Setup, tiny_domain: Callable[..., TinyDomain]) -> None:
    s = setup
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    images = s.image_ids()
    assert "Datastore needs to be of type BACKUP" in s.api.failure("one.vm.backup", vm_id, s.image_ds, False)
    unbound = int(s.api.call("one.vm.allocate", 'NAME = "nohost"\nDISK = [ SOURCE = "/x.qcow2", TARGET = "vda" ]'))  # type: ignore[call-overload]
    assert "not bound to a host" in s.api.failure("one.vm.backup", unbound, s.fs_ds, False)
    s.api.call("one.user.allocate", "bkuser", "bkpass", "core", [])
    with xmlrpc.client.ServerProxy(s.api.daemon.endpoint) as proxy:
        ok, message, *_ = proxy.one.vm.backup("bkuser:bkpass", vm_id, s.fs_ds, False)
    assert not ok and "Not authorized" in message
    assert s.image_ids() == images and backup_ids(s.api, vm_id) == []
    assert states(s.api, vm_id) == RUNNING


def test_powered_off_vm_through_the_cli(setup: Setup, tiny_domain: Callable[..., TinyDomain],
                                        hypervisors: Callable[[str], Hypervisor]) -> None:
    s, host1 = setup, hypervisors("host1")
    dom = tiny_domain("host1", start=False)
    vm_id = s.api.import_one("host1", dom.name)
    assert states(s.api, vm_id) == POWEROFF
    cli = subprocess.run([sys.executable, "-m", "scheduler", "vm", "backup", str(vm_id), "-d", "rsyncbk", "--wait"],
                         env=s.api.daemon.env, cwd=REPO, capture_output=True, text=True, timeout=CLI_WAIT)
    assert cli.returncode == 0, cli.stdout + cli.stderr + s.api.daemon.log()[-3000:]
    assert "done" in cli.stdout and "cold backup" in cli.stdout
    [image_id] = backup_ids(s.api, vm_id)
    directory = check_image(s, vm_id, s.rsync_ds, image_id)
    assert same_image(directory / "disk.0.0", dom.vda) and same_image(directory / "disk.1.0", dom.vdb)
    assert states(s.api, vm_id) == POWEROFF and host1.state(dom) == "shutoff"
    no_leftovers(s, host1, dom, vm_id)


def test_deleting_a_backup_image_removes_its_files(setup: Setup, tiny_domain: Callable[..., TinyDomain]) -> None:
    s = setup
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    assert s.api.run_action(vm_id, "backup", f"{s.fs_ds},0")[0]
    [image_id] = backup_ids(s.api, vm_id)
    directory = s.backup_dir(s.fs_ds, vm_id, s.image(image_id).findtext("SOURCE") or "")
    assert directory.is_dir()
    s.api.call("one.image.delete", image_id, False)
    assert not directory.exists()
    assert image_id not in s.image_ids() and backup_ids(s.api, vm_id) == []
    assert "Error getting" in s.api.failure("one.image.info", image_id)


def test_backup_cancel_during_the_upload_leaves_nothing(setup: Setup, tiny_domain: Callable[..., TinyDomain],
                                                         hypervisors: Callable[[str], Hypervisor]) -> None:
    s, host1 = setup, hypervisors("host1")
    backup = s.realenv.backup
    slow = s.datastore(
        f'NAME = "slowbk"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"\nBASE_PATH = "{s.rsync_base}"\n'
        f'RSYNC_HOST = "{backup.address}"\nRSYNC_USER = "{backup.user}"\nRSYNC_PORT = "{backup.ssh_port}"\n'
        'RSYNC_ARGS = "-aS --bwlimit=64"')  # KiB/s, the upload only: a few MiB take long enough to be cancelled
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    host1.write_pattern(dom, "vda", pattern=0x33, offset="4M", length="3M")
    assert "no backup in progress" in s.api.failure("one.vm.backupcancel", vm_id)
    s.api.call("one.vm.backup", vm_id, slow, False)
    vm_dir = s.rsync_base / str(vm_id)
    deadline = time.monotonic() + 60
    while not (vm_dir.is_dir() and any(p.name.startswith(".tmp-") for p in vm_dir.iterdir())):
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.05)
    assert states(s.api, vm_id) == ("3", "69")  # ACTIVE/BACKUP while it uploads
    cli = subprocess.run([sys.executable, "-m", "scheduler", "vm", "backup-cancel", str(vm_id)],
                         env=s.api.daemon.env, cwd=REPO, capture_output=True, text=True, timeout=CLI_WAIT)
    assert cli.returncode == 0, cli.stderr
    deadline = time.monotonic() + 60
    while s.api.call("vmsched.vm.backupstatus", vm_id)["STATE"] != "cancelled":  # type: ignore[index]
        assert time.monotonic() < deadline, s.api.daemon.log()[-3000:]
        time.sleep(0.05)
    assert states(s.api, vm_id) == RUNNING
    assert backup_ids(s.api, vm_id) == [] and not any(vm_dir.iterdir())  # no image, no partial upload
    assert sorted(p.name for p in dom.directory.iterdir() if "overlay" in p.name) == []
    xml = host1.lookup(dom).XMLDesc()
    assert str(dom.vda) in xml and ".overlay" not in xml  # the guest runs on its own disk
    assert "no backup in progress" in s.api.failure("one.vm.backupcancel", vm_id)


def test_progress_of_a_running_backup_in_the_api_metrics_and_vm_show(
        setup: Setup, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor]) -> None:
    s, host1 = setup, hypervisors("host1")
    backup = s.realenv.backup
    slow = s.datastore(
        f'NAME = "progressbk"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"\nBASE_PATH = "{s.rsync_base}"\n'
        f'RSYNC_HOST = "{backup.address}"\nRSYNC_USER = "{backup.user}"\nRSYNC_PORT = "{backup.ssh_port}"\n'
        'RSYNC_BWLIMIT = "1024"')  # KiB/s, the convert's rate too: several seconds for each phase
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    host1.write_pattern(dom, "vda", pattern=0x44, offset="4M", length="5M")
    assert s.api.call("vmsched.vm.backupprogress", vm_id) == {}  # nothing runs
    s.api.call("one.vm.backup", vm_id, slow, False)
    seen: list[dict] = []
    shown = metrics = ""
    deadline = time.monotonic() + 120
    while s.api.call("vmsched.vm.backupstatus", vm_id)["STATE"] in ("queued", "running"):  # type: ignore[index]
        assert time.monotonic() < deadline, s.api.daemon.log()[-3000:]
        progress = dict(s.api.call("vmsched.vm.backupprogress", vm_id))  # type: ignore[call-overload]
        if progress:
            seen.append(progress)
            if progress["PHASE"] == "upload" and 0 < progress["DONE"] < progress["TOTAL"] and not shown:
                shown = subprocess.run([sys.executable, "-m", "scheduler", "vm", "show", str(vm_id)],
                                       env=s.api.daemon.env, cwd=REPO, capture_output=True, text=True,
                                       timeout=CLI_WAIT).stdout
                with urllib.request.urlopen(s.api.daemon.endpoint.replace("/RPC2", "/metrics"), timeout=10) as page:
                    metrics = page.read().decode()
        time.sleep(0.2)
    assert s.api.call("vmsched.vm.backupstatus", vm_id)["STATE"] == "done"  # type: ignore[index]
    assert s.api.call("vmsched.vm.backupprogress", vm_id) == {}  # gone with the run
    phases = [p["PHASE"] for p in seen]
    assert "capture" in phases and "upload" in phases
    assert phases.index("capture") < phases.index("upload")
    for p in seen:
        assert 0 <= p["DONE"] <= p["TOTAL"]
        if p["PHASE"] in ("capture", "upload"):
            assert [d["DISK_ID"] for d in p["DISKS"]] == [0, 1]
            assert sum(d["DONE"] for d in p["DISKS"]) <= p["DONE"]  # the upload's total adds vm.xml, domain.xml
    uploads = [p for p in seen if p["PHASE"] == "upload"]
    assert any(0 < p["DONE"] < p["TOTAL"] for p in uploads)  # reported while it moved
    assert uploads[-1]["TOTAL"] > 5 * 1024 * 1024  # the 64 MiB disk's staged qcow2 holds the 5 MiB written
    captures = [p for p in seen if p["PHASE"] == "capture"]
    assert max(p["TOTAL"] for p in captures) > 5 * 1024 * 1024
    assert "BACKUP PROGRESS" in shown and "upload" in shown, shown
    assert f'vmsched_backup_done_bytes{{vm="{vm_id}"' in metrics and 'phase="upload",disk="all"' in metrics
