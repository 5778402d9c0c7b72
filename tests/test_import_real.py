"""one.host.importvm and ``vmsched vm import`` against the real hosts, through a real daemon.

The daemon reaches host1 and host2 over SSH and qemu+ssh with the realenv key and known_hosts. The
helpers here (``real_daemon``, ``Api``) are shared with tests/test_actions_real.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from tests.conftest import REPO, Daemon, start_daemon
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.realenv.procs import run

pytestmark = pytest.mark.realenv
ACTION_WAIT = 60.0  # seconds: a scheduled action not finished by then is a failure (a loaded 2-core machine)


@dataclass
class Api:
    """The daemon's XML-RPC API as the tests use it (plain xmlrpc.client, answers checked)."""

    daemon: Daemon
    hosts: dict[str, int]

    def call(self, method: str, *args: object) -> object:
        with xmlrpc.client.ServerProxy(self.daemon.endpoint, allow_none=False) as proxy:
            ok, value, *_ = getattr(proxy, method)(self.daemon.session, *args)
        if not ok:
            raise RuntimeError(f"{method}: {value}")
        return value

    def failure(self, method: str, *args: object) -> str:
        with xmlrpc.client.ServerProxy(self.daemon.endpoint) as proxy:
            ok, value, *_ = getattr(proxy, method)(self.daemon.session, *args)
        assert not ok, f"{method} succeeded: {value}"
        return str(value)

    def vm(self, vm_id: int) -> etree._Element:
        return etree.fromstring(str(self.call("one.vm.info", vm_id)).encode())

    def host(self, name: str) -> etree._Element:
        return etree.fromstring(str(self.call("one.host.info", self.hosts[name])).encode())

    def import_domains(self, host: str, names: list[str]) -> list[dict]:
        return list(self.call("one.host.importvm", self.hosts[host], names, False))  # type: ignore[call-overload]

    def import_one(self, host: str, name: str) -> int:
        [result] = self.import_domains(host, [name])
        assert result["STATUS"] in ("created", "updated"), result
        return int(result["ID"])

    def schedule_now(self, vm_id: int, action: str, args: str = "") -> int:
        text = f'SCHED_ACTION = [ ACTION = "{action}", ARGS = "{args}", TIME = "{int(time.time())}" ]'
        return int(self.call("one.vm.schedadd", vm_id, text))  # type: ignore[call-overload]

    def wait_action(self, vm_id: int, sa_id: int) -> tuple[bool, str]:
        """(succeeded, MESSAGE) once the action has run: DONE set, or a MESSAGE."""
        deadline = time.monotonic() + ACTION_WAIT
        while time.monotonic() < deadline:
            for sa in self.vm(vm_id).iterfind("TEMPLATE/SCHED_ACTION"):
                if sa.findtext("ID") != str(sa_id):
                    continue
                message, done = sa.findtext("MESSAGE") or "", int(sa.findtext("DONE") or "-1")
                if message or done > 0:
                    return not message, message
            time.sleep(0.1)
        raise AssertionError(f"action {sa_id} of VM {vm_id} did not finish within {ACTION_WAIT} s:\n"
                             f"{self.daemon.log()[-3000:]}")

    def run_action(self, vm_id: int, action: str, args: str = "") -> tuple[bool, str]:
        return self.wait_action(vm_id, self.schedule_now(vm_id, action, args))


def staged_state(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory, staging: str) -> Path:
    """A new daemon state dir whose sched.conf stages backups under ``staging`` on the hypervisors."""
    state = tmp_path_factory.mktemp("daemon") / "state"
    state.mkdir(parents=True)
    (state / "sched.conf").write_text(
        f'LISTEN = [ ADDRESS = "127.0.0.1", PORT = "0" ]\nBACKUP_BASE_PATH = "{staging}"\n'
        f'SSH = [ KNOWN_HOSTS = "{realenv.ssh.known_hosts}", KEY = "{realenv.ssh.client_key}" ]\n')
    return state


def real_daemon(realenv: RealEnv, state_dir: Path, host_template: str = "") -> Iterator[Api]:
    """A daemon with host1 and host2 registered (SSH settings from the realenv)."""
    config = f'SSH = [ KNOWN_HOSTS = "{realenv.ssh.known_hosts}", KEY = "{realenv.ssh.client_key}" ]\n'
    daemon = start_daemon(state_dir, config)
    api = Api(daemon, {})
    try:
        for host in realenv.hosts[:2]:
            host_id = int(api.call("one.host.allocate", host.name, "kvm", "kvm", -1))  # type: ignore[call-overload]
            api.call("one.host.update", host_id,
                     f'SSH_HOST = "{host.address}"\nSSH_PORT = "{host.ssh_port}"\nSSH_USER = "{host.user}"\n'
                     f'{host_template}', 1)  # the key: sched.conf's SSH/KEY
            api.hosts[host.name] = host_id
        yield api
    finally:
        code = daemon.stop()
        assert code == 0, f"daemon exited with {code}; log:\n{daemon.log()}"
        assert "Traceback" not in daemon.log(), daemon.log()


