"""one.image.restore against real backups (spec §8.1-8.3): images in an image datastore on a host, a cleaned
VM template whose domain starts on a second host, DISK_ID, and refusals that create nothing.

Expected contents come from ``qemu-img convert`` copies of the disks taken before the backup.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import REPO
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.test_backup_real import Setup, backup_ids, same_image, setup, snapshot_copy  # noqa: F401
from tests.test_hosts_real import free_port

pytestmark = pytest.mark.realenv


def image(s: Setup, image_id: int) -> etree._Element:
    return etree.fromstring(str(s.api.call("one.image.info", image_id)).encode())


def test_restore_to_new_images_and_a_template_that_starts_on_host2(
        setup: Setup, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],  # noqa: F811
        tmp_path: Path) -> None:
    s, host1 = setup, hypervisors("host1")
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    host1.write_pattern(dom, "vda", pattern=0x71, offset="4M", length="1M")
    host1.write_pattern(dom, "vdb", pattern=0x72, offset="1M", length="1M")
    vda = snapshot_copy(dom.vda, tmp_path / "vda.qcow2", "qcow2")
    vdb = snapshot_copy(dom.vdb, tmp_path / "vdb.qcow2", "raw")
    ok, message = s.api.run_action(vm_id, "backup", f"{s.rsync_ds},0")
    assert ok, message
    [backup] = backup_ids(s.api, vm_id)
    base = tmp_path / "images-on-host2"
    ds = s.datastore(f'NAME = "imgs-h2"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBRIDGE_LIST = "host2"\nBASE_PATH = "{base}"')

    reply = str(s.api.call("one.image.restore", backup, ds, 'NAME = "drill"\nNO_IP = "YES"'))
    template_id, *image_ids = map(int, reply.split())
    assert template_id >= 0 and len(image_ids) == 2
    restored = {int(image(s, i).findtext("TEMPLATE/RESTORED_FROM").split(":")[1]): image(s, i) for i in image_ids}
    for disk_id, (expected, kind) in {0: (vda, "0"), 1: (vdb, "2")}.items():  # OS, DATABLOCK
        record = restored[disk_id]
        assert record.findtext("NAME") == f"drill-disk-{disk_id}"
        assert (record.findtext("TYPE"), record.findtext("STATE"), record.findtext("FORMAT")) == (kind, "1", "qcow2")
        assert record.findtext("PATH", "").startswith(f"rsync://{s.rsync_ds}//0:")
        assert record.findtext("DATASTORE_ID") == str(ds)
        assert same_image(Path(record.findtext("SOURCE") or ""), expected)  # host2 shares this /tmp
    template = etree.fromstring(str(s.api.call("one.template.info", template_id)).encode())
    assert template.findtext("NAME") == "drill"
    assert sorted(d.findtext("IMAGE_ID") for d in template.iterfind("TEMPLATE/DISK")) == sorted(map(str, image_ids))

    new_vm = int(s.api.call("vmsched.template.instantiate", template_id, s.api.hosts["host2"], True))  # type: ignore[call-overload]
    vm = s.api.vm(new_vm)
    assert (vm.findtext("STATE"), vm.findtext("LCM_STATE")) == ("3", "3")
    domain = hypervisors("host2").conn.lookupByName("drill")
    try:
        assert domain.isActive()
        xml = domain.XMLDesc()
        assert all(restored[d].findtext("SOURCE") in xml for d in (0, 1))
        assert "<mac " not in xml  # NO_IP
    finally:
        domain.destroy()
        domain.undefine()


def test_one_disk_and_refusals_that_create_nothing(setup: Setup,  # noqa: F811
                                                    tiny_domain: Callable[..., TinyDomain]) -> None:
    s = setup
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    assert s.api.run_action(vm_id, "backup", f"{s.fs_ds},0")[0]
    [backup] = backup_ids(s.api, vm_id)
    before = s.image_ids()
    assert "Destination can be only an image datastore" in s.api.failure("one.image.restore", backup, s.rsync_ds, "")
    assert "no increment 3" in s.api.failure("one.image.restore", backup, s.image_ds, "INCREMENT_ID = 3")
    assert "disk 7 is not in backup image" in s.api.failure("one.image.restore", backup, s.image_ds, "DISK_ID = 7")
    assert "must be YES or NO" in s.api.failure("one.image.restore", backup, s.image_ds, 'NO_IP = "maybe"')
    assert s.image_ids() == before

    cli = subprocess.run([sys.executable, "-m", "scheduler", "image", "restore", str(backup), "-d", "imgs",
                          "--disk-id", "1", "--no-ip"], env=s.api.daemon.env, cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("Images: ") and "VM Template" not in cli.stdout  # one disk: no template
    image_id = int(cli.stdout.split()[1])
    record = image(s, image_id)
    assert record.findtext("NAME") == f"{vm_id}-{image(s, backup).findtext('SOURCE')}-disk-1"
    assert same_image(Path(record.findtext("SOURCE") or ""), dom.vdb)
    s.api.call("one.image.delete", image_id, False)  # the restored file goes with the record
    assert not Path(record.findtext("SOURCE") or "").exists()


def test_failures_remove_what_the_restore_created(setup: Setup,  # noqa: F811
                                                  tiny_domain: Callable[..., TinyDomain], tmp_path: Path) -> None:
    s = setup
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    assert s.api.run_action(vm_id, "backup", f"{s.fs_ds},0")[0]
    [backup] = backup_ids(s.api, vm_id)
    before = s.image_ids()
    images = tmp_path / "images"
    ds = s.datastore(f'NAME = "imgs-fail"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBASE_PATH = "{images}"')

    # disk 0 arrives and is verified, then disk 1's backup file turns out damaged: both images go
    damaged = s.backup_dir(s.fs_ds, vm_id, image(s, backup).findtext("SOURCE") or "") / "disk.1.0"
    original = damaged.read_bytes()
    damaged.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    try:
        message = s.api.failure("one.image.restore", backup, ds, "")
    finally:
        damaged.write_bytes(original)
    assert "sha256 of the copy" in message and "images created before the failure were removed" in message
    assert s.image_ids() == before and not [p for p in images.iterdir() if p.is_file()]

    # the backup server unreachable: a clear error, nothing created
    closed = free_port()
    rsync_backup = _rsync_backup(s, tiny_domain)
    s.api.call("one.datastore.update", s.rsync_ds, f'RSYNC_PORT = "{closed}"', 1)
    try:
        message = s.api.failure("one.image.restore", rsync_backup, ds, "")
    finally:
        s.api.call("one.datastore.update", s.rsync_ds, f'RSYNC_PORT = "{s.realenv.backup.ssh_port}"', 1)
    assert str(closed) in message, message
    assert s.image_ids() == [*before, rsync_backup]

    # no room in the target: refused before anything is created
    s.api.call("one.datastore.update", ds, 'LIMIT_MB = "1"', 1)
    deadline = time.monotonic() + 30
    while etree.fromstring(str(s.api.call("one.datastore.info", ds)).encode()).findtext("TOTAL_MB") != "1":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "Not enough free space in image datastore" in s.api.failure("one.image.restore", backup, ds, "")
    assert s.image_ids() == [*before, rsync_backup]


def _rsync_backup(s: Setup, tiny_domain: Callable[..., TinyDomain]) -> int:
    dom = tiny_domain("host1")
    vm_id = s.api.import_one("host1", dom.name)
    assert s.api.run_action(vm_id, "backup", f"{s.rsync_ds},0")[0]
    return backup_ids(s.api, vm_id)[0]
