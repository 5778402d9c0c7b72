"""restic datastores through the daemon: a scheduled live backup lands in the VM's repository on the backup
server (over SFTP from the hypervisor, the server's verified key installed there), KEEP_LAST forgets the
oldest snapshot, and the password appears in no reply, log or process list.

Contents are checked with the test's own restic run on the backup server against a copy of the disk taken
with ``qemu-img convert`` before the backup.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import REPO, start_daemon
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.test_backup_crash_real import Env, images_of, processes, register, stop, wait_done
from tests.test_backup_real import same_image, snapshot_copy
from tests.test_import_real import Api, real_daemon, staged_state

pytestmark = pytest.mark.realenv
PASSWORD = f"pw-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def restic_env(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, int, Path]]:
    marker = f"vmsched-restictest-{secrets.token_hex(5)}"
    base = realenv.backup.data_dir / marker
    state = staged_state(realenv, tmp_path_factory, f"/var/tmp/{marker}")
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
    done = subprocess.run(realenv.ssh_argv("backup", ["sh", "-c", script, "sh", str(repo), *args]),
                          input=PASSWORD.encode(), capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, f"restic {' '.join(args)}: {done.stderr.decode()}"
    return done.stdout


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
    assert "vmsched-flat" in snapshot["tags"]  # backed up from inside the staging dir: the files are at /<name>
    assert any(p.endswith("/disk.0.0") for p in snapshot["paths"])
    (tmp_path / "restored.qcow2").write_bytes(restic_on_server(realenv, repo, "dump", snapshot["id"], "/disk.0.0"))
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
                             'RESTIC_BWLIMIT = "512"\nRESTIC_COMPRESSION = "off"', -1))
        # 512 KiB/s of the 4 MiB written, uncompressed (a pattern compresses to nothing): restic still runs when
        # the daemon dies
        vm_id = api.import_one("host1", dom.name)
        api.call("one.vm.backup", vm_id, ds_id, False)
        assert first.process.wait(timeout=60) == -signal.SIGKILL, first.log()[-3000:]
    finally:
        first.stop(signal.SIGKILL)  # closes its log pipe too
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


def test_download_and_verify_a_restic_backup(restic_env: tuple[Api, int, Path], realenv: RealEnv,
                                             tiny_domain: Callable[..., TinyDomain],
                                             hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    """``restic dump`` on the SFTP server, streamed through the daemon by URL; verify reads the snapshot
    back on the server; damaged pack files fail the verification, recorded."""
    api, ds_id, base = restic_env
    dom = tiny_domain("host1")
    hypervisors("host1").write_pattern(dom, "vda", pattern=0x3C, offset="1M", length="2M")
    vm_id = api.import_one("host1", dom.name)
    before = snapshot_copy(dom.vda, tmp_path / "before.qcow2", "qcow2")
    ok, message = api.run_action(vm_id, "backup", f"{ds_id},0")
    assert ok, message
    [backup] = [int(i.text or "") for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    image = etree.fromstring(str(api.call("one.image.info", backup)).encode())
    url = next(v.findtext("URL") or "" for v in image.iterfind("TEMPLATE/BACKUP_URL") if v.findtext("DISK_ID") == "0")
    recorded = next(v.findtext("SHA256") for v in image.iterfind("TEMPLATE/CHECKSUMS") if v.findtext("FILE") == "disk.0.0")
    assert url.startswith(f"restic://{ds_id}/")

    target = tmp_path / "download.qcow2"
    cli = subprocess.run([sys.executable, "-m", "scheduler", "image", "download", url, "-o", str(target)],
                         env=api.daemon.env, cwd=REPO, capture_output=True, timeout=120)
    assert cli.returncode == 0, cli.stderr.decode() + api.daemon.log()[-2000:]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == recorded
    assert same_image(target, before)

    result = api.call("vmsched.image.verify", backup, -1)
    assert isinstance(result, dict) and result["OK"] is True, result
    assert {f["FILE"]: (f["SHA256_OK"], f["CHECK"]) for f in result["FILES"]} == {
        "disk.0.0": (True, "ok"), "disk.1.0": (True, "ok"), "domain.xml": (True, "-"), "vm.xml": (True, "-")}
    leftovers = subprocess.run(realenv.ssh_argv("backup", ["sh", "-c", 'ls -d "$1"/*.vmsched-verify-* 2>/dev/null; '
                                                           'grep -l -F -e "$2" /tmp/vmsched-restic-* 2>/dev/null; true',
                                                           "sh", str(base), PASSWORD]),
                               capture_output=True, timeout=30, check=True).stdout
    assert leftovers == b""  # the temporary copy and this datastore's password files are gone

    packs = subprocess.run(realenv.ssh_argv("backup", ["find", str(base / str(vm_id) / "data"), "-type", "f"]),
                           capture_output=True, timeout=30, check=True).stdout.split()
    damage = 'for p; do printf garbage | dd of="$p" bs=1 seek=64 conv=notrunc status=none; done'
    subprocess.run(realenv.ssh_argv("backup", ["sh", "-c", damage, "sh", *map(bytes.decode, packs)]), timeout=30,
                   check=True)  # (a pack file gone makes restic retry for minutes: damaged ones fail at once)
    broken = api.call("vmsched.image.verify", backup, -1)
    assert isinstance(broken, dict) and broken["OK"] is False
    assert "verification failed" in broken["MESSAGE"] and PASSWORD not in broken["MESSAGE"]
    image = etree.fromstring(str(api.call("one.image.info", backup)).encode())
    assert image.findtext("TEMPLATE/VERIFIED") == "NO"


def test_cancel_during_a_restic_upload(restic_env: tuple[Api, int, Path], realenv: RealEnv,
                                       tiny_domain: Callable[..., TinyDomain],
                                       hypervisors: Callable[[str], Hypervisor]) -> None:
    """Progress comes from restic's status lines while it uploads (restic 0.14 counts a file's bytes once
    its packs are stored, so the total shows first); a cancel then stops restic on the hypervisor, records
    nothing, and leaves a repository that passes ``restic check``."""
    api, _, base = restic_env
    slow = base.parent / f"{base.name}-slow"
    backup = realenv.backup
    ds_id = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                         f'NAME = "resticcancel"\nTYPE = "BACKUP_DS"\nDS_MAD = "restic"\nBASE_PATH = "{slow}"\n'
                         f'RESTIC_SFTP_SERVER = "{backup.address}"\nRESTIC_SFTP_USER = "{backup.user}"\n'
                         f'RESTIC_SFTP_PORT = "{backup.ssh_port}"\nRESTIC_PASSWORD = "{PASSWORD}"\n'
                         'RESTIC_COMPRESSION = "off"\nRESTIC_BWLIMIT = "256"', -1))  # KiB/s: 4 MiB take 16 s
    dom, host1 = tiny_domain("host1"), hypervisors("host1")
    noise = dom.vda.parent / "noise.bin"
    noise.write_bytes(os.urandom(4 << 20))  # nothing restic could deduplicate or compress
    host1.qemu_io(dom, "vda", f"write -s {noise} 4M 4M")
    host1.qemu_io(dom, "vda", "flush")
    vm_id = api.import_one("host1", dom.name)
    repo = slow / str(vm_id)
    try:
        api.call("one.vm.backup", vm_id, ds_id, False)
        deadline, seen = time.monotonic() + 60, []
        while True:  # no event reaches the test: the daemon's progress is polled
            progress = dict(api.call("vmsched.vm.backupprogress", vm_id))  # type: ignore[call-overload]
            seen.append((progress.get("PHASE"), progress.get("DONE"), progress.get("TOTAL")))
            if progress.get("PHASE") == "upload" and progress["TOTAL"] > 0:  # restic's first status line
                break
            assert time.monotonic() < deadline, seen[-5:]
            time.sleep(0.1)
        running = on_host1(realenv, 'pgrep -f -- "$1" || true', f"[r]estic --repo sftp:.*{repo}")
        assert running, "restic was not running on host1 during the upload"
        api.call("one.vm.backupcancel", vm_id)
        status = wait_done(api, vm_id)
        assert (status["STATE"], status["MESSAGE"]) == ("cancelled", "cancelled"), status
        assert on_host1(realenv, 'pgrep -f -- "$1" || true', f"[r]estic --repo sftp:.*{repo}") == ""
        assert on_host1(realenv, 'grep -l -F -e "$1" /tmp/vmsched-restic-* 2>/dev/null || true', PASSWORD) == ""
        assert images_of(api, vm_id) == []
        restic_on_server(realenv, repo, "check")  # raises unless the repository is sound
        assert json.loads(restic_on_server(realenv, repo, "snapshots", "--json")) in ([], None)
    finally:
        subprocess.run(realenv.ssh_argv("backup", ["rm", "-rf", "--", str(slow)]), timeout=30, check=False)


def on_host1(realenv: RealEnv, script: str, *args: str) -> str:
    return subprocess.run(realenv.ssh_argv("host1", ["sh", "-c", script, "sh", *args]), capture_output=True,
                          timeout=30, check=True).stdout.decode().strip()
