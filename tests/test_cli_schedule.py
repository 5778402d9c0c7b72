"""``vmsched schedule next`` (offline) and ``vmsched vm sched-add|sched-update|sched-delete`` / ``vm show``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from lxml import etree

from scheduler.cli import main
from scheduler.cli.vms import render_vm
from tests.conftest import Daemon
from tests.test_cli import created_id, ok, vmsched


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


def lines(*isos: str, index: int = 0) -> list[str]:
    """Expected output lines: ``<index> <epoch> <iso>`` for ISO times written with their offset."""
    return [f"{index} {at(iso)} {iso}" for iso in isos]


NOW = "2024-01-01T00:00:00+00:00"

CASES = [
    pytest.param(
        'SCHED_ACTION = [ ACTION = "backup", ARGS = "0", TIME = "+3600" ]', NOW, "UTC", 5,
        lines("2024-01-01T01:00:00+00:00"), id="relative-one-shot",
    ),
    pytest.param(
        f'SCHED_ACTION = [ ACTION = "reboot", TIME = "{at("2024-01-01T10:00:00+00:00")}", REPEAT = "0", DAYS = "1,3" ]',
        NOW, "UTC", 4,
        lines("2024-01-01T10:00:00+00:00", "2024-01-03T10:00:00+00:00", "2024-01-08T10:00:00+00:00",
              "2024-01-10T10:00:00+00:00"),
        id="absolute-weekly",
    ),
    pytest.param(
        f'SCHED_ACTION = [ ACTION = "reboot", TIME = "{at("2024-01-31T02:00:00+00:00")}", REPEAT = "1", DAYS = "31" ]',
        NOW, "UTC", 3,
        lines("2024-01-31T02:00:00+00:00", "2024-02-29T02:00:00+00:00", "2024-03-31T02:00:00+00:00"),
        id="monthly-last-day",
    ),
    pytest.param(
        'SCHED_ACTION = [ ACTION = "suspend", TIME = "+600", REPEAT = "3", DAYS = "6", END_TYPE = "1", END_VALUE = "1" ]',
        NOW, "UTC", 5,
        lines("2024-01-01T00:10:00+00:00", "2024-01-01T06:10:00+00:00"),
        id="hourly-ends-after-times",
    ),
    pytest.param(
        f'SCHED_ACTION = [ ACTION = "reboot", TIME = "{at("2024-03-30T02:30:00+01:00")}", CRON = "30 2 * * *" ]',
        "2024-03-29T12:00:00+01:00", "Europe/Paris", 3,
        lines("2024-03-30T02:30:00+01:00", "2024-03-31T03:00:00+02:00", "2024-04-01T02:30:00+02:00"),
        id="cron-across-spring-forward",
    ),
    pytest.param(
        f'SCHED_ACTION = [ ACTION = "reboot", TIME = "{at("2024-01-01T10:00:00+00:00")}" ]', NOW, "Asia/Tokyo", 5,
        lines("2024-01-01T19:00:00+09:00"), id="tz-changes-the-display",
    ),
    pytest.param(
        f'SCHED_ACTION = [ ACTION = "reboot", TIME = "{at("2023-12-25T10:00:00+00:00")}", REPEAT = "0", DAYS = "1" ]',
        NOW, "UTC", 2,
        lines("2023-12-25T10:00:00+00:00", "2024-01-01T10:00:00+00:00"),
        id="due-action-lists-its-catch-up-first",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("template", "now", "tz", "count", "expected"), CASES)
def test_schedule_next(tmp_path: Path, capsys, template: str, now: str, tz: str, count: int, expected) -> None:
    file = tmp_path / "vm.tpl"
    file.write_text(template + "\n")
    argv = ["schedule", "next", str(file), "--now", str(at(now)), "--count", str(count), "--tz", tz]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert (out.splitlines(), err) == (expected, "")


def test_schedule_next_numbers_each_action_and_defaults_to_five_runs_in_utc(tmp_path: Path, capsys) -> None:
    file = tmp_path / "vm.tpl"
    file.write_text(
        'NAME = "web"\nSCHED_ACTION = [ ACTION = "reboot", TIME = "+60" ]\n'
        'SCHED_ACTION = [ ACTION = "backup", ARGS = "3,1", TIME = "+0", REPEAT = "3", DAYS = "24" ]\n'
    )
    assert main(["schedule", "next", str(file), "--now", str(at(NOW))]) == 0
    days = [f"2024-01-0{day}T00:00:00+00:00" for day in range(1, 6)]
    assert capsys.readouterr().out.splitlines() == lines("2024-01-01T00:01:00+00:00") + lines(*days, index=1)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ('SCHED_ACTION = [ ACTION = "reboot", TIME = "+1" ]\nSCHED_ACTION = [ ACTION = "undeploy", TIME = "+1" ]',
         "SCHED_ACTION #1: undeploy has no meaning for a libvirt domain managed by vmsched"),
        ('SCHED_ACTION = [ ACTION = "backup", TIME = "+1" ]',
         "SCHED_ACTION #0: Missing or malformed ARGS for: backup. Format: ds_id[,reset]"),
        ('SCHED_ACTION = [ ACTION = "reboot", TIME = "+1", CRON = "61 * * * *" ]',
         "SCHED_ACTION #0: Wrong CRON expression"),
        ('SCHED_ACTION = [ ACTION = "reboot" ]', "SCHED_ACTION #0: Unable to parse the time value or value is empty"),
        ('NAME = "nothing to schedule"', "no SCHED_ACTION to schedule"),
    ],
)  # fmt: skip
def test_schedule_next_invalid_action_exits_2(tmp_path: Path, capsys, template: str, message: str) -> None:
    file = tmp_path / "bad.tpl"
    file.write_text(template + "\n")
    assert main(["schedule", "next", str(file), "--now", "1000"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{file}: {message}"), err


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--tz", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"), (["--count", "0"], "--count: must be")],
)
def test_schedule_next_bad_options_exit_2(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    file = tmp_path / "vm.tpl"
    file.write_text('SCHED_ACTION = [ ACTION = "reboot", TIME = "+1" ]\n')
    assert main(["schedule", "next", str(file), "--now", "1000", *extra]) == 2
    assert message in capsys.readouterr().err


def test_schedule_next_needs_now(tmp_path: Path, capsys) -> None:
    assert main(["schedule", "next", "-"]) == 2
    assert "--now" in capsys.readouterr().err


# -- vm show: the scheduled actions table ---------------------------------------------------------

SHOW_NOW = at("2024-01-01T00:00:00+00:00")


def sched(id_: int, time: int, done: int = -1, message: str = "", repeat: int = -1, warning: int = 0) -> str:
    return (
        f"<SCHED_ACTION><ID>{id_}</ID><PARENT_ID>5</PARENT_ID><TYPE>VM</TYPE><ACTION>reboot</ACTION><ARGS/>"
        f"<TIME>{time}</TIME><REPEAT>{repeat}</REPEAT><DAYS>{'1' if repeat >= 0 else ''}</DAYS><END_TYPE>-1</END_TYPE>"
        f"<END_VALUE>-1</END_VALUE><DONE>{done}</DONE><MESSAGE>{message}</MESSAGE><WARNING>{warning}</WARNING>"
        "</SCHED_ACTION>"
    )


def status_by_id(show: str) -> dict[str, str]:
    """The STATUS column of ``vm show``'s SCHEDULED ACTIONS table, by the ID column."""
    out = show.splitlines()
    header = out.index("SCHEDULED ACTIONS") + 1
    id_end, status_at = out[header].index("ID") + 2, out[header].index("STATUS")
    rows = out[header + 1 : out.index("", header)]
    return {row[:id_end].strip(): row[status_at:].strip() for row in rows}


