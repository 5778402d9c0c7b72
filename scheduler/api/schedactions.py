"""one.vm.schedadd / schedupdate / scheddelete, and the scheduled actions of a VM's template.

Scheduled actions are objects of their own (kind ``schedaction``, spec §2.1): a ``SchedAction``
whose ``parent_id`` is the VM; the VM keeps their ids in ``Vm.sched_actions`` and shows them in its
TEMPLATE as SCHED_ACTION. Changing them needs MANAGE on the VM (OpenNebula's ``sched-action``
operation), so a VM's owner may schedule its backups (spec §10.3). Relative times ("+N") count
from the VM's STIME, or from the creation instant for the actions of a new VM's template.
"""

from __future__ import annotations

from dataclasses import replace

from scheduler.actions.registry import check_action, validate_action
from scheduler.api.common import parse_request_template
from scheduler.api.context import Context
from scheduler.api.permissions import Caller, Right, require
from scheduler.api.registry import registry
from scheduler.api.rpc import Param
from scheduler.errors import ActionError, NotFound, ValidationError
from scheduler.model.objects.states import VmState
from scheduler.model.objects.vm import Vm
from scheduler.model.schedule import SchedAction, parse_sched_action
from scheduler.model.template import Template, Value, Vector
from scheduler.store.state import Mutation, State

KIND = "schedaction"
VM_KIND = "vm"


def parse_actions(state: State, vm: Vm, values: list[Value], origin: int) -> list[SchedAction]:
    """The SCHED_ACTION values of a template, validated; the first problem names its index."""
    actions = []
    for index, value in enumerate(values):
        try:
            actions.append(_parse_one(state, vm, value, origin))
        except ValidationError as exc:
            raise ValidationError(f"SCHED_ACTION #{index}: {exc}") from None
    return actions


def _parse_one(state: State, vm: Vm, value: object, origin: int, current: SchedAction | None = None) -> SchedAction:
    if not isinstance(value, Vector):
        raise ValidationError("must be a vector: SCHED_ACTION = [ ACTION = ..., TIME = ..., ... ]")
    action = parse_sched_action(value, origin=origin, current=current, validate_action=validate_action)
    check_action(state, vm, action.action, action.args)
    return action


async def store_actions(m: Mutation, vm: Vm, actions: list[SchedAction]) -> list[int]:
    """Put ``actions`` as objects of ``vm`` (which the caller puts) and record their ids in it."""
    ids = []
    for action in actions:
        stored = replace(action, id=await m.new_id(KIND), parent_id=vm.id, type="VM")
        m.put(KIND, stored)
        ids.append(stored.id)
    vm.sched_actions = sorted({*vm.sched_actions, *ids})
    return ids


def delete_actions(m: Mutation, vm: Vm) -> None:
    for sa_id in vm.sched_actions:
        m.delete(KIND, sa_id)


def actions_of(state: State, vm: Vm) -> tuple[SchedAction, ...]:
    """The current action objects of ``vm``, by id."""
    found = (state.schedactions.find(sa_id) for sa_id in vm.sched_actions)
    return tuple(action for action in found if action is not None)


def _one_vector(text: str, what: str) -> Vector:
    template: Template = parse_request_template(text, what)
    values = template.values("SCHED_ACTION")
    if len(values) != 1 or not isinstance(values[0], Vector):
        raise ValidationError(
            f"{what} must hold one SCHED_ACTION vector: SCHED_ACTION = [ ACTION = ..., TIME = ..., ... ]"
        )
    return values[0]


def _managed_vm(ctx: Context, caller: Caller, vm_id: int, operation: str) -> Vm:
    vm = ctx.state.vms.get(vm_id)
    require(caller, vm.ownership.uid, Right.MANAGE, "VM", vm_id, operation)
    if vm.state == VmState.DONE:
        raise ActionError(f"VM {vm_id} is in state DONE: it has no scheduled actions")
    return vm


def _action_of(ctx: Context, vm: Vm, sa_id: int) -> SchedAction:
    action = ctx.state.schedactions.find(sa_id)
    if action is None or action.type != "VM" or action.parent_id != vm.id or sa_id not in vm.sched_actions:
        raise NotFound(f"Error getting scheduled action [{sa_id}] of virtual machine [{vm.id}].")
    return action


@registry.method("one.vm.schedadd", Param("id", int), Param("template", str))
async def schedadd(ctx: Context, caller: Caller, vm_id: int, text: str) -> int:
    vector = _one_vector(text, f"scheduled action for VM {vm_id}")
    async with ctx.state.mutation() as m:
        vm = _managed_vm(ctx, caller, vm_id, "sched-action")
        action = _parse_one(ctx.state, vm, vector, vm.stime)
        vm = ctx.state.vms.editable(vm_id)
        (sa_id,) = await store_actions(m, vm, [action])
        m.put(VM_KIND, vm)
    return sa_id


@registry.method("one.vm.schedupdate", Param("id", int), Param("sched_id", int), Param("template", str))
async def schedupdate(ctx: Context, caller: Caller, vm_id: int, sa_id: int, text: str) -> int:
    vector = _one_vector(text, f"scheduled action {sa_id} of VM {vm_id}")
    async with ctx.state.mutation() as m:
        vm = _managed_vm(ctx, caller, vm_id, "sched-action")
        current = _action_of(ctx, vm, sa_id)
        m.put(KIND, _parse_one(ctx.state, vm, vector, vm.stime, current))
    return sa_id


@registry.method("one.vm.scheddelete", Param("id", int), Param("sched_id", int))
async def scheddelete(ctx: Context, caller: Caller, vm_id: int, sa_id: int) -> int:
    async with ctx.state.mutation() as m:
        vm = ctx.state.vms.get(vm_id)
        require(caller, vm.ownership.uid, Right.MANAGE, "VM", vm_id, "sched-action")
        _action_of(ctx, vm, sa_id)
        vm = ctx.state.vms.editable(vm_id)
        vm.sched_actions = [i for i in vm.sched_actions if i != sa_id]
        m.delete(KIND, sa_id)
        m.put(VM_KIND, vm)
    return sa_id
