"""restic datastores through the daemon: a scheduled live backup lands in the VM's repository on the backup
server (over SFTP from the hypervisor, the server's verified key installed there), KEEP_LAST forgets the
oldest snapshot, and the password appears in no reply, log or process list.

Contents are checked with the test's own restic run on the backup server against a copy of the disk taken
with ``qemu-img convert`` before the backup.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import start_daemon
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.test_backup_crash_real import Env, images_of, processes, register, stop, wait_done
from tests.test_backup_real import same_image, snapshot_copy
from tests.test_import_real import Api, real_daemon

pytestmark = pytest.mark.realenv
PASSWORD = f"pw-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def restic_env(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, int, Path]]:
    marker = f"vmsched-restictest-{secrets.token_hex(5)}"
    base = realenv.backup.data_dir / marker
    state = tmp_path_factory.mktemp("daemon") / "state"
    state.mkdir(parents=True)
    (state / "sched.conf").write_text(
        f'LISTEN = [ ADDRESS = "127.0.0.1", PORT = "0" ]\nBACKUP_BASE_PATH = "/var/tmp/{marker}"\n'
        f'SSH = [ KNOWN_HOSTS = "{realenv.ssh.known_hosts}", KEY = "{realenv.ssh.client_key}" ]\n')
    backup = realenv.backup
    for api in real_daemon(realenv, state):
        ds_id = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                             f'NAME = "resticbk"\nTYPE = "BACKUP_DS"\nDS_MAD = "restic"\nBASE_PATH = "{base}"\n'
                             f'RESTIC_SFTP_SERVER = "{backup.address}"\nRESTIC_SFTP_USER = "{backup.user}"\n'
                             f'RESTIC_SFTP_PORT = "{backup.ssh_port}"\nRESTIC_PASSWORD = "{PASSWORD}"', -1))
        yield api, ds_id, base
        assert PASSWORD not in api.daemon.log()
    subprocess.run(realenv.ssh_argv("backup", ["rm", "-rf", "--", str(base)]), timeout=30, check=False)


def restic_on_server(realenv: RealEnv, repo: Path, *args: str) -> bytes:
    script = 'f=$(mktemp) && cat > "$f" && r=$1 && shift && restic -q -r "$r" --password-file "$f" "$@"; s=$?; ' \
             'rm -f "$f"; exit $s'
    return subprocess.run(realenv.ssh_argv("backup", ["sh", "-c", script, "sh", str(repo), *args]),
                          input=PASSWORD.encode(), capture_output=True, timeout=60, check=True).stdout


def test_scheduled_backups_into_restic_with_keep_last(restic_env: tuple[Api, int, Path], realenv: RealEnv,
                                                      tiny_domain: Callable[..., TinyDomain],
                                                      hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    api, ds_id, base = restic_env
    host1 = hypervisors("host1")
    dom = tiny_domain("host1")
    vm_id = api.import_one("host1", dom.name)
    api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ KEEP_LAST = "1" ]', 1)
    host1.write_pattern(dom, "vda", pattern=0x61, offset="4M", length="1M")
    before = snapshot_copy(dom.vda, tmp_path / "before.qcow2", "qcow2")

    ok, message = api.run_action(vm_id, "backup", f"{ds_id},0")
    assert ok, message
    [first] = [int(i.text or "") for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    image = etree.fromstring(str(api.call("one.image.info", first)).encode())
    source = image.findtext("SOURCE") or ""
    repo = base / str(vm_id)
    snapshots = json.loads(restic_on_server(realenv, repo, "snapshots", "--json"))
    [snapshot] = snapshots
    assert f"vmsched-backup-{source}" in snapshot["tags"] and f"vmsched-{vm_id}" in snapshot["tags"]
    disk = next(p for p in snapshot["paths"] if p.endswith("/disk.0.0"))
    (tmp_path / "restored.qcow2").write_bytes(restic_on_server(realenv, repo, "dump", snapshot["id"], disk))
    assert same_image(tmp_path / "restored.qcow2", before)
    sums = {c.findtext("FILE"): c.findtext("SHA256") for c in image.iterfind("TEMPLATE/CHECKSUMS")}
    assert set(sums) == {"disk.0.0", "disk.1.0", "vm.xml", "domain.xml"}

    ok, message = api.run_action(vm_id, "backup", f"{ds_id},0")  # KEEP_LAST = 1: the first one goes
    assert ok, message
    deadline = time.monotonic() + 30
    while len(list(api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID"))) > 1:
        assert time.monotonic() < deadline, api.daemon.log()[-3000:]
        time.sleep(0.05)
    [second] = [int(i.text or "") for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    assert second != first
    tags = [tag for snap in json.loads(restic_on_server(realenv, repo, "snapshots", "--json")) for tag in snap["tags"]]
    assert f"vmsched-backup-{source}" not in tags  # forgotten (and pruned)
    datastore = str(api.call("one.datastore.info", ds_id))
    assert PASSWORD not in datastore  # masked, even for the admin unless asked with decrypt
    assert states_running(api, vm_id) and host1.state(dom) == "running"


def states_running(api: Api, vm_id: int) -> bool:
    vm = api.vm(vm_id)
    return (vm.findtext("STATE"), vm.findtext("LCM_STATE")) == ("3", "3")


def test_kill_9_during_a_restic_upload_then_restart(realenv: RealEnv, tiny_domain: Callable[..., TinyDomain],
                                                   hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    """The daemon dies while restic runs on the hypervisor: the restart kills it, removes its password file,
    the repository passes ``restic check`` and the retried backup is its only snapshot."""
    marker = f"vmsched-resticcrash-{secrets.token_hex(5)}"
    env = Env(realenv, realenv.backup.data_dir / marker, f"/var/tmp/{marker}")
    dom = tiny_domain("host1")
    hypervisors("host1").write_pattern(dom, "vda", pattern=0x62, offset="4M", length="4M")
    state = tmp_path / "state"
    first = start_daemon(state, env.config(), extra_env={"VMSCHED_CRASH_AT": "upload"})
    api = Api(first, {})
    backup = realenv.backup
    try:
        register(api, env, env.base / "unused")
        ds_id = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                             f'NAME = "resticslow"\nTYPE = "BACKUP_DS"\nDS_MAD = "restic"\nBASE_PATH = "{env.base}"\n'
                             f'RESTIC_SFTP_SERVER = "{backup.address}"\nRESTIC_SFTP_USER = "{backup.user}"\n'
                             f'RESTIC_SFTP_PORT = "{backup.ssh_port}"\nRESTIC_PASSWORD = "{PASSWORD}"\n'
                             'RESTIC_BWLIMIT = "512"', -1))  # KiB/s: restic still runs when the daemon dies
        vm_id = api.import_one("host1", dom.name)
        api.call("one.vm.backup", vm_id, ds_id, False)
        assert first.process.wait(timeout=60) == -signal.SIGKILL, first.log()[-3000:]
    finally:
        if first.process.poll() is None:
            first.process.kill()
    staging = f"{env.staging}/{vm_id}"
    left = processes(env, staging)
    assert left, "restic was not running when the daemon died"
    # What a SIGKILLed restic wrapper leaves (whether this crash left one depends on how far its shell got):
    password_files = 'ls /tmp/vmsched-restic-vm"$1"-run* 2>/dev/null || true'
    run_id = staging_run(env, staging)
    env.on_host1('umask 077; echo "$2" > "/tmp/vmsched-restic-vm$1-run$3-0123456789abcdef"', str(vm_id), PASSWORD,
                 run_id)
    assert env.on_host1(password_files, str(vm_id)).strip()
    second = start_daemon(state, env.config())
    api.daemon = second
    try:
        assert not left & processes(env, staging)  # killed during recovery, before the daemon listens
        assert env.on_host1(password_files, str(vm_id)).strip() == ""  # its password file is gone too
        status = wait_done(api, vm_id)
        assert status["STATE"] == "done", (status, second.log()[-4000:])
        repo = env.base / str(vm_id)
        restic_on_server(realenv, repo, "check")  # raises unless the repository is sound
        [snapshot] = json.loads(restic_on_server(realenv, repo, "snapshots", "--json"))
        [image_id] = images_of(api, vm_id)
        source = etree.fromstring(str(api.call("one.image.info", image_id)).encode()).findtext("SOURCE")
        assert f"vmsched-backup-{source}" in snapshot["tags"]
        assert PASSWORD not in first.log() + second.log()
    finally:
        stop(second)
        subprocess.run(realenv.ssh_argv("backup", ["rm", "-rf", "--", str(env.base)]), timeout=30, check=False)
        env.on_host1('rm -rf -- "$1"', env.staging)


def staging_run(env: Env, staging: str) -> str:
    """The run id: the name of the run's staging directory under the VM's."""
    [name] = env.on_host1('ls "$1"', staging).split()
    return name


def test_two_vms_back_up_to_the_same_server_at_once(restic_env: tuple[Api, int, Path], realenv: RealEnv,
                                                    tiny_domain: Callable[..., TinyDomain]) -> None:
    api, ds_id, base = restic_env
    vm_ids = [api.import_one("host1", tiny_domain("host1").name), api.import_one("host2", tiny_domain("host2").name)]
    for vm_id in vm_ids:
        api.call("one.vm.backup", vm_id, ds_id, False)
    for vm_id in vm_ids:
        status = wait_done(api, vm_id)
        assert status["STATE"] == "done", (status, api.daemon.log()[-3000:])
        restic_on_server(realenv, base / str(vm_id), "check")
        [snapshot] = json.loads(restic_on_server(realenv, base / str(vm_id), "snapshots", "--json"))
        assert f"vmsched-{vm_id}" in snapshot["tags"]
    runs = [api.call("vmsched.vm.backupstatus", vm_id) for vm_id in vm_ids]
    assert all(r["ATTEMPT"] == 1 for r in runs)  # type: ignore[index]  # no lock made one wait and retry


def test_restore_from_restic_to_new_images_and_in_place(restic_env: tuple[Api, int, Path],
                                                        tiny_domain: Callable[..., TinyDomain],
                                                        hypervisors: Callable[[str], Hypervisor],
                                                        tmp_path: Path) -> None:
    """restic dump straight to where the disk goes, hashed on the way and checked against the backup's sums."""
    api, ds_id, _ = restic_env
    host1 = hypervisors("host1")
    dom = tiny_domain("host1")
    host1.write_pattern(dom, "vda", pattern=0x63, offset="4M", length="1M")
    vm_id = api.import_one("host1", dom.name)
    before = snapshot_copy(dom.vda, tmp_path / "before.qcow2", "qcow2")
    ok, message = api.run_action(vm_id, "backup", f"{ds_id},0")
    assert ok, message
    [backup] = [int(i.text or "") for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]

    images = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                          f'NAME = "restic-imgs"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBASE_PATH = "{tmp_path / "imgs"}"',
                          -1))
    _, image_id = map(int, str(api.call("one.image.restore", backup, images, "DISK_ID = 0")).split())
    restored = etree.fromstring(str(api.call("one.image.info", image_id)).encode())
    assert restored.findtext("PATH", "").startswith(f"restic://{ds_id}//0:")
    assert same_image(Path(restored.findtext("SOURCE") or ""), before)

    host1.write_pattern(dom, "vda", pattern=0x64, offset="4M", length="1M")  # the VM changes its disk
    host1.destroy(dom)
    deadline = time.monotonic() + 30
    while api.vm(vm_id).findtext("STATE") != "8":  # POWEROFF, seen by the daemon
        assert time.monotonic() < deadline
        time.sleep(0.05)
    api.call("one.vm.restore", vm_id, backup, -1, 0)
    while api.call("vmsched.vm.restorestatus", vm_id)["STATE"] != "done":  # type: ignore[index]
        assert time.monotonic() < deadline + 60, api.daemon.log()[-3000:]
        time.sleep(0.1)
    assert same_image(dom.vda, before)  # the backed-up content is back
