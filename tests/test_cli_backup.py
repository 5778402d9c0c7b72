"""``vmsched vm backup``: --schedule and its repeat options (against a real daemon), --wait with its
progress display and ``vm show``'s BACKUP PROGRESS (against a scripted XML-RPC server), and the pure
rendering of scheduler/cli/progress.py."""

from __future__ import annotations

import io
import json
import sys
import threading
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer
from zoneinfo import ZoneInfo

import pytest
from lxml import etree

from scheduler.cli import backup, build_parser, main
from scheduler.cli.backup import backup_action, next_run_text, parse_date
from scheduler.cli.client import UsageError
from scheduler.cli.progress import (
    DiskProgress,
    Progress,
    ProgressView,
    RateMeter,
    bar_line,
    human_bytes,
    human_duration,
    percent,
    plain_line,
    show_fields,
)
from scheduler.model.schedule import SchedAction
from scheduler.model.template import Template
from tests.conftest import Daemon
from tests.test_cli import Result, created_id
from tests.test_cli import vmsched as cli_vmsched

REPO = Path(__file__).resolve().parents[1]
GIB, MIB = 1024.0**3, 1024.0**2
PARIS = ZoneInfo("Europe/Paris")
NOW = int(datetime(2024, 9, 20, 10, 0, tzinfo=UTC).timestamp())  # a Friday, 12:00 in Paris


def epoch(*wall: int, tz: ZoneInfo = PARIS) -> int:
    return int(datetime(*wall, tzinfo=tz).timestamp())  # type: ignore[misc]


# -- progress.py: units and lines -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (123 * MIB, "123 MiB"),
     (99.94 * MIB, "99.9 MiB"), (3 * GIB, "3.0 GiB"), (2.0**60, "1024 PiB")],
)  # fmt: skip
def test_human_bytes(count: float, text: str) -> None:
    assert human_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0:00"), (7.9, "0:07"), (754, "12:34"), (3723, "1:02:03"), (-3, "0:00")]
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.parametrize(
    ("done", "total", "share"), [(0, 0, None), (5, 0, None), (50, 100, 50), (99.9, 100, 99), (100, 100, 100),
                                 (150, 100, 100)],
)  # fmt: skip
def test_percent(done: float, total: float, share: int | None) -> None:
    assert percent(done, total) == share


@pytest.mark.parametrize(
    ("struct", "expected"),
    [
        ({}, None),
        ("nonsense", None),
        ({"DONE": 5.0}, None),
        (
            {"PHASE": "upload", "DONE": 1.5 * GIB, "TOTAL": 3 * GIB, "ELAPSED": 42.0,
             "DISKS": [{"DISK_ID": 0, "DONE": GIB, "TOTAL": 2 * GIB}, {"DISK_ID": 1, "DONE": 0.5 * GIB, "TOTAL": GIB}]},
            Progress("upload", 1.5 * GIB, 3 * GIB, (DiskProgress(0, GIB, 2 * GIB), DiskProgress(1, 0.5 * GIB, GIB)), 42),
        ),
        ({"PHASE": "thaw", "DONE": "x", "TOTAL": -4, "DISKS": "no"}, Progress("thaw", 0, 0, (), 0)),
    ],
)  # fmt: skip
def test_progress_from_the_daemon_struct(struct: object, expected: Progress | None) -> None:
    assert Progress.from_struct(struct) == expected


UPLOAD = Progress("upload", 1.5 * GIB, 3 * GIB, (DiskProgress(0, GIB, 2 * GIB), DiskProgress(1, 0.5 * GIB, GIB)), 42)