def test_show_status_column() -> None:
    vm = etree.fromstring(
        "<VM><ID>5</ID><NAME>db</NAME><STATE>1</STATE><LCM_STATE>0</LCM_STATE><STIME>0</STIME><TEMPLATE>"
        + sched(0, SHOW_NOW + 3 * 86400 + 5)
        + sched(1, SHOW_NOW + 7200 + 59)
        + sched(2, SHOW_NOW + 90)
        + sched(3, SHOW_NOW - 10)
        + sched(4, SHOW_NOW - 100, done=SHOW_NOW - 50)
        + sched(5, SHOW_NOW + 86400, done=SHOW_NOW - 50, repeat=0)
        + sched(6, SHOW_NOW - 10, message="12:00 : host unreachable")
        + sched(7, SHOW_NOW + 60, warning=SHOW_NOW - 1)
        + "</TEMPLATE><USER_TEMPLATE/><HISTORY_RECORDS/><BACKUPS><BACKUP_CONFIG/><BACKUP_IDS/></BACKUPS></VM>"
    )
    assert status_by_id(render_vm(vm, SHOW_NOW)) == {
        "0": "Next in 3 days",
        "1": "Next in 2 hours",
        "2": "Next in 2 minutes",
        "3": "Overdue!",
        "4": f"Done on {datetime.fromtimestamp(SHOW_NOW - 50).astimezone().strftime('%Y-%m-%d %H:%M:%S')}",
        "5": "Next in 1 day",
        "6": "Error! 12:00 : host unreachable",
        "*7": "Next in 1 minute",
    }


