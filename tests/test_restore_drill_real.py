"""A restore drill with the real agent guest: back it up (FS_FREEZE=AGENT), restore it as a new VM on
host2 from its backup, boot it: its agent answers and a file written before the backup reads back with
the same sha256, read through the restored guest's own agent."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.realenv.agentguest import AgentGuest
from tests.realenv.domains import Hypervisor
from tests.test_backup_real import Setup, backup_ids, setup  # noqa: F401

pytestmark = pytest.mark.realenv


def test_restore_drill_boots_the_backup_on_another_host(setup: Setup,  # noqa: F811
                                                        agent_guest: AgentGuest,
                                                        hypervisors: Callable[[str], Hypervisor],
                                                        tmp_path: Path) -> None:
    s = setup
    data = os.urandom(64 * 1024)
    agent_guest.write_file("/mnt/vda/drill.bin", data)  # written and synced before the backup
    vm_id = s.api.import_one("host1", agent_guest.name)
    s.api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ FS_FREEZE = "AGENT" ]', 1)
    ok, message = s.api.run_action(vm_id, "backup", f"{s.rsync_ds},0")
    assert ok, message
    [backup] = backup_ids(s.api, vm_id)
    agent_guest.write_file("/mnt/vda/drill.bin", b"changed after the backup")

    images = s.datastore(f'NAME = "drill-h2"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBRIDGE_LIST = "host2"\n'
                         f'BASE_PATH = "{tmp_path / "images"}"')
    template_id, *_ = map(int, str(s.api.call("one.image.restore", backup, images, 'NAME = "drill"')).split())
    new_vm = int(s.api.call("vmsched.template.instantiate", template_id, s.api.hosts["host2"], True))  # type: ignore[call-overload]
    host2 = hypervisors("host2")
    restored = AgentGuest(host2.conn, "host2", "drill", tmp_path, [])
    try:
        restored.wait_agent(timeout=90)  # the restored guest boots and its agent answers
        assert restored.sha256("/mnt/vda/drill.bin") == hashlib.sha256(data).hexdigest()
        vm = s.api.vm(new_vm)
        assert (vm.findtext("STATE"), vm.findtext("LCM_STATE")) == ("3", "3")
        assert s.api.vm(new_vm).findtext("HISTORY_RECORDS/HISTORY/HOSTNAME") == "host2"
    finally:
        domain = host2.conn.lookupByName("drill")
        if domain.isActive():
            domain.destroy()
        domain.undefine()