@pytest.mark.parametrize(
    ("progress", "width", "rate", "line"),
    [
        (UPLOAD, 100, 85.3 * MIB,
         "upload  50% [##############..............] 1.5 GiB/3.0 GiB disk0 50% disk1 50% 85.3 MiB/s 0:42"),
        (UPLOAD, 75, None, "upload  50% [#########..........] 1.5 GiB/3.0 GiB disk0 50% disk1 50% 0:42"),
        (UPLOAD, 60, None, "upload  50% [############............] 1.5 GiB/3.0 GiB 0:42"),  # the disks go first
        (UPLOAD, 45, None, "upload  50% [####.....] 1.5 GiB/3.0 GiB 0:42"),
        (UPLOAD, 45, 2 * MIB, "upload  50% 1.5 GiB/3.0 GiB 2.0 MiB/s 0:42"),  # then the bar
        (UPLOAD, 30, 2 * MIB, "upload  50% 1.5 GiB/3.0 GiB"),  # then rate and time
        (UPLOAD, 20, None, "upload  50% 1.5 GiB"),  # then the text is cut
        (Progress("capture", 300 * MIB, 0, (), 5), 50, None, "capture [??????????????????????????] 300 MiB 0:05"),
        (Progress("record", 10, 10, (DiskProgress(0, 10, 10),), 61), 40, None, "record 100% [##########] 10 B/10 B 1:01"),
    ],
)  # fmt: skip
def test_bar_line(progress: Progress, width: int, rate: float | None, line: str) -> None:
    assert bar_line(progress, width, rate) == line


@pytest.mark.parametrize("width", [1, 2, 10, 25, 40, 61, 80, 132, 300])
def test_bar_line_never_fills_the_last_column(width: int) -> None:
    line = bar_line(UPLOAD, width, 123.4 * MIB)
    assert 0 < len(line) <= max(1, width - 1)
    assert line.startswith("upload"[: max(1, width - 1)])


def test_plain_line_and_show_fields() -> None:
    assert plain_line(UPLOAD, 2 * MIB) == "upload 50% (1.5 GiB/3.0 GiB, disk0 50% disk1 50%, 2.0 MiB/s, 0:42 elapsed)"
    assert plain_line(Progress("capture", 0, 0, (), 3)) == "capture (0 B, 0:03 elapsed)"
    assert show_fields(Progress("upload", 1.5 * GIB, 3 * GIB, (DiskProgress(0, GIB, 2 * GIB),
                                                                DiskProgress(2, 5 * MIB, 0)), 42)) == [
        ("PHASE", "upload"), ("PROGRESS", "50%"), ("BYTES", "1.5 GiB/3.0 GiB"), ("ELAPSED", "0:42"),
        ("DISK 0", "50% 1.0 GiB/2.0 GiB"), ("DISK 2", "5.0 MiB"),
    ]  # fmt: skip


def test_rate_is_measured_over_the_phase_on_the_daemon_clock() -> None:
    meter = RateMeter()
    assert meter.update(Progress("capture", 0, 100, (), 10)) is None  # first sample of a phase
    assert meter.update(Progress("capture", 40, 100, (), 12)) == 20.0
    assert meter.update(Progress("capture", 100, 100, (), 15)) == 20.0
    assert meter.update(Progress("upload", 10, 100, (), 16)) is None  # a new phase starts over
    assert meter.update(Progress("upload", 10, 100, (), 16)) is None  # no time passed
    assert meter.update(Progress("upload", 70, 100, (), 18)) == 30.0


def plain_view_output(samples: list[Progress | None]) -> list[str]:
    out = io.StringIO()
    view = ProgressView(out, "backup of VM 3", tty=False)
    for sample in samples:
        view.show(sample)
    view.finish()
    return out.getvalue().splitlines()


def test_plain_lines_only_at_a_new_phase_or_a_new_ten_percent_step() -> None:
    samples = [None, *(Progress("capture", done, 100, (), 1) for done in (0, 3, 9, 10, 19, 55, 56, 100)),
               Progress("upload", 0, 0, (), 2), Progress("upload", 5, 0, (), 3), Progress("upload", 1, 100, (), 4)]  # fmt: skip
    lines = plain_view_output(samples)
    assert [line.split(" (")[0] for line in lines] == [
        "backup of VM 3: capture 0%", "backup of VM 3: capture 10%", "backup of VM 3: capture 55%",
        "backup of VM 3: capture 100%", "backup of VM 3: upload", "backup of VM 3: upload 1%",
    ]  # fmt: skip


