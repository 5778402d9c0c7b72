"""Where a VM's domain really is, checked before an action touches it.

A domain is found by its UUID (TEMPLATE/OS/UUID; DEPLOY_ID for a VM without one) on the host of its
last HISTORY record. When that host does not have it, every other registered host is asked: a domain
migrated or re-defined elsewhere behind vmsched's back is followed (a new HISTORY record on that host,
both hosts' VMS lists updated, logged). A domain no host has fails the action with a message saying
where it was last seen. A host that cannot be asked is not taken as "domain gone": if the domain is
found nowhere else, that host's error is what the action reports.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from drivers.commands import Runner
from drivers.vmm import DomainInfo, DomainNotFound, DomainState, KvmHost
from scheduler.actions.base import RunContext
from scheduler.errors import ActionError, DriverError
from scheduler.hosts.links import HostLinks
from scheduler.hosts.vmimport import vm_states
from scheduler.model.objects.host import Host
from scheduler.model.objects.vm import History, Vm, set_states
from scheduler.store.state import Mutation, State

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """The VM as it is now (after following its domain), its host, that host's libvirt and the domain."""

    vm: Vm
    host: Host
    kvm: KvmHost
    domain: DomainInfo
    runner: Runner  # commands on the host (qemu-img)

    @property
    def ref(self) -> str:
        """The name to give the vmm driver: the domain's UUID."""
        return self.domain.uuid


def domain_ref(vm: Vm) -> str:
    ref = vm.uuid or vm.deploy_id
    if not ref:
        raise ActionError(f"VM {vm.id} has no domain UUID (TEMPLATE/OS/UUID) and no DEPLOY_ID")
    return ref


async def _probe(links: HostLinks, host: Host, ref: str) -> DomainInfo | DriverError | None:
    """The domain on ``host``; None when the host does not have it; the error when it cannot be asked."""
    try:
        return await links.vmm(host).find(ref)
    except DomainNotFound:
        return None
    except DriverError as exc:
        return exc


async def locate(state: State, links: HostLinks, vm: Vm, now: int) -> Placement:
    """Find the VM's domain, following it to another registered host when it moved there."""
    bound = vm.host
    if bound is None:
        raise ActionError(f"VM {vm.id} is not bound to a host (import it or deploy it first)", retryable=True)
    ref = domain_ref(vm)
    current = state.hosts.find(bound[0])
    if current is not None:
        found = await _probe(links, current, ref)
        if isinstance(found, DomainInfo):
            return Placement(vm, current, links.vmm(current), found, links.runner(current))
        home_error = found
    else:
        home_error = None
    others = [h for h in state.hosts.all() if h.id != bound[0]]
    answers = await asyncio.gather(*(_probe(links, host, ref) for host in others))
    for host, answer in zip(others, answers, strict=True):
        if isinstance(answer, DomainInfo):
            moved = await follow(state, vm.id, host, answer, now)
            return Placement(moved, host, links.vmm(host), answer, links.runner(host))
    if home_error is not None:
        raise home_error
    unreachable = [f"{h.name} ({a})" for h, a in zip(others, answers, strict=True) if isinstance(a, DriverError)]
    message = f"domain {ref} of VM {vm.id} is on no registered host (last seen on {bound[1]})"
    if unreachable:
        message += f"; not asked, unreachable: {', '.join(unreachable)}"
    raise ActionError(message)


async def follow(state: State, vm_id: int, host: Host, domain: DomainInfo, now: int) -> Vm:
    """Record that the VM's domain now lives on ``host`` (one transaction: the VM and both hosts)."""
    async with state.mutation() as m:
        vm = state.vms.editable(vm_id)
        was = vm.host
        bind(m, vm, host, now)
        vm.deploy_id = domain.name
        set_states(vm, *vm_states(domain.state))
        m.put("vm", vm)
    log.warning("VM %s: domain %s is now on host %s (was on %s); the VM follows it", vm_id, domain.uuid,
                host.name, was[1] if was else "no host")
    return vm


def bind(m: Mutation, vm: Vm, host: Host, now: int) -> None:
    """Inside a mutation: place ``vm`` (an editable copy) on ``host`` unless it is there already: close
    its current HISTORY record, open one on ``host``, move the VM between the hosts' VMS lists."""
    state = m.state
    old = vm.history[-1] if vm.history else None
    if old is not None and old.hid == host.id:
        return
    if old is not None:
        old.etime = old.etime or now
        previous = state.hosts.find(old.hid)
        if previous is not None and vm.id in previous.vms:
            previous = state.hosts.editable(old.hid)
            previous.vms = [i for i in previous.vms if i != vm.id]
            m.put("host", previous)
    vm.history.append(History(seq=len(vm.history), hostname=host.name, hid=host.id, stime=now,
                              ds_id=old.ds_id if old else 0))
    target = state.hosts.editable(host.id)
    target.vms = sorted({*target.vms, vm.id})
    m.put("host", target)


async def record_domain_state(state: State, vm_id: int, domain_state: DomainState) -> Vm:
    """Make the VM's STATE/LCM_STATE match its domain's state (a copy, put back; never in place)."""
    async with state.mutation() as m:
        vm = state.vms.editable(vm_id)
        if set_states(vm, *vm_states(domain_state)):
            m.put("vm", vm)
    return vm


async def locate_for_run(ctx: RunContext) -> Placement:
    """:func:`locate` for an action's run (``scheduler.actions.base.RunContext``): the first thing a run
    that touches a domain does. The VM is read again: the one the run started with may be stale."""
    vm = ctx.state.vms.find(ctx.vm.id) or ctx.vm
    return await locate(ctx.state, ctx.connections("actions on domains cannot run"), vm, int(ctx.clock.now()))


async def sync_state(ctx: RunContext, where: Placement) -> str:
    """Set the VM's STATE/LCM_STATE from its domain's state now; its ``STATE/LCM`` names, or why not."""
    try:
        vm = await record_domain_state(ctx.state, ctx.vm.id, await where.kvm.state(where.ref))
    except DriverError as exc:
        ctx.log.warning("VM %s: state not updated: %s", ctx.vm.id, exc)
        return f"in an unknown state ({exc})"
    return f"{vm.state.name}/{vm.lcm_state.name}"
