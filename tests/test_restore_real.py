"""In-place restore end to end against the real environment (spec §8.4): a daemon, a powered-off TCG domain
on host1 (qcow2 vda, raw vdb), backed up into the ``fs`` and the ``rsync`` datastores, its disks overwritten,
then restored through ``one.vm.restore`` / ``vmsched vm restore``.

What the disks must hold comes from outside the code under test: copies taken with qemu-img before the
overwrite, compared with ``qemu-img compare``; the overwrites are made with ``qemu-io`` on the files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest

from tests.conftest import REPO
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.procs import run
from tests.test_backup_real import POWEROFF, Setup, backup_ids, same_image, setup, snapshot_copy, states

pytestmark = pytest.mark.realenv
__all__ = ["setup"]  # the module's daemon and datastores (a fixture of test_backup_real)
WAIT = 60  # seconds: a tiny domain's backup or restore
RESTORE = ("3", "71")


def overwrite(dom: TinyDomain, pattern: int) -> None:
    """Change both disks of the powered-off domain, as a guest writing to them would."""
    for path, fmt in ((dom.vda, "qcow2"), (dom.vdb, "raw")):
        run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern:#x} 5M 1M", str(path)])


def leave_metadata(host1: Hypervisor, dom: TinyDomain) -> None:
    """A libvirt snapshot and a checkpoint of the domain, as earlier snapshots and incremental backups leave
    them (metadata redefined: it is what a restore must drop)."""
    domain = host1.lookup(dom)
    xml, now = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), int(time.time())
    domain.snapshotCreateXML(f"<domainsnapshot><name>vmsched-snap-0</name><state>shutoff</state><creationTime>{now}"
                             f"</creationTime><memory snapshot='no'/>{xml}</domainsnapshot>",
                             libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
    domain.checkpointCreateXML(f"<domaincheckpoint><name>one-{dom.name}-0</name><creationTime>{now}</creationTime>"
                               "<disks><disk name='vda' checkpoint='bitmap'/><disk name='vdb' checkpoint='no'/>"
                               f"</disks>{xml}</domaincheckpoint>", libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
    assert domain.snapshotListNames() and domain.listAllCheckpoints()


def copies(dom: TinyDomain, directory: Path, tag: str) -> tuple[Path, Path]:
    return (snapshot_copy(dom.vda, directory / f"{tag}-vda.qcow2", "qcow2"),
            snapshot_copy(dom.vdb, directory / f"{tag}-vdb.qcow2", "raw"))


def file_format(path: Path) -> str:
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
    return str(info["format"])


def wait_run(s: Setup, method: str, vm_id: int) -> dict:
    deadline = time.monotonic() + WAIT
    while True:
        status = dict(s.api.call(method, vm_id))  # type: ignore[call-overload]
        if status["STATE"] not in ("queued", "running"):
            return status
        assert time.monotonic() < deadline, s.api.daemon.log()[-3000:]
        time.sleep(0.05)


def backed_up(s: Setup, ds_id: int, dom_factory: Callable[..., TinyDomain], host1: Hypervisor,
              tmp_path: Path) -> tuple[TinyDomain, int, int, tuple[Path, Path]]:
    """A tiny domain with data on both disks, powered off, imported and backed up into ``ds_id``: the domain,
    the VM, the backup image and copies of its disks as backed up."""
    dom = dom_factory("host1")
    host1.write_pattern(dom, "vda", pattern=0x11, offset="4M", length="1M")
    host1.write_pattern(dom, "vdb", pattern=0x22, offset="2M", length="1M")
    host1.destroy(dom)
    vm_id = s.api.import_one("host1", dom.name)
    assert states(s.api, vm_id) == POWEROFF
    s.api.call("one.vm.backup", vm_id, ds_id, False)
    assert wait_run(s, "vmsched.vm.backupstatus", vm_id)["STATE"] == "done"
    [image_id] = backup_ids(s.api, vm_id)
    return dom, vm_id, image_id, copies(dom, tmp_path, "backed-up")


def restore_cli(s: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scheduler", "vm", "restore", *args, "--wait"],
                          env=s.api.daemon.env, cwd=REPO, capture_output=True, text=True, timeout=WAIT)


def untouched(dom: TinyDomain, host1: Hypervisor) -> None:
    """The domain runs on its own files, which kept their formats, and no temporary file is left."""
    assert host1.disk_sources(dom) == {"vda": dom.vda, "vdb": dom.vdb}
    assert (file_format(dom.vda), file_format(dom.vdb)) == ("qcow2", "raw")
    assert sorted(p.name for p in dom.directory.iterdir()) == ["vda.qcow2", "vdb.raw"]


@pytest.mark.parametrize("which", ["fs", "rsync"])
def test_restore_in_place_brings_back_both_disks(setup: Setup, which: str, tiny_domain: Callable[..., TinyDomain],
                                                  hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    s, host1 = setup, hypervisors("host1")
    ds_id = s.fs_ds if which == "fs" else s.rsync_ds
    dom, vm_id, image_id, (vda, vdb) = backed_up(s, ds_id, tiny_domain, host1, tmp_path)
    overwrite(dom, 0x77)
    assert not same_image(dom.vda, vda) and not same_image(dom.vdb, vdb)
    leave_metadata(host1, dom)
    cli = restore_cli(s, str(vm_id), str(image_id))
    assert cli.returncode == 0, cli.stdout + cli.stderr + s.api.daemon.log()[-3000:]
    assert f"restore of VM {vm_id}: done" in cli.stdout and "sha256 verified" in cli.stdout
    assert "snapshots dropped: vmsched-snap-0" in cli.stdout and f"checkpoints dropped: one-{dom.name}-0" in cli.stdout
    assert host1.lookup(dom).snapshotListNames() == [] and host1.lookup(dom).listAllCheckpoints() == []
    assert same_image(dom.vda, vda) and same_image(dom.vdb, vdb)
    untouched(dom, host1)
    assert states(s.api, vm_id) == POWEROFF and host1.state(dom) == "shutoff"
    host1.start(dom)  # QEMU opens the restored files
    assert host1.state(dom) == "running"
    host1.destroy(dom)


def test_disk_id_restores_only_that_disk(setup: Setup, tiny_domain: Callable[..., TinyDomain],
                                         hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    s, host1 = setup, hypervisors("host1")
    dom, vm_id, image_id, (_, vdb) = backed_up(s, s.rsync_ds, tiny_domain, host1, tmp_path)
    overwrite(dom, 0x78)
    vda_now, _ = copies(dom, tmp_path, "overwritten")
    cli = restore_cli(s, str(vm_id), str(image_id), "--disk-id", "1")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert same_image(dom.vdb, vdb) and same_image(dom.vda, vda_now)  # vda kept what it had
    untouched(dom, host1)
    assert "has no disk 5 (its disks: 0, 1)" in s.api.failure("one.vm.restore", vm_id, image_id, -1, 5)
    assert "has no increment 2" in s.api.failure("one.vm.restore", vm_id, image_id, 2, -1)


def test_a_running_vm_is_refused_and_untouched(setup: Setup, tiny_domain: Callable[..., TinyDomain],
                                               hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    s, host1 = setup, hypervisors("host1")
    dom, vm_id, image_id, _ = backed_up(s, s.fs_ds, tiny_domain, host1, tmp_path)
    host1.start(dom)
    deadline = time.monotonic() + WAIT
    while states(s.api, vm_id) != ("3", "3"):  # the daemon sees the domain run (libvirt event)
        assert time.monotonic() < deadline, s.api.daemon.log()[-3000:]
        time.sleep(0.05)
    host1.write_pattern(dom, "vda", pattern=0x55, offset="4M", length="1M")
    before = copies(dom, tmp_path, "running")
    assert "must be powered off" in s.api.failure("one.vm.restore", vm_id, image_id, -1, -1)
    cli = restore_cli(s, str(vm_id), str(image_id))
    assert cli.returncode != 0 and "must be powered off" in cli.stderr
    assert same_image(dom.vda, before[0]) and same_image(dom.vdb, before[1])
    assert host1.state(dom) == "running" and states(s.api, vm_id) == ("3", "3")
    untouched(dom, host1)
    host1.destroy(dom)


@pytest.mark.parametrize("which", ["fs", "rsync"])
def test_a_damaged_backup_file_fails_verification_and_changes_nothing(
        setup: Setup, which: str, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    s, host1 = setup, hypervisors("host1")
    ds_id = s.fs_ds if which == "fs" else s.rsync_ds
    dom, vm_id, image_id, _ = backed_up(s, ds_id, tiny_domain, host1, tmp_path)
    damaged = s.backup_dir(ds_id, vm_id, s.image(image_id).findtext("SOURCE") or "") / "disk.1.0"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # disk 0 is fetched first and verifies; disk 1 does not
    damaged.write_bytes(bytes(data))
    overwrite(dom, 0x79)
    leave_metadata(host1, dom)
    before = copies(dom, tmp_path, "before-restore")
    cli = restore_cli(s, str(vm_id), str(image_id))
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "failed" in cli.stdout and "sha256 of the copy" in cli.stdout and "disk.1.0" in cli.stdout
    assert same_image(dom.vda, before[0]) and same_image(dom.vdb, before[1])
    assert host1.lookup(dom).snapshotListNames() == ["vmsched-snap-0"] and host1.lookup(dom).listAllCheckpoints()
    untouched(dom, host1)
    assert states(s.api, vm_id) == POWEROFF


def test_the_vm_is_in_restore_while_it_runs(setup: Setup, tiny_domain: Callable[..., TinyDomain],
                                            hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    s, host1 = setup, hypervisors("host1")
    backup = s.realenv.backup
    slow = s.datastore(
        f'NAME = "slowrestore"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"\nBASE_PATH = "{s.rsync_base}"\n'
        f'RSYNC_HOST = "{backup.address}"\nRSYNC_USER = "{backup.user}"\nRSYNC_PORT = "{backup.ssh_port}"')
    dom, vm_id, image_id, (vda, vdb) = backed_up(s, slow, tiny_domain, host1, tmp_path)
    s.api.call("one.datastore.update", slow, 'RSYNC_BWLIMIT = "1024"', 1)  # KiB/s: the restore takes seconds
    overwrite(dom, 0x7A)
    s.api.call("one.vm.restore", vm_id, image_id, -1, -1)
    assert "has a restore queued or running already" in s.api.failure("one.vm.restore", vm_id, image_id, -1, -1)
    seen = set()
    deadline = time.monotonic() + WAIT
    while (status := dict(s.api.call("vmsched.vm.restorestatus", vm_id)))["STATE"] in ("queued", "running"):  # type: ignore[call-overload]
        assert time.monotonic() < deadline, s.api.daemon.log()[-3000:]
        seen.add(states(s.api, vm_id))
        time.sleep(0.05)
    assert status["STATE"] == "done", status
    assert (status["IMAGE_ID"], status["INCREMENT_ID"], status["DISK_ID"]) == (image_id, -1, -1)
    assert RESTORE in seen
    assert states(s.api, vm_id) == POWEROFF
    assert same_image(dom.vda, vda) and same_image(dom.vdb, vdb)
    untouched(dom, host1)