def test_terminal_view_redraws_one_line_and_ends_it() -> None:
    out = io.StringIO()
    view = ProgressView(out, "backup of VM 3", tty=True, width=lambda: 60)
    view.finish()
    assert out.getvalue() == ""  # nothing drawn, nothing to end
    view.show(Progress("upload", 1, 4, (), 1))
    view.show(Progress("upload", 2, 4, (), 2))
    view.finish()
    redraws = out.getvalue().split("\r")
    assert redraws[0] == "" and len(redraws) == 3
    assert redraws[1].startswith("upload  25% [") and redraws[1].endswith("\x1b[K")
    assert redraws[2].startswith("upload  50% [") and redraws[2].endswith("\x1b[K\n")


# -- backup.py: the --schedule options, pure ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-09-23 14:15", epoch(2024, 9, 23, 14, 15)),
        ("2024-09-23  14:15:30", epoch(2024, 9, 23, 14, 15, 30)),
        ("2024-09-23", epoch(2024, 9, 23)),
        ("2024-09-23T14:15:00+00:00", epoch(2024, 9, 23, 14, 15, tz=UTC)),
        ("2024-12-23T14:15Z", epoch(2024, 12, 23, 14, 15, tz=UTC)),
        ("09/23 14:15", epoch(2024, 9, 23, 14, 15)),  # the year of now
        ("12/24/2025 08:00", epoch(2025, 12, 24, 8)),
        ("12/24/2025", epoch(2025, 12, 24)),
        ("01/15", epoch(2024, 1, 15)),  # not moved to next year (as onevm)
        ("14:15", epoch(2024, 9, 20, 14, 15)),  # today
        ("23:59:59", epoch(2024, 9, 20, 23, 59, 59)),
        ("2024-01-15 10:00", epoch(2024, 1, 15, 10)),  # winter time: +01:00
        ("tomorrow", None), ("13/45", None), ("09/23 25:00", None), ("2024-02-30", None), ("", None),
        ("3000-01-02", None),
    ],
)  # fmt: skip
def test_parse_date(text: str, expected: int | None) -> None:
    assert parse_date(text, NOW, PARIS) == expected


def schedule_args(*options: str) -> object:
    return build_parser().parse_args(["vm", "backup", "7", "-d", "100", *options])


STIME = NOW - 2 * 86400