@pytest.fixture(scope="module")
def api(realenv: RealEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from real_daemon(realenv, tmp_path_factory.mktemp("daemon") / "state")


def disks(vm: etree._Element) -> dict[str, dict[str, str]]:
    """TARGET -> the DISK vector's keys and values."""
    return {d.findtext("TARGET") or "": {c.tag: c.text or "" for c in d} for d in vm.iterfind("TEMPLATE/DISK")}


def vm_ids(host: etree._Element) -> set[int]:
    return {int(i.text or "") for i in host.iterfind("VMS/ID")}


def test_import_qcow2_raw_and_cdrom_disks(api: Api, tiny_domain: Callable[..., TinyDomain],
                                          hypervisors: Callable[[str], Hypervisor]) -> None:
    dom = tiny_domain("host1", cdrom=True)
    uuid = hypervisors("host1").lookup(dom).UUIDString()
    clash = int(api.call("one.vm.allocate", f'NAME = "{dom.name}"'))  # type: ignore[call-overload]
    results = api.import_domains("host1", [dom.name, "vmsched-t-nosuchdomain"])
    assert [r["STATUS"] for r in results] == ["created", "failed"]
    assert "vmsched-t-nosuchdomain" in results[1]["MESSAGE"] and results[1]["ID"] == -1
    vm = api.vm(results[0]["ID"])
    assert vm.findtext("NAME") == f"{dom.name}-1" and results[0]["ID"] != clash
    assert (vm.findtext("DEPLOY_ID"), vm.findtext("TEMPLATE/OS/UUID")) == (dom.name, uuid)
    assert (vm.findtext("STATE"), vm.findtext("LCM_STATE")) == ("3", "3")  # ACTIVE/RUNNING
    assert (vm.findtext("HISTORY_RECORDS/HISTORY[last()]/HOSTNAME"),
            vm.findtext("HISTORY_RECORDS/HISTORY[last()]/HID")) == ("host1", str(api.hosts["host1"]))
    assert results[0]["ID"] in vm_ids(api.host("host1"))
    found = {target: (d["DISK_ID"], d["TYPE"], d["FORMAT"], d.get("SIZE"), d.get("TM_MAD"), d.get("SOURCE"))
             for target, d in disks(vm).items()}
    assert found == {
        "vda": ("0", "FILE", "qcow2", "64", "qcow2", str(dom.vda)),
        "vdb": ("1", "FILE", "raw", "32", "qcow2", str(dom.vdb)),
        "hdc": ("2", "CDROM", "raw", "1", "qcow2", str(dom.cdrom)),
    }
    assert (vm.findtext("TEMPLATE/MEMORY"), vm.findtext("TEMPLATE/VCPU")) == ("64", "1")


def _attach_disk(hypervisor: Hypervisor, dom: TinyDomain, target: str) -> Path:
    image = dom.directory / f"{target}.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"])
    xml = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{image}'/>"
           f"<target dev='{target}' bus='virtio'/></disk>")
    hypervisor.lookup(dom).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    return image


def test_reimport_after_hotplug_keeps_ids_and_backup_settings(
        api: Api, tiny_domain: Callable[..., TinyDomain], hypervisors: Callable[[str], Hypervisor]) -> None:
    dom = tiny_domain("host1", start=False, cdrom=True)
    vm_id = api.import_one("host1", dom.name)
    assert api.vm(vm_id).findtext("STATE") == "8"  # POWEROFF
    api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ KEEP_LAST = "3", MODE = "FULL" ]', 1)
    api.call("one.vm.update", vm_id, 'OWNER_NOTE = "keep me"', 1)
    sa_id = int(api.call("one.vm.schedadd", vm_id,  # type: ignore[call-overload]
                         f'SCHED_ACTION = [ ACTION = "reboot", TIME = "{int(time.time()) + 86400}" ]'))
    hypervisor = hypervisors("host1")
    hypervisor.lookup(dom).detachDeviceFlags(  # vdb goes: its id must not be reused
        f"<disk type='file' device='disk'><source file='{dom.vdb}'/><target dev='vdb' bus='virtio'/></disk>",
        libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    image = _attach_disk(hypervisor, dom, "vdc")
    cli = subprocess.run([sys.executable, "-m", "scheduler", "vm", "import", "host1", dom.name],
                         env=api.daemon.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert f"{vm_id} {dom.name}" in " ".join(cli.stdout.split()) and "updated" in cli.stdout
    vm = api.vm(vm_id)
    found = {target: (d["DISK_ID"], d.get("SOURCE")) for target, d in disks(vm).items()}
    assert found == {"vda": ("0", str(dom.vda)), "hdc": ("2", str(dom.cdrom)), "vdc": ("3", str(image))}
    assert disks(vm)["vdc"]["SIZE"] == "16"
    assert vm.findtext("BACKUPS/BACKUP_CONFIG/KEEP_LAST") == "3"
    assert vm.findtext("USER_TEMPLATE/OWNER_NOTE") == "keep me"
    assert [i.text for i in vm.iterfind("SCHED_ACTIONS/ID")] == [str(sa_id)]
    assert vm.findtext("NAME") == dom.name and len(vm.findall("HISTORY_RECORDS/HISTORY")) == 1
    assert [r["ID"] for r in api.import_domains("host1", [dom.name])] == [vm_id]  # again: same VM, no new one


def test_import_all_and_cli_usage(api: Api, tiny_domain: Callable[..., TinyDomain]) -> None:
    first, second = tiny_domain("host2", start=False), tiny_domain("host2", start=False)
    results = {r["DOMAIN"]: r for r in api.call("one.host.importvm", api.hosts["host2"], [], True)}  # type: ignore[attr-defined]
    assert {first.name, second.name} <= results.keys()
    assert all(r["STATUS"] in ("created", "updated") for r in results.values())
    assert "not both" in api.failure("one.host.importvm", api.hosts["host2"], [first.name], True)
    cli = subprocess.run([sys.executable, "-m", "scheduler", "vm", "import", "host2"], env=api.daemon.env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "--all" in cli.stderr
