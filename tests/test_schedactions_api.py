"""Scheduled actions as objects through the XML-RPC API (spec §2.1, §2.9), against a real daemon."""

from __future__ import annotations

import sqlite3
import xmlrpc.client
from collections.abc import Iterator

import pyone
import pytest

from scheduler.api.render import XmlCache
from scheduler.model.schedule import SchedAction
from scheduler.store.codecs import build_codecs
from scheduler.store.sqlite import Row
from tests import xsd
from tests.conftest import Daemon, start_daemon

BACKUP_DS = 'NAME = "{name}"\nTYPE = "BACKUP_DS"\nDS_MAD = "restic"\nRESTIC_PASSWORD = "pw"\n'
IMAGE_DS = 'NAME = "{name}"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\n'
NO_EXISTS, AUTHORIZATION, INTERNAL = 0x400, 0x200, 0x2000


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = start_daemon(tmp_path_factory.mktemp("schedactions") / "state")
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.log()


@pytest.fixture(scope="module")
def datastores(shared: Daemon) -> dict[str, int]:
    admin = pyone.OneServer(shared.endpoint, session=shared.session)
    return {
        "backup": admin.datastore.allocate(BACKUP_DS.format(name="sched-backups")),
        "image": admin.datastore.allocate(IMAGE_DS.format(name="sched-images")),
    }


@pytest.fixture
def admin(shared: Daemon) -> pyone.OneServer:
    return pyone.OneServer(shared.endpoint, session=shared.session, timeout=30)


def call(daemon: Daemon, method: str, *args: object, session: str | None = None) -> list:
    with xmlrpc.client.ServerProxy(daemon.endpoint) as proxy:
        return getattr(proxy, method)(session or daemon.session, *args)


def actions_of(admin: pyone.OneServer, vm_id: int) -> list[dict[str, str]]:
    """The SCHED_ACTIONs of one.vm.info, as plain dicts of text."""
    found = admin.vm.info(vm_id).TEMPLATE.get("SCHED_ACTION", [])
    found = found if isinstance(found, list) else [found]
    return [{key: "" if value is None else str(value) for key, value in action.items()} for action in found]


def vm_with_actions(datastores: dict[str, int]) -> str:
    return f"""NAME = "scheduled"
MEMORY = 64
SCHED_ACTION = [ ACTION = "backup", ARGS = "{datastores["backup"]},1", TIME = "+3600", REPEAT = "0", DAYS = "1,5",
                 END_TYPE = "1", END_VALUE = "4" ]
SCHED_ACTION = [ ACTION = "reboot", TIME = "1900000000" ]
SCHED_ACTION = [ ACTION = "snapshot-create", ARGS = "nightly", TIME = "+60", CRON = "30 2 * * *" ]
"""


def test_allocate_stores_the_templates_actions(admin: pyone.OneServer, shared: Daemon, datastores) -> None:
    vm_id = admin.vm.allocate(vm_with_actions(datastores))
    vm = admin.vm.info(vm_id)
    stime = vm.STIME
    actions = actions_of(admin, vm_id)
    assert [a["ACTION"] for a in actions] == ["backup", "reboot", "snapshot-create"]
    ids = [int(a["ID"]) for a in actions]
    assert list(vm.SCHED_ACTIONS.ID) == ids and len(set(ids)) == 3
    backup, reboot, snapshot = actions
    assert backup == {
        "ID": str(ids[0]), "PARENT_ID": str(vm_id), "TYPE": "VM", "ACTION": "backup",
        "ARGS": f"{datastores['backup']},1", "TIME": str(stime + 3600), "REPEAT": "0", "DAYS": "1,5",
        "END_TYPE": "1", "END_VALUE": "4", "DONE": "-1", "MESSAGE": "", "WARNING": "0",
    }  # fmt: skip
    assert (reboot["TIME"], reboot["REPEAT"], reboot["ARGS"]) == ("1900000000", "-1", "")
    assert (snapshot["TIME"], snapshot["REPEAT"], snapshot["DAYS"]) == (str(stime + 60), "4", "30 2 * * *")
    assert "SCHED_ACTION" not in admin.vm.info(vm_id).USER_TEMPLATE
    for method, args, schema in [
        ("one.vm.info", (vm_id,), "vm"),
        ("one.vmpool.infoextended", (-2, -1, -1, -1), "vm_pool_extended"),
        ("one.vmpool.info", (-2, -1, -1, -1), "vm_pool"),
    ]:
        ok, body = call(shared, method, *args)[:2]
        assert ok, body
        xsd.validate(body, schema)
    ok, pool = call(shared, "one.vmpool.infoextended", -2, vm_id, vm_id, -1)[:2]
    assert ok and pool.count("<SCHED_ACTION>") == 3
    ok, short = call(shared, "one.vmpool.info", -2, vm_id, vm_id, -1)[:2]
    assert ok and "<SCHED_ACTION>" not in short


