"""FS_FREEZE=AGENT through a real daemon, against the real agent guest (a Linux with qemu-ga, see
tests/realenv/agentguest.py): its domain is imported, its BACKUP_CONFIG set with one.vm.updateconf and
backed up with one.vm.backup.

After a backup the backed-up ext4 passes ``e2fsck -fn`` and holds the file written and synced before it;
after success, a failed upload and a cancelled one alike, the agent says ``thawed``, the guest writes on
its own disk again and the VM is RUNNING. The driver-level checks of the freeze itself (a write issued
while frozen is held back) are in tests/test_tm_qcow2.py and tests/test_agent_guest.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.realenv import agentguest
from tests.realenv.agentguest import AgentGuest
from tests.realenv.domains import Hypervisor, disk_sources
from tests.realenv.model import RealEnv
from tests.test_backup_faults_real import (
    SLOW,
    Faults,
    backup,
    entries,
    fault_daemon,
    last_run,
    wait_run,
    wait_upload,
)
from tests.test_backup_real import RUNNING, Setup, backup_ids, states

pytestmark = pytest.mark.realenv


@pytest.fixture(scope="module")
def agentd(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    yield from fault_daemon(realenv, tmp_path_factory, "vmsched-bkagent")


def frozen_vm(s: Setup, guest: AgentGuest) -> int:
    vm_id = s.api.import_one("host1", guest.name)
    s.api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ FS_FREEZE = "AGENT" ]', 1)
    return vm_id


def guest_back(s: Setup, guest: AgentGuest, vm_id: int, hypervisor: Hypervisor) -> None:
    """Thawed, on its own disk, writing again, RUNNING; no overlay, no staging dir."""
    assert guest.fsfreeze_status() == "thawed"
    assert disk_sources(guest.dom.XMLDesc()) == {"vda": guest.disks[0]}
    assert not [p.name for p in guest.directory.iterdir() if "vmsched" in p.name]
    guest.write_file("/mnt/vda/after-backup", b"after")  # would block while frozen
    assert states(s.api, vm_id) == RUNNING and guest.dom.state()[0] == 1  # VIR_DOMAIN_RUNNING
    assert s.on_host1(["test", "-e", f"{s.staging}/{vm_id}"]).returncode == 1
    assert hypervisor.conn.lookupByName(guest.name).isActive()


def test_frozen_backup_holds_a_clean_filesystem(agentd: Faults, agent_guest: AgentGuest,
                                                hypervisors: Callable[[str], Hypervisor], tmp_path: Path) -> None:
    s = agentd.s
    vm_id = frozen_vm(s, agent_guest)
    data = os.urandom(64 * 1024)
    agent_guest.write_file("/mnt/vda/before.bin", data)  # written and synced before the backup
    kept = backup_ids(s.api, vm_id)
    status = backup(s.api, vm_id, s.fs_ds)
    assert status["STATE"] == "done", status
    [image_id] = [i for i in backup_ids(s.api, vm_id) if i not in kept]
    directory = s.backup_dir(s.fs_ds, vm_id, s.image(image_id).findtext("SOURCE") or "")
    assert entries(directory) == ["disk.0.0", "domain.xml", "vm.xml"]
    disk = directory / "disk.0.0"
    assert agentguest.DISK_LABEL in agentguest.check_filesystem(disk, tmp_path)  # e2fsck -fn: clean
    assert agentguest.read_disk_file(disk, "/before.bin", tmp_path) == data
    snapshot = f"run {status['ID']}: snapshot of vda taken in"
    assert [line for line in s.api.daemon.log().splitlines() if snapshot in line and "(FS_FREEZE=AGENT)" in line]
    guest_back(s, agent_guest, vm_id, hypervisors("host1"))


def test_guest_thawed_after_a_failed_upload(agentd: Faults, agent_guest: AgentGuest,
                                            hypervisors: Callable[[str], Hypervisor]) -> None:
    s = agentd.s
    forwarder = agentd.forwarder()
    ds_id = agentd.rsync_datastore("agentfail", forwarder.port, SLOW)
    vm_id = frozen_vm(s, agent_guest)
    images, kept = s.image_ids(), backup_ids(s.api, vm_id)  # the VM may have a backup of an earlier test
    before = last_run(s.api, vm_id)
    s.api.call("one.vm.backup", vm_id, ds_id, False)
    wait_upload(s.rsync_base / str(vm_id))  # the guest was frozen and thawed before this
    forwarder.sever()
    status = wait_run(s.api, vm_id, before)
    assert status["STATE"] == "given_up", status
    assert "`rsync " in status["MESSAGE"] and "rsync error: " in status["MESSAGE"], status
    assert s.image_ids() == images and backup_ids(s.api, vm_id) == kept
    assert entries(s.rsync_base / str(vm_id)) == []  # this datastore had no backup of it
    guest_back(s, agent_guest, vm_id, hypervisors("host1"))


def test_guest_thawed_after_cancel(agentd: Faults, agent_guest: AgentGuest,
                                   hypervisors: Callable[[str], Hypervisor]) -> None:
    s = agentd.s
    ds_id = agentd.rsync_datastore("agentslow", s.realenv.backup.ssh_port, SLOW)
    vm_id = frozen_vm(s, agent_guest)
    images, kept = s.image_ids(), backup_ids(s.api, vm_id)  # the VM may have a backup of an earlier test
    before = last_run(s.api, vm_id)
    s.api.call("one.vm.backup", vm_id, ds_id, False)
    wait_upload(s.rsync_base / str(vm_id))
    assert states(s.api, vm_id) == ("3", "69")  # ACTIVE/BACKUP
    s.api.call("one.vm.backupcancel", vm_id)
    status = wait_run(s.api, vm_id, before, until=("cancelled", "done", "given_up"))
    assert (status["STATE"], status["MESSAGE"]) == ("cancelled", "cancelled"), status
    assert s.image_ids() == images and backup_ids(s.api, vm_id) == kept
    assert entries(s.rsync_base / str(vm_id)) == []  # the cleanup ran before the run was recorded
    guest_back(s, agent_guest, vm_id, hypervisors("host1"))
