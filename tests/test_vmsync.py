"""VM states follow libvirt: the pure decision, and events from a real host through a real daemon."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drivers.vmm.states import DomainState
from scheduler.hosts.vmsync import arrivals, state_updates
from scheduler.model.objects.states import LcmState, VmState
from scheduler.model.objects.vm import History, Vm
from scheduler.model.template import Template, Vector
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv

UUID = "8f4b9d6c-5b0e-4c53-9a43-2d1f0f1f6e01"


def vm(host_id: int | None, state: VmState, lcm: LcmState, uuid: str = UUID) -> Vm:
    template = Template()
    template.add("OS", Vector({"UUID": uuid}))
    history = [History(seq=0, hostname=f"kvm{host_id}", hid=host_id)] if host_id is not None else []
    return Vm(id=1, name="web", state=state, lcm_state=lcm, template=template, history=history)


@pytest.mark.parametrize(
    ("current", "domain", "expected"),
    [
        (vm(0, VmState.ACTIVE, LcmState.RUNNING), DomainState.PAUSED, (VmState.SUSPENDED, LcmState.LCM_INIT)),
        (vm(0, VmState.ACTIVE, LcmState.RUNNING), DomainState.SHUTOFF, (VmState.POWEROFF, LcmState.LCM_INIT)),
        (vm(0, VmState.POWEROFF, LcmState.LCM_INIT), DomainState.RUNNING, (VmState.ACTIVE, LcmState.RUNNING)),
        (vm(0, VmState.ACTIVE, LcmState.RUNNING), DomainState.RUNNING, None),  # nothing to change
        (vm(0, VmState.ACTIVE, LcmState.BACKUP), DomainState.PAUSED, None),  # a backup owns its state
        (vm(0, VmState.ACTIVE, LcmState.BACKUP_POWEROFF), DomainState.RUNNING, None),
        (vm(1, VmState.ACTIVE, LcmState.RUNNING), DomainState.SHUTOFF, None),  # bound to another host
        (vm(None, VmState.PENDING, LcmState.LCM_INIT), DomainState.RUNNING, None),  # not bound
        (vm(0, VmState.ACTIVE, LcmState.RUNNING, uuid=UUID.upper()), DomainState.SHUTOFF,
         (VmState.POWEROFF, LcmState.LCM_INIT)),  # UUIDs compare case-insensitively
    ],
)
def test_which_vms_change(current: Vm, domain: DomainState, expected: tuple | None) -> None:
    updates = state_updates([current], 0, {UUID: domain})
    assert [(s, lcm) for _, s, lcm in updates] == ([expected] if expected else [])


@pytest.mark.parametrize(
    ("current", "domain", "moved"),
    [
        (vm(1, VmState.POWEROFF, LcmState.LCM_INIT), DomainState.RUNNING, True),  # migrated here
        (vm(1, VmState.ACTIVE, LcmState.RUNNING, uuid=UUID.upper()), DomainState.RUNNING, True),
        (vm(1, VmState.ACTIVE, LcmState.RUNNING), DomainState.PAUSED, False),  # an incoming migration
        (vm(1, VmState.ACTIVE, LcmState.RUNNING), DomainState.SHUTOFF, False),  # defined here, runs there
        (vm(0, VmState.ACTIVE, LcmState.RUNNING), DomainState.RUNNING, False),  # already bound here
        (vm(1, VmState.ACTIVE, LcmState.BACKUP), DomainState.RUNNING, False),  # a backup owns it
        (vm(None, VmState.PENDING, LcmState.LCM_INIT), DomainState.RUNNING, False),  # not bound: import it
    ],
)
def test_which_vms_moved_here(current: Vm, domain: DomainState, moved: bool) -> None:
    assert arrivals([current], 0, {UUID: domain}) == ([current] if moved else [])


@pytest.mark.realenv
def test_states_follow_changes_made_outside_vmsched(realenv: RealEnv, tmp_path: Path,
                                                    tiny_domain: Callable[..., TinyDomain],
                                                    hypervisors: Callable[[str], Hypervisor]) -> None:
    from tests.test_import_real import real_daemon

    dom = tiny_domain("host1")
    daemons: Iterator = real_daemon(realenv, tmp_path / "state")
    api = next(daemons)
    try:
        deadline = time.monotonic() + 20  # monitored once: the state subscription is in place
        while api.host("host1").findtext("STATE") != "2":
            assert time.monotonic() < deadline, api.daemon.log()[-2000:]
            time.sleep(0.05)
        vm_id = api.import_one("host1", dom.name)
        libvirt_dom = hypervisors("host1").lookup(dom)

        def wait_state(expected: tuple[str, str]) -> None:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                got = api.vm(vm_id)
                if (got.findtext("STATE"), got.findtext("LCM_STATE")) == expected:
                    return
                time.sleep(0.05)
            raise AssertionError(f"VM {vm_id} never reached {expected}:\n{api.daemon.log()[-2000:]}")

        wait_state(("3", "3"))  # ACTIVE/RUNNING, as imported
        libvirt_dom.suspend()
        wait_state(("5", "0"))  # SUSPENDED: a lifecycle event, well before the next monitoring round
        libvirt_dom.resume()
        wait_state(("3", "3"))
        libvirt_dom.destroy()
        wait_state(("8", "0"))  # POWEROFF
    finally:
        next(daemons, None)
