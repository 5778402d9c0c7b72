"""one.vm.* and one.vmpool.*: the VMs vmsched backs up.

A VM starts unbound: STATE PENDING (or HOLD when allocated on hold), LCM_STATE LCM_INIT, no history.
It gets a host either by import from a host or by ``one.vm.deploy(vm, host)``, which in vmsched means
"its libvirt domain already runs on that host": a HISTORY record is opened there and the VM becomes
ACTIVE/RUNNING. Only a bound VM can be backed up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from scheduler.api.common import parse_request_template, pool_slice
from scheduler.api.context import Context
from scheduler.api.permissions import Caller, Right, require, require_admin
from scheduler.api.registry import registry
from scheduler.api.rpc import Param
from scheduler.api.schedactions import actions_of, delete_actions, parse_actions, store_actions
from scheduler.errors import ActionError, ValidationError
from scheduler.model import backup_config as backups
from scheduler.model.objects.common import check_name
from scheduler.model.objects.states import LcmState, VmState
from scheduler.model.objects.vm import History, Vm, split_vm_template
from scheduler.model.template import Template, Vector

KIND = "vm"
# What one.vm.updateconf may change (OpenNebula's list, plus BACKUP_CONFIG).
UPDATECONF_VECTORS = ("OS", "FEATURES", "INPUT", "GRAPHICS", "RAW", "CONTEXT", "CPU_MODEL", "VIDEO", "BACKUP_CONFIG")
RECOVER_DELETE = 3
RECOVER_DELETE_DB = 5
_BACKING_UP = (LcmState.BACKUP, LcmState.BACKUP_POWEROFF, LcmState.RESTORE)  # its disks are being read or written


def number_disks(template: Template) -> None:
    """Give every DISK a DISK_ID (kept when given), as OpenNebula does at allocation."""
    used = {int(d["DISK_ID"]) for d in template.vectors("DISK") if (d.get("DISK_ID") or "").isdigit()}
    next_id = 0
    for disk in template.vectors("DISK"):
        if (disk.get("DISK_ID") or "").isdigit():
            continue
        while next_id in used:
            next_id += 1
        disk["DISK_ID"] = str(next_id)
        used.add(next_id)


def _backup_config_input(template: Template) -> Vector | None:
    vectors = template.remove("BACKUP_CONFIG")
    if not vectors:
        return None
    if len(vectors) > 1 or not isinstance(vectors[0], Vector):
        raise ValidationError("BACKUP_CONFIG must be one vector attribute: BACKUP_CONFIG = [ KEEP_LAST = ..., ... ]")
    return vectors[0]


def _can_increment(template: Template, config: Vector | None) -> bool:
    volatile = (config.get("BACKUP_VOLATILE") or "NO").upper() == "YES" if config else False
    return backups.can_increment(template.vectors("DISK"), False, volatile)


@registry.method("one.vm.allocate", Param("template", str), Param("hold", bool, False))
async def allocate(ctx: Context, caller: Caller, text: str, hold: bool) -> int:
    template = parse_request_template(text, "VM template")
    name = template.get("NAME")
    template.remove("NAME")
    sched_actions = template.remove("SCHED_ACTION")
    user_config = _backup_config_input(template)
    number_disks(template)
    config = backups.parse_backup_config(
        backups.default_backup_config(), user_config, can_increment=_can_increment(template, user_config), append=False
    )
    vm_template, user_template = split_vm_template(template)
    async with ctx.state.mutation() as m:
        vm_id = await m.new_id(KIND)
        vm = Vm(
            id=vm_id,
            name=check_name(name, "VM") if name else f"one-{vm_id}",
            ownership=caller.ownership,
            state=VmState.HOLD if hold else VmState.PENDING,
            lcm_state=LcmState.LCM_INIT,
            stime=ctx.now(),
            template=vm_template,
            user_template=user_template,
            backup_config=config,
        )
        vm.template.set("VMID", str(vm_id))
        actions = parse_actions(ctx.state, vm, sched_actions, origin=vm.stime)
        m.put(KIND, vm)  # before its actions: their rows take the VM's owner
        await store_actions(m, vm, actions)
    return vm_id


@registry.method("one.vm.info", Param("id", int), Param("decrypt", bool, False))
async def info(ctx: Context, caller: Caller, vm_id: int, decrypt: bool) -> str:
    vm = ctx.state.vms.get(vm_id)
    require(caller, vm.ownership.uid, Right.USE, "VM", vm_id, "info")
    return _full_body(ctx, vm)


@registry.method("one.vm.update", Param("id", int), Param("template", str), Param("type", int, 0))
async def update(ctx: Context, caller: Caller, vm_id: int, text: str, merge: int) -> int:
    if merge not in (0, 1):
        raise ValidationError(f"update type must be 0 (replace) or 1 (merge), got {merge}")
    incoming = parse_request_template(text, f"VM {vm_id} user template")
    async with ctx.state.mutation() as m:
        vm = ctx.state.vms.editable(vm_id)
        require(caller, vm.ownership.uid, Right.MANAGE, "VM", vm_id, "update")
        if merge:
            vm.user_template.merge(incoming)
        else:
            vm.user_template = incoming
        m.put(KIND, vm)
    return vm_id


@registry.method("one.vm.updateconf", Param("id", int), Param("template", str), Param("type", int, 0))
async def updateconf(ctx: Context, caller: Caller, vm_id: int, text: str, merge: int) -> int:
    if merge not in (0, 1):
        raise ValidationError(f"updateconf type must be 0 (replace) or 1 (merge), got {merge}")
    incoming = parse_request_template(text, f"VM {vm_id} configuration")
    unknown = sorted(set(incoming.names()) - set(UPDATECONF_VECTORS))
    if unknown:
        raise ValidationError(
            f"updateconf cannot change {', '.join(unknown)}; it changes {', '.join(UPDATECONF_VECTORS)}"
        )
    async with ctx.state.mutation() as m:
        vm = ctx.state.vms.editable(vm_id)
        require(caller, vm.ownership.uid, Right.MANAGE, "VM", vm_id, "updateconf")
        user_config = _backup_config_input(incoming)
        if user_config is not None:
            if vm.lcm_state in _BACKING_UP:
                raise ActionError(f"VM {vm_id} is being backed up or restored; change BACKUP_CONFIG when that has ended")
            _apply_backup_config(vm, user_config, append=bool(merge))
        for name in incoming.names():
            vm.template.remove(name)
            for value in incoming.values(name):
                vm.template.add(name, value)
        m.put(KIND, vm)
    return vm_id


def _apply_backup_config(vm: Vm, user_config: Vector, append: bool) -> None:
    volatile_input = user_config.get("BACKUP_VOLATILE")
    volatile = (volatile_input or vm.backup_config.get("BACKUP_VOLATILE") or "NO").upper() == "YES"
    disks = vm.template.vectors("DISK")
    wants_increment = (user_config.get("MODE") or "").upper() == "INCREMENT"
    refusal = backups.increment_refusal(disks, False, volatile)
    if wants_increment and refusal:
        raise ActionError(refusal)
    vm.backup_config = backups.parse_backup_config(
        vm.backup_config, user_config, can_increment=refusal is None, append=append
    )


@registry.method("one.vm.rename", Param("id", int), Param("name", str))
async def rename(ctx: Context, caller: Caller, vm_id: int, name: str) -> int:
    name = check_name(name, "VM")
    async with ctx.state.mutation() as m:
        vm = ctx.state.vms.editable(vm_id)
        require(caller, vm.ownership.uid, Right.MANAGE, "VM", vm_id, "rename")
        vm.name = name
        m.put(KIND, vm)
    return vm_id


@registry.method("one.vm.recover", Param("id", int), Param("operation", int))
async def recover(ctx: Context, caller: Caller, vm_id: int, operation: int) -> int:
    require_admin(caller, "recover VMs")
    if operation not in (RECOVER_DELETE, RECOVER_DELETE_DB):
        raise ValidationError(
            f"recover operation {operation} is not supported; vmsched supports 3 (delete: unregister the VM, "
            "keeping its backups and leaving its libvirt domain alone)"
        )
    async with ctx.state.mutation() as m:
        vm = ctx.state.vms.get(vm_id)
        if vm.lcm_state in _BACKING_UP:
            raise ActionError(f"VM {vm_id} is being backed up or restored; cancel or wait for it before deleting the VM")
        bound = vm.host
        if bound is not None:
            host = ctx.state.hosts.find(bound[0])
            if host is not None and vm_id in host.vms:
                host = ctx.state.hosts.editable(host.id)
                host.vms = [i for i in host.vms if i != vm_id]
                m.put("host", host)
        delete_actions(m, vm)
        m.delete(KIND, vm_id)
    return vm_id


@registry.method("one.vm.deploy", Param("id", int), Param("host_id", int), Param("enforce", bool, False),
                 Param("ds_id", int, -1), Param("nic_template", str, ""))
async def deploy(ctx: Context, caller: Caller, vm_id: int, host_id: int, enforce: bool, ds_id: int, nic: str) -> int:
    require_admin(caller, "bind VMs to hosts")
    async with ctx.state.mutation() as m:
        vm = ctx.state.vms.editable(vm_id)
        host = ctx.state.hosts.editable(host_id)
        if vm.history:
            raise ActionError(f"VM {vm_id} is already bound to host {vm.history[-1].hostname}")
        if vm.state not in (VmState.PENDING, VmState.HOLD):
            raise ActionError(f"VM {vm_id} cannot be bound in state {vm.state.name}")
        now = ctx.now()
        vm.history.append(History(seq=0, hostname=host.name, hid=host.id, stime=now, ds_id=max(ds_id, 0)))
        vm.prev_state, vm.prev_lcm_state = vm.state, vm.lcm_state
        vm.state, vm.lcm_state = VmState.ACTIVE, LcmState.RUNNING
        host.vms = sorted({*host.vms, vm_id})
        m.put(KIND, vm)
        m.put("host", host)
    return vm_id


def _state_matches(vm: Vm, state: int) -> bool:
    if state == -2:
        return True
    if state == -1:
        return vm.state != VmState.DONE
    return int(vm.state) == state


async def _pool(ctx: Context, caller: Caller, pool_filter: int, start: int, end: int, state: int, extended: bool) -> str:
    if state < -2:
        raise ValidationError(f"state filter must be -2 (any), -1 (any but DONE) or a VM state, got {state}")
    vms = [vm for vm in pool_slice(caller, ctx.state.vms.all(), pool_filter, start, end) if _state_matches(vm, state)]
    if not extended:
        return ctx.xml.pool("VM_POOL", KIND, vms, "short", _short)
    return ctx.xml.pool("VM_POOL", KIND, vms, "full", _full_builder(ctx), lambda vm: _deps(ctx, vm))


def _full_body(ctx: Context, vm: Vm) -> str:
    """The vm.xsd body with the VM's scheduled actions and, while one of its actions waits, why
    (USER_TEMPLATE/SCHED_MESSAGE); cached until the VM, one of its actions or that reason changes."""
    return ctx.xml.body(KIND, vm, "full", _full_builder(ctx), deps=_deps(ctx, vm))


def _deps(ctx: Context, vm: Vm) -> tuple[object, ...]:
    return (*actions_of(ctx.state, vm), _waiting(ctx, vm) or "")


def _waiting(ctx: Context, vm: Vm) -> str | None:
    return ctx.engine.waiting_reason(vm.id) if ctx.engine is not None else None


def _full_builder(ctx: Context) -> Callable[[Vm], str]:
    def build(vm: Vm) -> str:
        reason = _waiting(ctx, vm)
        if reason:
            vm = dataclasses.replace(vm, user_template=vm.user_template.copy())
            vm.user_template.set("SCHED_MESSAGE", reason)
        return vm.to_xml(extended=True, sched_actions=[action.to_vector() for action in actions_of(ctx.state, vm)])

    return build


def _short(vm: Vm) -> str:
    return vm.to_xml(extended=False)


@registry.method("one.vmpool.info", Param("filter", int, -2), Param("start", int, -1), Param("end", int, -1),
                 Param("state", int, -1))
async def pool_info(ctx: Context, caller: Caller, pool_filter: int, start: int, end: int, state: int) -> str:
    return await _pool(ctx, caller, pool_filter, start, end, state, extended=False)


@registry.method("one.vmpool.infoextended", Param("filter", int, -2), Param("start", int, -1), Param("end", int, -1),
                 Param("state", int, -1), Param("query", str, ""))
async def pool_infoextended(ctx: Context, caller: Caller, pool_filter: int, start: int, end: int, state: int,
                            query: str) -> str:
    return await _pool(ctx, caller, pool_filter, start, end, state, extended=True)