@pytest.mark.parametrize(
    ("options", "pairs", "first"),
    [
        (["--schedule", "now"], [("TIME", str(NOW))], NOW),
        (["--schedule", "+3600", "--reset"], [("ARGS", "100,1"), ("TIME", "+3600")], STIME + 3600),
        (["--schedule", "09/23 14:15", "--weekly", "4, 2,2", "--end", "5"],
         [("TIME", str(epoch(2024, 9, 23, 14, 15))), ("REPEAT", "0"), ("DAYS", "2,4"), ("END_TYPE", "1"),
          ("END_VALUE", "5")], epoch(2024, 9, 23, 14, 15)),
        (["--schedule", "2024-10-01 02:00", "--monthly", "1,15"],
         [("TIME", str(epoch(2024, 10, 1, 2))), ("REPEAT", "1"), ("DAYS", "1,15"), ("END_TYPE", "0"),
          ("END_VALUE", "-1")], epoch(2024, 10, 1, 2)),
        (["--schedule", "now", "--yearly", "0", "--end", "2030-01-01"],
         [("TIME", str(NOW)), ("REPEAT", "2"), ("DAYS", "0"), ("END_TYPE", "2"), ("END_VALUE", str(epoch(2030, 1, 1)))],
         NOW),
        (["--schedule", "now", "--hourly", "06", "--end", "0"],
         [("TIME", str(NOW)), ("REPEAT", "3"), ("DAYS", "6"), ("END_TYPE", "1"), ("END_VALUE", "0")], NOW),
    ],
)  # fmt: skip
def test_backup_action(options: list[str], pairs: list[tuple[str, str]], first: int) -> None:
    vector, first_run = backup_action(schedule_args(*options), 100, now=NOW, stime=STIME, zone=PARIS)
    expected = {"ACTION": "backup", "ARGS": "100,0", **dict(pairs)}
    assert dict(vector.items()) == expected
    assert first_run == first


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--schedule", "someday"], "--schedule 'someday': not a time"),
        (["--schedule", "+1h"], "--schedule '+1h': +N needs a whole number of seconds"),
        (["--schedule", "13/45"], "--schedule '13/45': not a time"),
        (["--schedule", "now", "--weekly", "9"], "--weekly '9': Days in a week have to be in [0,6] range"),
        (["--schedule", "now", "--weekly", "mon"], "--weekly 'mon': Days in a week have to be in [0,6] range"),
        (["--schedule", "now", "--monthly", "0"], "--monthly '0': Days in a month have to be in [1,31] range"),
        (["--schedule", "now", "--yearly", "366"], "--yearly '366': Days in a year have to be in [0,365] range"),
        (["--schedule", "now", "--monthly", ""], "--monthly '': Repeat set, but DAYS are empty"),
        (["--schedule", "now", "--hourly", "x"], "--hourly 'x': expected the number of hours between two runs"),
        (["--schedule", "now", "--hourly", "168"], "--hourly '168': Hours have to be in [1,167] range"),
        (["--schedule", "now", "--hourly", "2,3"], "--hourly '2,3': expected the number of hours"),
        (["--schedule", "now", "--end", "3"], "--end needs a repeat: --weekly, --monthly, --yearly or --hourly"),
        (["--schedule", "now", "--weekly", "1", "--end", "soon"], "--end 'soon': expected a number of repetitions"),
        (["--schedule", "2024-10-01", "--weekly", "1", "--end", "2024-09-30"], "--end '2024-09-30': ends at"),
    ],
)  # fmt: skip
def test_backup_action_refuses_bad_options(options: list[str], message: str) -> None:
    with pytest.raises(UsageError) as raised:
        backup_action(schedule_args(*options), 100, now=NOW, stime=STIME, zone=PARIS)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(
    ("action", "text"),
    [
        (SchedAction(time=NOW + 3 * 86400 + 5), "(in 3 days)"),
        (SchedAction(time=NOW + 90), "(in 2 minutes)"),
        (SchedAction(time=NOW), "(due now)"),
        (SchedAction(time=NOW - 100, done=NOW - 50), "- (finished)"),
    ],
)
def test_next_run_text(action: SchedAction, text: str) -> None:
    assert next_run_text(action, NOW).endswith(text)


# -- against a real daemon --------------------------------------------------------------------------


def vmsched(daemon: Daemon, *argv: str, stdin: str | None = None) -> Result:
    """The CLI against ``daemon``, in UTC (dates on the command line are local time)."""
    return cli_vmsched(daemon, *argv, stdin=stdin, env=dict(daemon.env, TZ="UTC"))


def ok(daemon: Daemon, *argv: str, stdin: str | None = None) -> str:
    result = vmsched(daemon, *argv, stdin=stdin)
    assert result.code == 0, result.err
    return result.out


def vm_xml(daemon: Daemon, vm: int) -> etree._Element:
    return etree.fromstring(ok(daemon, "--xml", "vm", "show", str(vm)).encode())


def actions(daemon: Daemon, vm: int) -> dict[str, dict[str, str]]:
    """The VM's SCHED_ACTIONs by id, each as {element: text}."""
    found = vm_xml(daemon, vm).findall("TEMPLATE/SCHED_ACTION")
    return {a.findtext("ID") or "": {child.tag: child.text or "" for child in a} for a in found}


@pytest.fixture
def vm_and_ds(daemon: Daemon) -> tuple[int, int]:
    ds = created_id(ok(daemon, "datastore", "create", "-", stdin='NAME="bk"\nTYPE="BACKUP_DS"\nDS_MAD="fs"\n'))
    vm = created_id(ok(daemon, "vm", "create", "-", stdin='NAME="web"\nMEMORY=64\n'))
    return vm, ds