# -- vm sched-* against the daemon ------------------------------------------------------------------


def test_vm_sched_commands(daemon: Daemon, tmp_path: Path) -> None:
    vm_file = tmp_path / "vm.tpl"
    vm_file.write_text('NAME = "cli-sched"\nSCHED_ACTION = [ ACTION = "reboot", TIME = "+86400" ]\n')
    vm_id = created_id(ok(daemon, "vm", "create", str(vm_file)))
    add = tmp_path / "add.tpl"
    add.write_text('SCHED_ACTION = [ ACTION = "snapshot-create", ARGS = "nightly", TIME = "1900000000" ]\n')
    sa_id = created_id(ok(daemon, "vm", "sched-add", "cli-sched", str(add)))

    show = ok(daemon, "vm", "show", str(vm_id))
    lines_ = show.splitlines()
    header = lines_.index("SCHEDULED ACTIONS")
    assert lines_[header + 1].split() == ["ID", "ACTION", "ARGS", "SCHEDULED", "REPEAT", "END", "STATUS"]
    rows = [line.split() for line in lines_[header + 2 : header + 4]]
    assert [row[:3] for row in rows] == [["0", "reboot", "-"], [str(sa_id), "snapshot-create", "nightly"]]
    status = status_by_id(show)
    assert status["0"] in ("Next in 23 hours", "Next in 1 day")  # TIME = STIME + 86400
    assert status[str(sa_id)].startswith("Next in ") and status[str(sa_id)].endswith(" days")

    update = tmp_path / "update.tpl"
    update.write_text('SCHED_ACTION = [ ARGS = "weekly", REPEAT = "0", DAYS = "0" ]\n')
    assert ok(daemon, "vm", "sched-update", "cli-sched", str(sa_id), str(update)) == ""
    xml = etree.fromstring(ok(daemon, "vm", "show", str(vm_id), "--xml").encode())
    changed = xml.find(f"TEMPLATE/SCHED_ACTION[ID='{sa_id}']")
    assert (changed.findtext("ARGS"), changed.findtext("REPEAT"), changed.findtext("DAYS")) == ("weekly", "0", "0")
    assert changed.findtext("TIME") == "1900000000"

    bad = tmp_path / "bad.tpl"
    bad.write_text('SCHED_ACTION = [ ACTION = "terminate" ]\n')
    refused = vmsched(daemon, "vm", "sched-update", str(vm_id), str(sa_id), str(bad))
    assert refused.code == 1 and "terminate has no meaning" in refused.err

    assert ok(daemon, "vm", "sched-delete", str(vm_id), str(sa_id)) == ""
    missing = vmsched(daemon, "vm", "sched-delete", str(vm_id), str(sa_id))
    assert missing.code == 1 and f"Error getting scheduled action [{sa_id}]" in missing.err
    xml = etree.fromstring(ok(daemon, "vm", "show", str(vm_id), "--xml").encode())
    assert [a.findtext("ID") for a in xml.findall("TEMPLATE/SCHED_ACTION")] == ["0"]