BAD_ACTIONS = [
    ('[ ACTION = "terminate", TIME = "+60" ]', "terminate has no meaning for a libvirt domain managed by vmsched"),
    ('[ ACTION = "backup", ARGS = "{backup},7", TIME = "+60" ]',
     "Missing or malformed ARGS for: backup. Format: ds_id[,reset]"),
    ('[ ACTION = "backup", ARGS = "{image}", TIME = "+60" ]', "Datastore {image} is not of type BACKUP"),
    ('[ ACTION = "backup", ARGS = "4242", TIME = "+60" ]', "Error getting datastore [4242]"),
    ('[ ACTION = "reboot", TIME = "tomorrow" ]', "Unable to parse the time value or value is empty: tomorrow"),
    ('[ ACTION = "reboot", TIME = "+60", REPEAT = "0", DAYS = "9" ]', "Days in a week have to be in [0,6] range"),
    ('"reboot"', "must be a vector"),
]  # fmt: skip


@pytest.mark.parametrize(("action", "message"), BAD_ACTIONS)
def test_allocate_is_all_or_nothing(admin: pyone.OneServer, shared: Daemon, datastores, action, message) -> None:
    before = len(admin.vmpool.info(-2, -1, -1, -1).VM)
    template = (
        f'NAME = "refused"\nSCHED_ACTION = [ ACTION = "reboot", TIME = "+60" ]\n'
        f"SCHED_ACTION = {action.format(**datastores)}\n"
    )
    ok, text, code = call(shared, "one.vm.allocate", template)[:3]
    assert (ok, code) == (False, INTERNAL)
    assert text.startswith(f"[one.vm.allocate] SCHED_ACTION #1: {message.format(**datastores)}"), text
    assert len(admin.vmpool.info(-2, -1, -1, -1).VM) == before


def test_schedadd_update_delete(admin: pyone.OneServer, shared: Daemon, datastores) -> None:
    vm_id = admin.vm.allocate('NAME = "sched-ops"')
    stime = admin.vm.info(vm_id).STIME
    assert actions_of(admin, vm_id) == []
    sa_id = admin.vm.schedadd(
        vm_id, f'SCHED_ACTION = [ ACTION = "backup", ARGS = "{datastores["backup"]}", TIME = "+7200" ]'
    )
    (added,) = actions_of(admin, vm_id)
    assert (added["ID"], added["TIME"], added["PARENT_ID"]) == (str(sa_id), str(stime + 7200), str(vm_id))
    assert list(admin.vm.info(vm_id).SCHED_ACTIONS.ID) == [sa_id]

    # Merge: only what is given changes; DONE and MESSAGE are never taken from input.
    update = 'SCHED_ACTION = [ TIME = "+600", REPEAT = "3", DAYS = "12", DONE = "5", MESSAGE = "forged" ]'
    assert admin.vm.schedupdate(vm_id, sa_id, update) == sa_id
    (updated,) = actions_of(admin, vm_id)
    assert (updated["ACTION"], updated["ARGS"]) == ("backup", str(datastores["backup"]))
    assert (updated["TIME"], updated["REPEAT"], updated["DAYS"]) == (str(stime + 600), "3", "12")
    assert (updated["DONE"], updated["MESSAGE"]) == ("-1", "")

    refused = call(shared, "one.vm.schedupdate", vm_id, sa_id, 'SCHED_ACTION = [ ACTION = "stop" ]')
    assert refused[0] is False and "stop has no meaning" in refused[1]
    assert actions_of(admin, vm_id)[0]["ACTION"] == "backup"

    second = admin.vm.schedadd(vm_id, 'SCHED_ACTION = [ ACTION = "suspend", TIME = "1900000000" ]')
    assert second != sa_id
    assert admin.vm.scheddelete(vm_id, sa_id) == sa_id
    assert [a["ID"] for a in actions_of(admin, vm_id)] == [str(second)]
    assert list(admin.vm.info(vm_id).SCHED_ACTIONS.ID) == [second]