def test_schedule_adds_the_actions_onevm_would(daemon: Daemon, vm_and_ds: tuple[int, int]) -> None:
    vm, ds = vm_and_ds
    out = ok(daemon, "vm", "backup", "web", "-d", "bk", "--schedule", "2030-01-02 03:04", "--weekly", "3,1",
             "--end", "5")  # fmt: skip
    weekly = created_id(out)
    assert out.splitlines()[1].startswith("NEXT: 2030-01-02 03:04:00 (in ")
    hourly = created_id(ok(daemon, "vm", "backup", str(vm), "-d", str(ds), "--schedule", "+3600", "--hourly", "6",
                           "--end", "2031-01-01", "--reset"))  # fmt: skip
    shown = actions(daemon, vm)
    stime = int(vm_xml(daemon, vm).findtext("STIME") or "")
    common = {"ACTION": "backup", "DONE": "-1", "MESSAGE": ""}
    assert shown[str(weekly)] | common == shown[str(weekly)]
    assert {k: shown[str(weekly)][k] for k in ("ARGS", "TIME", "REPEAT", "DAYS", "END_TYPE", "END_VALUE")} == {
        "ARGS": f"{ds},0", "TIME": str(epoch(2030, 1, 2, 3, 4, tz=UTC)), "REPEAT": "0", "DAYS": "1,3",
        "END_TYPE": "1", "END_VALUE": "5",
    }  # fmt: skip
    assert shown[str(hourly)] | common == shown[str(hourly)]
    assert {k: shown[str(hourly)][k] for k in ("ARGS", "TIME", "REPEAT", "DAYS", "END_TYPE", "END_VALUE")} == {
        "ARGS": f"{ds},1", "TIME": str(stime + 3600), "REPEAT": "3", "DAYS": "6",
        "END_TYPE": "2", "END_VALUE": str(epoch(2031, 1, 1, tz=UTC)),
    }  # fmt: skip

    as_json = json.loads(ok(daemon, "--json", "vm", "backup", "web", "-d", "bk", "--schedule", "2030-05-06"))
    assert as_json["SCHED_ACTION"]["TIME"] == str(epoch(2030, 5, 6, tz=UTC))
    assert (as_json["SCHED_ACTION"]["REPEAT"], as_json["SCHED_ACTION"]["ARGS"]) == ("-1", f"{ds},0")
    assert set(actions(daemon, vm)) == {str(weekly), str(hourly), as_json["SCHED_ACTION"]["ID"]}


def test_bad_schedule_options_exit_2_and_add_nothing(daemon: Daemon, vm_and_ds: tuple[int, int]) -> None:
    vm, _ = vm_and_ds
    before = actions(daemon, vm)
    cases = [
        (["--schedule", "someday"], "--schedule 'someday': not a time"),
        (["--schedule", "now", "--hourly", "many"], "--hourly 'many': expected the number of hours"),
        (["--schedule", "now", "--weekly", "9"], "--weekly '9': Days in a week have to be in [0,6] range"),
        (["--schedule", "now", "--end", "4"], "--end needs a repeat"),
        (["--schedule", "2030-01-01", "--wait"], "--wait follows a backup that starts now, but --schedule"),
        (["--weekly", "1"], "--weekly needs --schedule"),
        (["--end", "3"], "--end needs --schedule"),
    ]
    for options, message in cases:
        result = vmsched(daemon, "vm", "backup", "web", "-d", "bk", *options)
        assert (result.code, result.out) == (2, ""), (options, result)
        assert result.err.startswith(message), (options, result.err)
    no_ds = vmsched(daemon, "vm", "backup", "web", "--schedule", "now")
    assert (no_ds.code, no_ds.err) == (2, "--schedule needs -d/--datastore: a scheduled backup names its datastore\n")
    both = vmsched(daemon, "vm", "backup", "web", "-d", "bk", "--schedule", "now", "--weekly", "1", "--hourly", "2")
    assert both.code == 2 and "--hourly: not allowed with argument --weekly" in both.err
    bare = vmsched(daemon, "vm", "backup", "web", "-d", "bk", "--schedule", "now", "--hourly")
    assert bare.code == 2 and "argument --hourly: expected one argument" in bare.err
    assert actions(daemon, vm) == before == {}


