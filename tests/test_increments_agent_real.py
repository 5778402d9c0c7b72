"""MODE=INCREMENT (INCREMENT_MODE CBT and SNAPSHOT) with FS_FREEZE=AGENT against the real agent guest (tests/realenv/agentguest.py: a Linux with
qemu-ga on an ext4 qcow2 disk), through a real daemon, and a restore drill at every link of the chain.

A file of random bytes is written and synced through the agent before each of three backups (the full base,
increment 1, increment 2), each time with other bytes. Each increment k is then restored with
``one.image.restore`` (``INCREMENT_ID = k``) into an image datastore of host2 and instantiated there; the
restored guest boots, its own agent answers, and the file's sha256 read through that agent is the sha256
of the bytes written before backup k. The expected digests are computed here with hashlib, from the bytes
the test wrote, not from anything vmsched reports.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.realenv.agentguest import AgentGuest
from tests.realenv.domains import Hypervisor, disk_sources
from tests.test_backup_faults_real import backup
from tests.test_backup_real import RUNNING, Setup, backup_ids, setup, states  # noqa: F401 - setup is a fixture

pytestmark = pytest.mark.realenv
FILE = "/mnt/vda/chain.bin"
BOOT_WAIT = 120.0  # seconds for a restored TCG guest to boot on host2 and answer on its agent


def increment_ids(s: Setup, image_id: int) -> list[tuple[int, str, int]]:
    """(ID, TYPE, PARENT_ID) of each link of the chain image."""
    return [(int(i.findtext("ID") or ""), i.findtext("TYPE") or "", int(i.findtext("PARENT_ID") or ""))
            for i in s.image(image_id).iterfind("BACKUP_INCREMENTS/INCREMENT")]


def remove_domain(hypervisor: Hypervisor, name: str) -> None:
    try:
        domain = hypervisor.conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise
    if domain.isActive():
        domain.destroy()
    domain.undefine()


@pytest.mark.parametrize("increment_mode", ["CBT", "SNAPSHOT"])
def test_each_increment_of_an_agent_frozen_chain_boots_with_the_file_as_it_was(
        setup: Setup, agent_guest: AgentGuest, hypervisors: Callable[[str], Hypervisor],  # noqa: F811
        tmp_path: Path, increment_mode: str) -> None:
    s, guest = setup, agent_guest
    host2 = hypervisors("host2")
    # MODE=INCREMENT takes qcow2 disks only: the agent guest's one data disk is one
    assert [d.get("type") for d in etree.fromstring(guest.dom.XMLDesc()).iterfind("devices/disk/driver")] == ["qcow2"]
    vm_id = s.api.import_one("host1", guest.name)
    s.api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ MODE = "INCREMENT", FS_FREEZE = "AGENT", '
               f'INCREMENT_MODE = "{increment_mode}" ]', 1)
    base = guest.disks[0]

    digests = []
    for k, what in enumerate(["live full base of a new chain", "live increment 1", "live increment 2"]):
        data = os.urandom(64 * 1024)
        guest.write_file(FILE, data)  # written and synced before backup k
        digests.append(hashlib.sha256(data).hexdigest())
        writer = guest.start_write_on_freeze(f"/mnt/vda/on-freeze-{k}", "x", tag=f"incag-{k}", hold=0.2)
        status = backup(s.api, vm_id, s.rsync_ds)
        assert status["STATE"] == "done", f"{status}\n{s.api.daemon.log()[-3000:]}"
        assert str(status["MESSAGE"]).startswith(f"{what} of VM {vm_id}"), status
        # the writer waits for the agent's frozen marker: it has ended only if backup k froze the guest
        assert guest.wait_exec(writer, timeout=30).exitcode == 0
        # the agent thawed the guest after the job (or the snapshot) started; it runs on its own disk (SNAPSHOT:
        # on the overlay that holds what it writes until the next backup), RUNNING
        assert guest.fsfreeze_status() == "thawed"
        expected = base if increment_mode == "CBT" else Path(f"{base}.vmsched-snap.{vm_id}.{k + 1}")
        assert disk_sources(guest.dom.XMLDesc()) == {"vda": expected}
        assert states(s.api, vm_id) == RUNNING
    assert len(set(digests)) == 3
    assert guest.sha256(FILE) == digests[2]

    image_id = backup_ids(s.api, vm_id)[-1]  # the chain this case made (the guest's VM may have an older one)
    assert increment_ids(s, image_id) == [(0, "FULL", -1), (1, "INCREMENT", 0), (2, "INCREMENT", 1)]
    assert sorted(c.getName() for c in guest.dom.listAllCheckpoints()) == (
        [f"vmsched-{vm_id}-1", f"vmsched-{vm_id}-2"] if increment_mode == "CBT" else [])

    images = s.datastore(f'NAME = "incag-h2-{increment_mode}"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBRIDGE_LIST = "host2"\n'
                         f'BASE_PATH = "{tmp_path / "images"}"')
    names = [f"incag-{vm_id}-{increment_mode.lower()}-at-{k}" for k in range(3)]
    restored_vms: list[int] = []
    try:
        # one at a time: each restored domain keeps the source's serial <log file=...>, which one host's
        # virtlogd opens for one domain only (a second start fails with "Device or resource busy")
        for k, name in enumerate(names):
            began = time.monotonic()
            reply = str(s.api.call("one.image.restore", image_id, images, f'INCREMENT_ID = "{k}"\nNAME = "{name}"'))
            template_id, *disk_images = map(int, reply.split())
            assert len(disk_images) == 1, reply
            started = time.monotonic()
            restored_vms.append(int(s.api.call("vmsched.template.instantiate",  # type: ignore[call-overload]
                                               template_id, s.api.hosts["host2"], True)))
            restored = AgentGuest(host2.conn, "host2", name, tmp_path, [])
            restored.wait_agent(timeout=BOOT_WAIT, started=started)  # it boots, and its own agent answers
            print(f"increment {k}: restored in {started - began:.1f} s, its agent answered "
                  f"{time.monotonic() - started:.1f} s after instantiate")
            assert restored.sha256(FILE) == digests[k], f"restored at increment {k}"
            assert states(s.api, restored_vms[k]) == RUNNING
            assert s.api.vm(restored_vms[k]).findtext("HISTORY_RECORDS/HISTORY/HOSTNAME") == "host2"
            remove_domain(host2, name)
    finally:
        for name in names:
            remove_domain(host2, name)
        for restored_vm in restored_vms:
            s.api.call("one.vm.recover", restored_vm, 3)
    assert not [n for n in host2.names() if n in names]