def test_action_ids_are_checked_against_the_vm(admin: pyone.OneServer, shared: Daemon) -> None:
    first = admin.vm.allocate('NAME = "owner-a"\nSCHED_ACTION = [ ACTION = "reboot", TIME = "+60" ]')
    other = admin.vm.allocate('NAME = "owner-b"')
    sa_id = int(actions_of(admin, first)[0]["ID"])
    for method, args in [
        ("one.vm.schedupdate", (other, sa_id, 'SCHED_ACTION = [ TIME = "+1" ]')),
        ("one.vm.scheddelete", (other, sa_id)),
        ("one.vm.scheddelete", (first, 424242)),
    ]:
        ok, text, code = call(shared, method, *args)[:3]
        assert (ok, code) == (False, NO_EXISTS), text
        assert "Error getting scheduled action" in text
    assert actions_of(admin, first)[0]["TIME"] != ""  # untouched
    for template in ("", 'SCHED_ACTION = [ ACTION = "reboot", TIME = "+1" ]\n' * 2, 'SCHED_ACTION = "reboot"'):
        ok, text, code = call(shared, "one.vm.schedadd", first, template)[:3]
        assert (ok, code) == (False, INTERNAL) and "must hold one SCHED_ACTION vector" in text, text
    ok, text, code = call(shared, "one.vm.schedadd", 424242, 'SCHED_ACTION = [ ACTION = "reboot", TIME = "+1" ]')[:3]
    assert (ok, code) == (False, NO_EXISTS)


def test_owner_may_schedule_backups_of_their_vm_only(admin: pyone.OneServer, shared: Daemon, datastores) -> None:
    admin.user.allocate("dora", "dora-pw", "core", [])
    dora = pyone.OneServer(shared.endpoint, session="dora:dora-pw")
    mine = dora.vm.allocate(
        f'NAME = "dora-vm"\nSCHED_ACTION = [ ACTION = "backup", ARGS = "{datastores["backup"]}", TIME = "+60" ]'
    )
    theirs = admin.vm.allocate('NAME = "admin-only"\nSCHED_ACTION = [ ACTION = "reboot", TIME = "+60" ]')
    backup = f'SCHED_ACTION = [ ACTION = "backup", ARGS = "{datastores["backup"]},1", TIME = "+120" ]'
    sa_id = dora.vm.schedadd(mine, backup)
    dora.vm.schedupdate(mine, sa_id, 'SCHED_ACTION = [ TIME = "+180" ]')
    dora.vm.scheddelete(mine, sa_id)
    assert [a["ACTION"] for a in actions_of(dora, mine)] == ["backup"]
    their_action = int(actions_of(admin, theirs)[0]["ID"])
    for method, args in [
        ("one.vm.schedadd", (theirs, backup)),
        ("one.vm.schedupdate", (theirs, their_action, 'SCHED_ACTION = [ TIME = "+1" ]')),
        ("one.vm.scheddelete", (theirs, their_action)),
    ]:
        ok, text, code = call(shared, method, *args, session="dora:dora-pw")[:3]
        assert (ok, code) == (False, AUTHORIZATION), text
        assert "sched-action" in text
    assert len(actions_of(admin, theirs)) == 1


def test_info_shows_an_action_changed_since_the_last_rendering(admin: pyone.OneServer) -> None:
    vm_id = admin.vm.allocate('NAME = "cached"\nSCHED_ACTION = [ ACTION = "reboot", TIME = "1900000000" ]')
    sa_id = int(actions_of(admin, vm_id)[0]["ID"])
    assert actions_of(admin, vm_id)[0]["TIME"] == "1900000000"  # rendered and cached
    admin.vm.schedupdate(vm_id, sa_id, 'SCHED_ACTION = [ TIME = "1900000600" ]')
    assert actions_of(admin, vm_id)[0]["TIME"] == "1900000600"