def test_schedule_now_with_wait_follows_the_scheduled_run(daemon: Daemon, vm_and_ds: tuple[int, int]) -> None:
    """The VM is bound to no host, so its run fails at once: --wait reports the action's MESSAGE."""
    vm, _ = vm_and_ds
    result = vmsched(daemon, "vm", "backup", "web", "-d", "bk", "--schedule", "now", "--wait", "--wait-timeout", "30")
    assert result.code == 1, result
    first, next_line, last = result.out.splitlines()
    sa_id = created_id(first)
    assert next_line.endswith("(due now)")
    assert last.startswith(f"backup of VM {vm}: scheduled action {sa_id} failed: ")
    assert "not bound to a host" in last and last.endswith("(it will be retried)")
    assert actions(daemon, vm)[str(sa_id)]["MESSAGE"] in last


# -- --wait and vm show against a scripted server ---------------------------------------------------


@dataclass
class Script:
    """Answers each method from ``replies``: a list is consumed one reply per call (the last one
    stays); a callable is called. Records every call."""

    replies: dict[str, object] = field(default_factory=dict)
    calls: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)

    def _dispatch(self, method: str, params: tuple[object, ...]) -> object:
        self.calls.append((method, params))
        reply = self.replies.get(method)
        if reply is None:
            raise xmlrpc.client.Fault(-506, f"Unknown method: {method}")
        if callable(reply):
            return reply()
        if isinstance(reply, list) and reply and isinstance(reply[0], list):
            return reply.pop(0) if len(reply) > 1 else reply[0]
        return reply

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class _QuietHandler(SimpleXMLRPCRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Script]:
    server = SimpleXMLRPCServer(("127.0.0.1", 0), requestHandler=_QuietHandler, allow_none=True, logRequests=False)
    state = Script()
    server.register_instance(state)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    auth = tmp_path / "auth"
    auth.write_text("alice:pw\n")
    monkeypatch.setenv("VMSCHED_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}/RPC2")
    monkeypatch.setenv("VMSCHED_AUTH", str(auth))
    monkeypatch.setattr(backup, "WAIT_POLL", 0.0)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def status(state: str, progress: dict | None = None, attempt: int = 1, message: str = "") -> list[object]:
    reply: dict[str, object] = {"ID": 4, "STATE": state, "ATTEMPT": attempt, "MESSAGE": message, "DATASTORE_ID": 100}
    if progress is not None:
        reply["PROGRESS"] = progress
    return [True, reply, 0]


def progress(phase: str, done: float, total: float, elapsed: float) -> dict[str, object]:
    return {"PHASE": phase, "DONE": done, "TOTAL": total, "ELAPSED": elapsed,
            "DISKS": [{"DISK_ID": 0, "DONE": done, "TOTAL": total}]}  # fmt: skip


RUN = [
    status("queued", attempt=0),
    status("running", progress("capture", 0, 0, 1)),
    status("running", progress("capture", 2 * GIB, 4 * GIB, 3)),
    status("running", progress("capture", 2.1 * GIB, 4 * GIB, 4)),
    status("running", progress("upload", GIB, 4 * GIB, 9)),
    status("done", message="cold backup: the VM was powered off"),
]


