"""Scheduled power and snapshot actions on real TCG domains through a real daemon, and the placement
check that runs before them (a domain moved to another host is followed; a vanished one fails).

Each action is scheduled with TIME = now through one.vm.schedadd and waited for (DONE or MESSAGE);
libvirt is then asked what really happened. The hosts' SHUTDOWN_TIMEOUT is 2 s: an OS-less guest
ignores the ACPI power button, and poweroff must say so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import libvirt
import pytest
from lxml import etree

from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.realenv.procs import run
from tests.test_import_real import Api, real_daemon, vm_ids

pytestmark = pytest.mark.realenv


@pytest.fixture(scope="module")
def api(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from real_daemon(realenv, tmp_path_factory.mktemp("daemon") / "state", 'SHUTDOWN_TIMEOUT = "2"\n')


def states(api: Api, vm_id: int) -> tuple[str, str]:
    vm = api.vm(vm_id)
    return vm.findtext("STATE") or "", vm.findtext("LCM_STATE") or ""


RUNNING, POWEROFF, SUSPENDED = ("3", "3"), ("8", "0"), ("5", "0")


def test_power_actions_on_a_running_domain(api: Api, tiny_domain: Callable[..., TinyDomain],
                                           hypervisors: Callable[[str], Hypervisor]) -> None:
    dom, host1 = tiny_domain("host1"), hypervisors("host1")
    vm_id = api.import_one("host1", dom.name)
    assert api.run_action(vm_id, "suspend")[0]
    assert host1.state(dom) == "paused" and states(api, vm_id) == SUSPENDED
    ok, message = api.run_action(vm_id, "suspend")
    assert not ok and "suspend needs the domain running; it is paused" in message
    assert api.run_action(vm_id, "resume")[0]
    assert host1.state(dom) == "running" and states(api, vm_id) == RUNNING
    for action in ("reboot", "reboot-hard"):  # no OS: success means libvirt accepted it
        ok, message = api.run_action(vm_id, action)
        assert ok, message
        assert host1.state(dom) == "running" and states(api, vm_id) == RUNNING
    ok, message = api.run_action(vm_id, "poweroff")
    assert not ok and "did not power off within 2 s of the ACPI shutdown request" in message
    assert host1.state(dom) == "running" and states(api, vm_id) == RUNNING
    assert api.run_action(vm_id, "poweroff-hard")[0]
    assert host1.state(dom) == "shutoff" and states(api, vm_id) == POWEROFF
    assert api.run_action(vm_id, "resume")[0]  # from POWEROFF: boots it, as OpenNebula's resume does
    assert host1.state(dom) == "running" and states(api, vm_id) == RUNNING


def test_domain_moved_to_another_host_is_followed(api: Api, tiny_domain: Callable[..., TinyDomain],
                                                  hypervisors: Callable[[str], Hypervisor]) -> None:
    dom = tiny_domain("host1", start=False)
    host1, host2 = hypervisors("host1"), hypervisors("host2")
    vm_id = api.import_one("host1", dom.name)
    xml = host1.lookup(dom).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    host2.conn.defineXML(xml)  # the same UUID, now on host2
    try:
        host1.undefine(dom)
        ok, message = api.run_action(vm_id, "resume")
        assert ok, message
        assert host2.state(dom) == "running"
        vm = api.vm(vm_id)
        history = vm.findall("HISTORY_RECORDS/HISTORY")
        assert [(h.findtext("SEQ"), h.findtext("HOSTNAME")) for h in history] == [("0", "host1"), ("1", "host2")]
        assert history[0].findtext("ETIME") != "0"
        assert vm_id in vm_ids(api.host("host2")) and vm_id not in vm_ids(api.host("host1"))
        assert states(api, vm_id) == RUNNING
        assert f"domain {vm.findtext('TEMPLATE/OS/UUID')} is now on host host2" in api.daemon.log()
    finally:
        host2.remove(dom)


def test_domain_on_no_host_fails_the_action(api: Api, tiny_domain: Callable[..., TinyDomain],
                                            hypervisors: Callable[[str], Hypervisor]) -> None:
    dom = tiny_domain("host2", start=False)
    vm_id = api.import_one("host2", dom.name)
    uuid = api.vm(vm_id).findtext("TEMPLATE/OS/UUID")
    hypervisors("host2").undefine(dom)
    ok, message = api.run_action(vm_id, "reboot")
    assert not ok
    assert f"domain {uuid} of VM {vm_id} is on no registered host (last seen on host2)" in message
    assert vm_id in vm_ids(api.host("host2"))  # nothing moved


def _qcow2_only(hypervisor: Hypervisor, dom: TinyDomain) -> None:
    """Define ``dom`` again without its raw vdb: every writable disk is then qcow2."""
    xml = etree.fromstring(hypervisor.lookup(dom).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    for disk in xml.iterfind("devices/disk"):
        if disk.find("target").get("dev") == "vdb":
            disk.getparent().remove(disk)
    hypervisor.conn.defineXML(etree.tostring(xml, encoding="unicode"))


def _image_snapshots(dom: TinyDomain) -> dict[str, str]:
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(dom.vda)]).stdout)
    return {entry["name"]: entry["id"] for entry in info.get("snapshots", [])}


def test_system_snapshot_refused_with_a_raw_disk(api: Api, tiny_domain: Callable[..., TinyDomain]) -> None:
    vm_id = api.import_one("host1", tiny_domain("host1").name)
    ok, message = api.run_action(vm_id, "snapshot-create", "before")
    assert not ok and "refused: disk vdb is raw" in message
    assert api.vm(vm_id).find("TEMPLATE/SNAPSHOT") is None


def test_system_and_disk_snapshots(api: Api, tiny_domain: Callable[..., TinyDomain],
                                   hypervisors: Callable[[str], Hypervisor]) -> None:
    host1 = hypervisors("host1")
    dom = tiny_domain("host1", start=False)
    _qcow2_only(host1, dom)
    host1.start(dom)
    vm_id = api.import_one("host1", dom.name)

    ok, message = api.run_action(vm_id, "snapshot-create", "before")
    assert ok, message
    record = api.vm(vm_id).find("TEMPLATE/SNAPSHOT")
    assert (record.findtext("SNAPSHOT_ID"), record.findtext("NAME"), record.findtext("HYPERVISOR_ID")) == (
        "0", "before", "vmsched-snap-0")
    assert host1.lookup(dom).snapshotListNames() == ["vmsched-snap-0"]
    assert api.run_action(vm_id, "snapshot-revert", "0")[0]
    assert host1.state(dom) == "running" and states(api, vm_id) == RUNNING
    ok, message = api.run_action(vm_id, "snapshot-revert", "7")
    assert not ok and f"VM {vm_id} has no system snapshot 7 (snapshots: 0)" in message
    assert api.run_action(vm_id, "snapshot-delete", "0")[0]
    assert host1.lookup(dom).snapshotListNames() == [] and api.vm(vm_id).find("TEMPLATE/SNAPSHOT") is None

    ok, message = api.run_action(vm_id, "disk-snapshot-create", "0,clean")
    assert not ok and "refused: the VM is running" in message
    host1.destroy(dom)
    ok, message = api.run_action(vm_id, "disk-snapshot-create", "0,clean")
    assert ok, message
    snap_id = _image_snapshots(dom)["clean"]
    ok, message = api.run_action(vm_id, "disk-snapshot-create", "0,clean")
    assert not ok and "already has a snapshot named 'clean'" in message
    assert api.run_action(vm_id, "disk-snapshot-revert", f"0,{snap_id}")[0]
    assert api.run_action(vm_id, "disk-snapshot-delete", f"0,{snap_id}")[0]
    assert _image_snapshots(dom) == {}
    ok, message = api.run_action(vm_id, "disk-snapshot-delete", f"0,{snap_id}")
    assert not ok and f"has no snapshot {snap_id}" in message