def test_actions_survive_a_restart_and_recover_deletes_them(daemon: Daemon) -> None:
    one = pyone.OneServer(daemon.endpoint, session=daemon.session)
    kept = one.vm.allocate('NAME = "kept"\nSCHED_ACTION = [ ACTION = "reboot", TIME = "+60", CRON = "0 3 * * 1" ]')
    gone = one.vm.allocate(
        'NAME = "gone"\nSCHED_ACTION = [ ACTION = "suspend", TIME = "+60" ]\nSCHED_ACTION = [ ACTION = "resume", TIME = "+90" ]'
    )
    before = actions_of(one, kept)
    gone_ids = [int(a["ID"]) for a in actions_of(one, gone)]
    one.vm.recover(gone, 3)
    assert daemon.stop() == 0
    with sqlite3.connect(daemon.state_dir / "vmsched.db") as db:
        rows = db.execute("SELECT oid, name, uid, parent FROM schedaction_pool ORDER BY oid").fetchall()
    assert rows == [(int(before[0]["ID"]), "reboot", 0, kept)]
    again = start_daemon(daemon.state_dir)
    daemon.process = again.process
    one = pyone.OneServer(again.endpoint, session=again.session)
    assert actions_of(one, kept) == before
    added = one.vm.schedadd(kept, 'SCHED_ACTION = [ ACTION = "reboot", TIME = "+1" ]')
    assert added > max(gone_ids)  # ids of deleted actions are not handed out again


def test_action_rows_take_the_vm_owner(daemon: Daemon) -> None:
    one = pyone.OneServer(daemon.endpoint, session=daemon.session)
    user_id = one.user.allocate("erin", "erin-pw", "core", [])
    erin = pyone.OneServer(daemon.endpoint, session="erin:erin-pw")
    vm_id = erin.vm.allocate('NAME = "erin-vm"\nSCHED_ACTION = [ ACTION = "reboot", TIME = "+60" ]')
    erin.vm.schedadd(vm_id, 'SCHED_ACTION = [ ACTION = "suspend", TIME = "+60" ]')
    gid = erin.vm.info(vm_id).GID
    assert daemon.stop() == 0
    with sqlite3.connect(daemon.state_dir / "vmsched.db") as db:
        owners = db.execute("SELECT uid, gid, parent FROM schedaction_pool").fetchall()
    assert owners == [(user_id, gid, vm_id)] * 2


# -- pure parts: the stored form and the rendering cache -------------------------------------------


@pytest.mark.parametrize(
    "action",
    [
        SchedAction(id=4, parent_id=9, action="backup", args="1,1", time=1_700_000_000, anchor=1_699_990_000),
        SchedAction(id=5, parent_id=9, action="reboot", time=1, repeat=4, days="0 3 * * *", end_type=2,
                    end_value=1_800_000_000, done=1_600_000_000, message="12:00 : host <down> & out", warning=3),
        SchedAction(id=6, parent_id=2, type="BACKUPJOB", action="backup", time=5, repeat=3, days="6"),
    ],
)  # fmt: skip
def test_codec_round_trip_keeps_the_anchor(action: SchedAction) -> None:
    codec = build_codecs()["schedaction"]
    row = codec.encode(action)
    assert (row.id, row.name, row.parent) == (action.id, action.action, action.parent_id)
    assert codec.decode(Row(row.id, row.name, row.uid, row.gid, row.body, row.parent)) == action


def test_codec_takes_the_owner_of_the_vm_row() -> None:
    codecs = build_codecs()
    codecs["vm"].decode(Row(9, "db", 7, 3, "<VM><ID>9</ID><NAME>db</NAME><UID>7</UID><GID>3</GID></VM>"))
    row = codecs["schedaction"].encode(SchedAction(id=1, parent_id=9, action="reboot", time=5))
    assert (row.uid, row.gid) == (7, 3)


def test_xml_cache_rebuilds_when_a_dependency_is_replaced() -> None:
    cache, builds = XmlCache(), []

    class Obj:
        id = 1

    obj, dep = Obj(), SchedAction(id=1, time=5)

    def build(o: object) -> str:
        builds.append(o)
        return f"<X>{len(builds)}</X>"

    assert cache.body("vm", obj, "full", build, deps=(dep,)) == "<X>1</X>"
    assert cache.body("vm", obj, "full", build, deps=(dep,)) == "<X>1</X>"
    assert cache.body("vm", obj, "full", build, deps=(SchedAction(id=1, time=5),)) == "<X>2</X>"  # equal, not same
    assert cache.body("vm", obj, "full", build, deps=()) == "<X>3</X>"