def test_wait_prints_plain_progress_lines_when_not_on_a_terminal(script: Script, capsys) -> None:
    script.replies["one.vm.backup"] = [True, 7, 0]
    script.replies["vmsched.vm.backupstatus"] = list(RUN)
    assert main(["vm", "backup", "7", "-d", "100", "--wait"]) == 0
    assert script.names()[0] == "one.vm.backup" and script.calls[0][1] == ("alice:pw", 7, 100, False)
    assert capsys.readouterr().out.splitlines() == [
        "backup of VM 7: capture (0 B, 0:01 elapsed)",
        "backup of VM 7: capture 50% (2.0 GiB/4.0 GiB, 1.0 GiB/s, 0:03 elapsed)",  # 2.1 GiB is still 50 %
        "backup of VM 7: upload 25% (1.0 GiB/4.0 GiB, 0:09 elapsed)",
        "backup of VM 7: done: cold backup: the VM was powered off",
    ]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_wait_draws_a_bar_on_a_terminal(script: Script, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr("scheduler.cli.progress.terminal_width", lambda: 72)
    script.replies["one.vm.backup"] = [True, 7, 0]
    script.replies["vmsched.vm.backupstatus"] = list(RUN)
    assert main(["vm", "backup", "7", "--wait"]) == 0
    text = terminal.getvalue()
    drawn, final = text.rsplit("\n", 2)[0], text.rsplit("\n", 2)[1]
    redraws = drawn.split("\r")[1:]
    assert len(redraws) == 4 and all(len(r.removesuffix("\x1b[K")) <= 71 for r in redraws)
    assert redraws[2].startswith("capture  52% [") and "2.1 GiB/4.0 GiB 717 MiB/s 0:04" in redraws[2]
    assert redraws[3].startswith("upload  25% [")
    assert final == "backup of VM 7: done: cold backup: the VM was powered off"


@pytest.mark.parametrize(
    ("last", "line"),
    [
        (status("given_up", attempt=4, message="disk full"), "backup of VM 7: given_up: disk full"),
        (status("cancelled", message="cancelled"), "backup of VM 7: cancelled: cancelled"),
        (status("queued", attempt=1, message="host down"),
         "backup of VM 7: attempt 1 failed: host down (it will be retried)"),
    ],
)  # fmt: skip
def test_wait_exits_1_when_the_backup_did_not_succeed(script: Script, capsys, last: list[object], line: str) -> None:
    script.replies["one.vm.backup"] = [True, 7, 0]
    script.replies["vmsched.vm.backupstatus"] = [status("running", progress("upload", 1, 2, 1)), last]
    assert main(["vm", "backup", "7", "--wait"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == line


def test_wait_gives_up_after_its_timeout(script: Script, capsys) -> None:
    script.replies["one.vm.backup"] = [True, 7, 0]
    script.replies["vmsched.vm.backupstatus"] = status("queued", attempt=0)
    assert main(["vm", "backup", "7", "--wait", "--wait-timeout", "0.05"]) == 1
    assert capsys.readouterr().out == "backup of VM 7: still queued after 0.05 s\n"


def vm_info(lcm_state: int) -> list[object]:
    return [True, f"<VM><ID>7</ID><NAME>db</NAME><STATE>3</STATE><LCM_STATE>{lcm_state}</LCM_STATE>"
                  "<STIME>0</STIME><TEMPLATE/><USER_TEMPLATE/></VM>", 0]  # fmt: skip


BACKUP, BACKUP_POWEROFF, RUNNING = 69, 70, 3


@pytest.mark.parametrize("lcm_state", [BACKUP, BACKUP_POWEROFF])
def test_show_adds_the_backup_progress_of_a_vm_in_backup(script: Script, capsys, lcm_state: int) -> None:
    script.replies["one.vm.info"] = vm_info(lcm_state)
    script.replies["vmsched.vm.backupprogress"] = [True, progress("upload", 3 * GIB, 4 * GIB, 75), 0]
    assert main(["vm", "show", "7"]) == 0
    out = capsys.readouterr().out
    section = out.split("\n\n")[1].splitlines()
    assert section == [
        "BACKUP PROGRESS",
        "PHASE               : upload",
        "PROGRESS            : 75%",
        "BYTES               : 3.0 GiB/4.0 GiB",
        "ELAPSED             : 1:15",
        "DISK 0              : 75% 3.0 GiB/4.0 GiB",
    ]
    assert script.calls[-1] == ("vmsched.vm.backupprogress", ("alice:pw", 7))


@pytest.mark.parametrize(
    ("lcm_state", "progress_reply"),
    [
        (RUNNING, [True, {"PHASE": "upload"}, 0]),  # not in backup: not asked
        (BACKUP, None),  # an older daemon: unknown method
        (BACKUP, [True, {}, 0]),  # the run ended meanwhile
    ],
)
def test_show_without_progress(script: Script, capsys, lcm_state: int, progress_reply: object) -> None:
    script.replies["one.vm.info"] = vm_info(lcm_state)
    if progress_reply is not None:
        script.replies["vmsched.vm.backupprogress"] = progress_reply
    assert main(["vm", "show", "7"]) == 0
    out = capsys.readouterr().out
    assert "BACKUP PROGRESS" not in out and out.startswith("VIRTUAL MACHINE 7 INFORMATION\n")
    asked = "vmsched.vm.backupprogress" in script.names()
    assert asked == (lcm_state == BACKUP)


def test_scheduled_wait_shows_progress_while_the_vm_is_in_backup(
    script: Script, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = 1_800_000_000
    monkeypatch.setattr(backup.SystemClock, "now", lambda self: float(now))

    def info(lcm: int, done: int = -1, message: str = "") -> list[object]:
        action = (f"<SCHED_ACTION><ID>5</ID><ACTION>backup</ACTION><ARGS>100,0</ARGS><TIME>{now}</TIME>"
                  f"<REPEAT>-1</REPEAT><DONE>{done}</DONE><MESSAGE>{message}</MESSAGE></SCHED_ACTION>")  # fmt: skip
        return [True, f"<VM><ID>7</ID><LCM_STATE>{lcm}</LCM_STATE><STIME>10</STIME><TEMPLATE>{action}</TEMPLATE></VM>",
                0]  # fmt: skip

    infos = [info(RUNNING), info(RUNNING), info(BACKUP), info(BACKUP), info(RUNNING, done=now + 5)]
    script.replies["one.vm.info"] = infos
    script.replies["one.vm.schedadd"] = [True, 5, 0]
    script.replies["vmsched.vm.backupprogress"] = [[True, progress("capture", 1, 2, 1), 0],
                                                  [True, progress("upload", 2, 2, 2), 0]]  # fmt: skip
    assert main(["vm", "backup", "7", "-d", "100", "--schedule", "now", "--wait"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ID: 5",
        f"NEXT: {backup.format_time(str(now))} (due now)",
        "backup of VM 7: capture 50% (1 B/2 B, 0:01 elapsed)",
        "backup of VM 7: upload 100% (2 B/2 B, 0:02 elapsed)",
        "backup of VM 7: done",
    ]
    added = [params for name, params in script.calls if name == "one.vm.schedadd"]
    assert added == [("alice:pw", 7, f'SCHED_ACTION=[\n  ACTION="backup",\n  ARGS="100,0",\n  TIME="{now}" ]\n')]


def test_values_are_quoted_by_the_template_language(script: Script, capsys) -> None:
    """Whatever reaches schedadd parses back to the same vector."""
    script.replies["one.vm.info"] = vm_info(RUNNING)
    script.replies["one.vm.schedadd"] = [True, 9, 0]
    assert main(["vm", "backup", "7", "-d", "100", "--schedule", "+60", "--monthly", "31,1", "--end", "2"]) == 0
    sent = [str(params[2]) for name, params in script.calls if name == "one.vm.schedadd"]
    (vector,) = Template.parse(sent[0]).vectors("SCHED_ACTION")
    assert dict(vector.items()) == {"ACTION": "backup", "ARGS": "100,0", "TIME": "+60", "REPEAT": "1",
                                    "DAYS": "1,31", "END_TYPE": "1", "END_VALUE": "2"}  # fmt: skip
    assert capsys.readouterr().out == "ID: 9\n"  # the action is gone from the VM: only its id is known
