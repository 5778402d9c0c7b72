"""The actions registry (scheduler/actions/): ARGS of every action, refused actions, runs that refuse."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from scheduler.actions.backup import BackupArgs, parse_args
from scheduler.actions.base import RunContext
from scheduler.actions.registry import ACTIONS, WITHOUT_MEANING, check_action, is_backup, spec_of, validate_action
from scheduler.actions.snapshot import refuse_under_overlays
from scheduler.engine.clock import ManualClock
from scheduler.errors import ActionError, ValidationError
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.states import DatastoreType
from scheduler.model.objects.vm import Vm
from scheduler.model.schedule import VM_ACTIONS, SchedAction, parse_sched_action
from scheduler.model.template import Vector
from scheduler.store.codecs import build_codecs
from scheduler.store.sqlite import Store
from scheduler.store.state import State

POWER = ("poweroff", "poweroff-hard", "reboot", "reboot-hard", "suspend", "resume")
SNAPSHOT = (
    "snapshot-create", "snapshot-revert", "snapshot-delete",
    "disk-snapshot-create", "disk-snapshot-revert", "disk-snapshot-delete",
)  # fmt: skip


def test_registry_covers_every_opennebula_action_once() -> None:
    assert set(ACTIONS) == {"backup", "restore", *POWER, *SNAPSHOT}
    assert WITHOUT_MEANING == {"terminate", "terminate-hard", "undeploy", "undeploy-hard", "hold", "release", "stop"}
    assert (set(ACTIONS) - {"restore"}) | WITHOUT_MEANING == VM_ACTIONS  # restore: only one.vm.restore starts it
    assert {name: spec.family for name, spec in ACTIONS.items()} == {
        "backup": "backup",
        "restore": "restore",
        **dict.fromkeys(POWER, "power"),
        **dict.fromkeys(SNAPSHOT, "snapshot"),
    }
    assert [name for name, spec in ACTIONS.items() if spec.is_backup] == ["backup"]
    assert [is_backup(name) for name in ("backup", "reboot", "snapshot-create", "terminate", "nope")] == [
        True, False, False, False, False
    ]  # fmt: skip


GOOD = [
    ("backup", "100"),
    ("backup", "100,0"),
    ("backup", "100,1"),
    ("backup", " 100 , 1 "),
    *((name, "") for name in POWER),
    ("poweroff", "   "),
    ("snapshot-create", "nightly"),
    ("snapshot-revert", "3"),
    ("snapshot-delete", "0"),
    ("disk-snapshot-create", "1,before-upgrade"),
    ("disk-snapshot-revert", "1,2"),
    ("disk-snapshot-delete", "0, 7"),
]


@pytest.mark.parametrize(("action", "args"), GOOD)
def test_well_formed_args_are_accepted(action: str, args: str) -> None:
    validate_action(action, args)


BAD = [
    ("backup", "", "ds_id[,reset]"),
    ("backup", "ds", "ds_id[,reset]"),
    ("backup", "100,2", "ds_id[,reset]"),
    ("backup", "100,yes", "ds_id[,reset]"),
    ("backup", "100,0,1", "ds_id[,reset]"),
    ("backup", "100,", "ds_id[,reset]"),
    ("backup", "1.5", "ds_id[,reset]"),
    *((name, "1", "none") for name in POWER),
    ("snapshot-create", "", "name"),
    ("snapshot-create", "a,b", "name"),
    ("snapshot-revert", "", "snap_id"),
    ("snapshot-revert", "first", "snap_id"),
    ("snapshot-delete", "-1", "snap_id"),
    ("disk-snapshot-create", "1", "disk_id,name"),
    ("disk-snapshot-create", "x,name", "disk_id,name"),
    ("disk-snapshot-create", "1,", "disk_id,name"),
    ("disk-snapshot-revert", "1", "disk_id,snap_id"),
    ("disk-snapshot-revert", "1,a", "disk_id,snap_id"),
    ("disk-snapshot-delete", "1,2,3", "disk_id,snap_id"),
]


@pytest.mark.parametrize(("action", "args", "fmt"), BAD)
def test_malformed_args_get_opennebulas_message(action: str, args: str, fmt: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_action(action, args)
    assert str(caught.value) == f"Missing or malformed ARGS for: {action}. Format: {fmt}"


@pytest.mark.parametrize("action", sorted(WITHOUT_MEANING))
def test_actions_without_meaning_are_refused_with_the_supported_list(action: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_action(action, "")
    assert str(caught.value) == (
        f"{action} has no meaning for a libvirt domain managed by vmsched; supported actions: "
        "backup, poweroff, poweroff-hard, reboot, reboot-hard, suspend, resume, snapshot-create, snapshot-revert, "
        "snapshot-delete, disk-snapshot-create, disk-snapshot-revert, disk-snapshot-delete"
    )


@pytest.mark.parametrize("action", ["resize", "Backup", "backup ", ""])
def test_unknown_actions_are_not_supported(action: str) -> None:
    with pytest.raises(ValidationError, match=rf"^{action} is not supported\.$"):
        spec_of(action)


@pytest.mark.parametrize(
    ("args", "parsed"), [("7", BackupArgs(7, False)), ("7,0", BackupArgs(7, False)), ("7,1", BackupArgs(7, True))]
)
def test_backup_args_single_token_means_no_reset(args: str, parsed: BackupArgs) -> None:
    assert parse_args(args) == parsed


def test_the_registry_is_parse_sched_actions_hook() -> None:
    vector = Vector({"ACTION": "terminate", "TIME": "+60"})
    with pytest.raises(ValidationError, match="terminate has no meaning"):
        parse_sched_action(vector, origin=0, validate_action=validate_action)
    vector = Vector({"ACTION": "backup", "ARGS": "100,1", "TIME": "+60"})
    assert parse_sched_action(vector, origin=1000, validate_action=validate_action).time == 1060


# -- checks against the objects ------------------------------------------------------------------


@pytest.fixture
async def state(tmp_path: Path):
    store = await Store.open(tmp_path / "s.db")
    state = State(store, build_codecs())
    await state.load()
    async with state.mutation() as m:
        m.put("datastore", Datastore(id=0, name="images", type=DatastoreType.IMAGE_DS))
        m.put("datastore", Datastore(id=1, name="backups", type=DatastoreType.BACKUP_DS, ds_mad="rsync"))
    yield state
    await store.close()


@pytest.mark.parametrize(
    ("action", "args", "config", "message"),
    [
        ("backup", "1", {}, None),
        ("backup", "1,1", {"BACKUP_JOB_ID": "-1"}, None),
        ("backup", "0", {}, "Datastore 0 is not of type BACKUP"),
        ("backup", "9", {}, "Error getting datastore [9]"),
        ("backup", "1", {"BACKUP_JOB_ID": "4"}, "VM 3 is part of backup job 4, which schedules its backups"),
        ("backup", "x", {}, "Missing or malformed ARGS for: backup. Format: ds_id[,reset]"),
        ("reboot", "", {"BACKUP_JOB_ID": "4"}, None),
        ("hold", "", {}, "hold has no meaning"),
    ],
)
def test_check_against_the_objects(state: State, action: str, args: str, config: dict, message: str | None) -> None:
    vm = Vm(id=3, name="db", backup_config=Vector(config))
    if message is None:
        check_action(state, vm, action, args)
    else:
        with pytest.raises(ValidationError) as caught:
            check_action(state, vm, action, args)
        assert str(caught.value).startswith(message)


# -- runs refuse honestly ------------------------------------------------------------------------


@pytest.mark.parametrize("action", [name for name in ACTIONS if name not in ("backup", "restore")])
async def test_runs_refuse_honestly_when_they_cannot_act(state: State, action: str) -> None:
    """Domain actions need host connections; without them they fail, never pretending success."""
    ctx = RunContext(
        run_id=1,
        vm=Vm(id=3, name="db"),
        args="",
        action=SchedAction(id=5, parent_id=3, action=action),
        state=state,
        clock=ManualClock(),
        log=logging.LoggerAdapter(logging.getLogger("test"), {}),
        cancelled=asyncio.Event(),
    )
    expected = "this daemon has no host connections; actions on domains cannot run"
    with pytest.raises(ActionError) as caught:
        await ACTIONS[action].run(ctx)
    assert expected in str(caught.value)


@pytest.mark.parametrize(("config", "refused"), [
    ({"MODE": "INCREMENT", "INCREMENT_MODE": "SNAPSHOT"}, True),
    ({"MODE": "INCREMENT", "INCREMENT_MODE": "CBT"}, False),
    ({"MODE": "FULL", "INCREMENT_MODE": "SNAPSHOT"}, False),
    ({}, False),
])
def test_snapshots_are_refused_while_the_vm_runs_on_backup_overlays(config: dict[str, str], refused: bool) -> None:
    vm = Vm(id=3, name="db", backup_config=Vector(config))
    if not refused:
        refuse_under_overlays(vm, "a system snapshot")
        return
    with pytest.raises(ActionError, match="VM 3 is backed up with INCREMENT_MODE=SNAPSHOT.*a system snapshot inside"):
        refuse_under_overlays(vm, "a system snapshot")
