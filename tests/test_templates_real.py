"""``vmsched template instantiate`` against the real hosts: a restored domain defined and started on host2.

The template carries a domain derived (``restored_domain_xml``) from a tiny domain of host1 whose disks
were copied, as a restore would have downloaded them; the hosts share the test's file system.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from scheduler.model.template import Template, Vector
from scheduler.restore.template import restored_domain_xml
from tests.conftest import REPO
from tests.realenv.domains import Hypervisor, TinyDomain, disk_sources, new_name
from tests.realenv.model import RealEnv
from tests.realenv.procs import run
from tests.test_import_real import Api, disks, real_daemon, vm_ids

pytestmark = pytest.mark.realenv


@pytest.fixture(scope="module")
def api(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from real_daemon(realenv, tmp_path_factory.mktemp("daemon") / "state")


def vmsched(api: Api, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scheduler", *argv], capture_output=True, text=True,
                          env=api.daemon.env, cwd=REPO, timeout=120)


def restored_copy(dom: TinyDomain, directory: Path) -> tuple[str, str, dict[str, Path]]:
    """(new name, new UUID, target -> file) of a restored copy of ``dom``: its disks converted to qcow2
    files in ``directory``, as a restore downloads them."""
    directory.mkdir()
    files = {"vda": directory / "disk.0.qcow2", "vdb": directory / "disk.1.qcow2"}
    for target, source in (("vda", dom.vda), ("vdb", dom.vdb)):
        run(["qemu-img", "convert", "-O", "qcow2", str(source), str(files[target])])
    return new_name(), str(uuid.uuid4()), files


def test_instantiate_defines_starts_and_registers_on_host2(
        api: Api, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    dom = tiny_domain("host1", start=False)
    backed_up = hypervisors("host1").lookup(dom).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    name, new_uuid, files = restored_copy(dom, tmp_path / "restored")
    xml = restored_domain_xml(backed_up, name=name, uuid=new_uuid, disk_paths={t: str(p) for t, p in files.items()},
                              no_nic=False, no_ip=True)
    template = Template([("NAME", name), ("VMSCHED_DOMAIN_XML", xml), ("LABELS", "restored"),
                         ("BACKUP_CONFIG", Vector({"KEEP_LAST": "2", "FS_FREEZE": "NONE"})),
                         ("CONTEXT", Vector({"NETWORK": "YES"})), ("OS", Vector({"BOOT": "disk0"}))])
    template_id = int(api.call("one.template.allocate", template.render()))  # type: ignore[call-overload]
    host2 = hypervisors("host2")
    copy = TinyDomain(name=name, host="host2", directory=files["vda"].parent, vda=files["vda"], vdb=files["vdb"])
    try:
        done = vmsched(api, "template", "instantiate", str(template_id), "--host", "host2", "--start")
        assert done.returncode == 0, done.stderr
        vm_id = int(done.stdout.split()[1])
        assert host2.state(copy) == "running" and host2.lookup(copy).UUIDString() == new_uuid
        assert disk_sources(host2.lookup(copy).XMLDesc()) == files
        assert name not in hypervisors("host1").names()
        vm = api.vm(vm_id)
        assert (vm.findtext("STATE"), vm.findtext("LCM_STATE")) == ("3", "3")  # ACTIVE/RUNNING
        assert (vm.findtext("NAME"), vm.findtext("DEPLOY_ID"), vm.findtext("TEMPLATE/OS/UUID")) == (
            name, name, new_uuid)
        assert vm.findtext("HISTORY_RECORDS/HISTORY[last()]/HOSTNAME") == "host2"
        assert vm_id in vm_ids(api.host("host2"))
        assert {t: (d["SOURCE"], d["FORMAT"]) for t, d in disks(vm).items()} == {
            t: (str(p), "qcow2") for t, p in files.items()}
        assert vm.findtext("BACKUPS/BACKUP_CONFIG/KEEP_LAST") == "2"
        assert (vm.findtext("TEMPLATE/CONTEXT/NETWORK"), vm.findtext("TEMPLATE/OS/BOOT"),
                vm.findtext("USER_TEMPLATE/LABELS")) == ("YES", "disk0", "restored")
        # once a VM, the template is not instantiated again (the VM owns those disks)
        message = api.failure("vmsched.template.instantiate", template_id, api.hosts["host1"], False)
        assert f"is VM {vm_id}" in message
        # unregistered, the domain still on host2: the definition there is not replaced
        api.call("one.vm.recover", vm_id, 3)
        message = api.failure("vmsched.template.instantiate", template_id, api.hosts["host2"], False)
        assert "already has domain" in message and host2.state(copy) == "running"
    finally:
        host2.remove(copy)


def test_a_domain_that_cannot_start_is_not_left_defined(
        api: Api, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor],
        tmp_path: Path) -> None:
    dom = tiny_domain("host1", start=False)
    backed_up = hypervisors("host1").lookup(dom).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    name, missing = new_name(), tmp_path / "never-restored.qcow2"
    xml = restored_domain_xml(backed_up, name=name, uuid=str(uuid.uuid4()), disk_paths={"vda": str(missing)},
                              no_nic=False, no_ip=False)
    template = Template([("NAME", name), ("VMSCHED_DOMAIN_XML", xml)])
    template_id = int(api.call("one.template.allocate", template.render()))  # type: ignore[call-overload]
    vms_before = vm_ids(api.host("host2"))
    message = api.failure("vmsched.template.instantiate", template_id, api.hosts["host2"], True)
    assert "start" in message and str(missing) in message
    assert name not in hypervisors("host2").names()
    assert vm_ids(api.host("host2")) == vms_before
