"""The registry of the actions a run may perform, one module per family (backup, power, snapshot, restore).

``ACTIONS`` maps every ACTION name vmsched runs to its ``ActionSpec``. OpenNebula actions that mean
nothing for a libvirt domain vmsched merely observes (terminate, undeploy, hold, stop, ...) are
refused with a message saying so; other names get OpenNebula's "<action> is not supported.".
"""

from __future__ import annotations

from scheduler.actions import backup, power, restore, snapshot
from scheduler.actions.base import ActionSpec, RunContext
from scheduler.errors import ValidationError
from scheduler.model.objects.vm import Vm
from scheduler.model.schedule import VM_ACTIONS
from scheduler.store.state import State

ACTIONS: dict[str, ActionSpec] = {spec.name: spec for spec in (*backup.SPECS, *power.SPECS, *snapshot.SPECS, *restore.SPECS)}
# OpenNebula's actions that vmsched gives no meaning.
WITHOUT_MEANING = frozenset(VM_ACTIONS - ACTIONS.keys())


def spec_of(action: str) -> ActionSpec:
    """The spec of a supported action; ValidationError (with the reason) otherwise."""
    spec = ACTIONS.get(action)
    if spec is not None:
        return spec
    if action in WITHOUT_MEANING:
        raise ValidationError(
            f"{action} has no meaning for a libvirt domain managed by vmsched; supported actions: {', '.join(a for a in ACTIONS if a in VM_ACTIONS)}"
        )
    raise ValidationError(f"{action} is not supported.")


def validate_action(action: str, args: str) -> None:
    """ACTION and its ARGS, alone (the ``validate_action`` hook of ``parse_sched_action``). Runs only the
    engine starts (``restore``: one.vm.restore) are no SCHED_ACTION, as in OpenNebula's VM_ACTIONS."""
    if action in ACTIONS and action not in VM_ACTIONS:
        raise ValidationError(f"{action} cannot be a scheduled action; it runs only through its own API call")
    spec_of(action).validate(args)


def is_backup(action: str) -> bool:
    """Whether runs of ``action`` pass backup admission (False for names vmsched does not run)."""
    spec = ACTIONS.get(action)
    return spec is not None and spec.is_backup


def check_action(state: State, vm: Vm, action: str, args: str) -> None:
    """ACTION and ARGS against the current objects (the backup datastore exists, ...)."""
    spec = spec_of(action)
    spec.validate(args)
    if spec.check is not None:
        spec.check(state, vm, args)


__all__ = [
    "ACTIONS",
    "WITHOUT_MEANING",
    "ActionSpec",
    "RunContext",
    "check_action",
    "is_backup",
    "spec_of",
    "validate_action",
]
