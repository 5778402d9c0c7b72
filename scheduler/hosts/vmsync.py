"""VM STATE/LCM_STATE kept in step with libvirt: lifecycle events, and every monitoring round.

Whether a backup is live or cold depends on the VM's state, so it must follow what happens outside
vmsched (an admin's ``virsh suspend``, a guest shutting itself down). Events give it within
moments; the monitoring round's poll repairs anything an event missed (events are lost while a
connection is down). VMs in the middle of a vmsched operation (BACKUP, BACKUP_POWEROFF, RESTORE) are
left alone: the operation owns their state. A VM whose domain runs on another registered host than the one
it is bound to (a live migration) follows it there, as an action that locates it would.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from drivers.vmm.states import DomainState, StateChange
from scheduler.errors import DriverError
from scheduler.hosts.links import Daemon
from scheduler.hosts.placement import domain_ref, follow
from scheduler.hosts.vmimport import vm_states
from scheduler.model.objects.states import LcmState, VmState
from scheduler.model.objects.vm import Vm

log = logging.getLogger(__name__)

OWNED_BY_OPERATION = frozenset({LcmState.BACKUP, LcmState.BACKUP_POWEROFF, LcmState.RESTORE})


def state_updates(vms: Iterable[Vm], host_id: int, domains: Mapping[str, DomainState]
                  ) -> list[tuple[Vm, VmState, LcmState]]:
    """The VMs bound to ``host_id`` whose state differs from their domain's (pure)."""
    updates = []
    for vm in vms:
        bound = vm.host
        uuid = (vm.uuid or "").lower()
        if bound is None or bound[0] != host_id or not uuid or uuid not in domains:
            continue
        if vm.lcm_state in OWNED_BY_OPERATION:
            continue
        state, lcm = vm_states(domains[uuid])
        if (vm.state, vm.lcm_state) != (state, lcm):
            updates.append((vm, state, lcm))
    return updates


def arrivals(vms: Iterable[Vm], host_id: int, domains: Mapping[str, DomainState]) -> list[Vm]:
    """The VMs bound to another host whose domain runs on ``host_id`` (pure): moved here. Only a running
    domain counts: an incoming migration's is paused until it is done, a defined one may be a leftover."""
    return [vm for vm in vms if vm.host is not None and vm.host[0] != host_id and vm.uuid
            and domains.get(vm.uuid.lower()) is DomainState.RUNNING and vm.lcm_state not in OWNED_BY_OPERATION]


class VmStateSync:
    def __init__(self, ctx: Daemon) -> None:
        self.ctx = ctx
        self._watched: dict[int, Any] = {}  # host id -> the KvmHost we subscribed to
        self._tasks: set[asyncio.Task[None]] = set()

    async def poll(self, host: Any) -> None:
        """Read every domain's state on the host and correct the VMs bound to it."""
        states = await self.ctx.connections("VM states cannot be read").vmm(host).poll_states()
        await self._apply(host, {uuid.lower(): st for uuid, st in states.items()})
        await self._watch(host)

    async def _watch(self, host: Any) -> None:
        kvm = self.ctx.connections("VM states cannot be read").vmm(host)
        if self._watched.get(host.id) is kvm:
            return
        host_id = host.id

        def on_change(change: StateChange) -> None:
            current = self.ctx.state.hosts.find(host_id)
            if current is not None:
                task = asyncio.get_running_loop().create_task(self._apply(current, {change.uuid.lower(): change.state}))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        await kvm.watch_states(on_change)
        self._watched[host.id] = kvm

    async def _apply(self, host: Any, domains: Mapping[str, DomainState]) -> None:
        state = self.ctx.state
        async with state.lock:
            for vm, new_state, new_lcm in state_updates(state.pools["vm"].values(), host.id, domains):
                changed = copy.deepcopy(vm)
                changed.prev_state, changed.prev_lcm_state = vm.state, vm.lcm_state
                changed.state, changed.lcm_state = new_state, new_lcm
                state.update_soon("vm", changed)
                log.info("VM %s (%s) on host %s is now %s/%s (was %s/%s)", vm.id, vm.name, host.name,
                         new_state.name, new_lcm.name, vm.state.name, vm.lcm_state.name)
            moved = arrivals(state.pools["vm"].values(), host.id, domains)
        for vm in moved:
            await self._follow(host, vm)
        await state.durable()

    async def _follow(self, host: Any, vm: Vm) -> None:
        try:
            found = await self.ctx.connections("VMs cannot be followed").vmm(host).find(domain_ref(vm))
        except DriverError as exc:
            log.warning("VM %s: its domain seemed to run on host %s, but reading it there failed: %s", vm.id,
                        host.name, exc)
            return
        if found.state is DomainState.RUNNING:
            await follow(self.ctx.state, vm.id, host, found, int(self.ctx.now()))
