"""``vmsched vm backup`` and ``vm backup-cancel``: a backup now (followed with a progress bar) or on a
schedule (``--schedule`` with onevm's repeat options, spec §10.2)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from datetime import time as wall_time

from lxml import etree

from scheduler.cli.client import UsageError
from scheduler.cli.context import Context, add_id_command
from scheduler.cli.datastores import DATASTORES
from scheduler.cli.progress import Progress, ProgressView
from scheduler.cli.states import LCM_STATES, name_of
from scheduler.cli.tables import (
    field,
    format_time,
    number_of,
    parse_xml,
    pretty_xml,
    time_until,
    to_json,
)
from scheduler.cli.vmpool import BACKUP_LCM_STATES, VMS, backup_progress
from scheduler.engine.clock import SystemClock
from scheduler.errors import ValidationError
from scheduler.model.schedule import (
    MAX_EPOCH,
    EndType,
    Repeat,
    SchedAction,
    is_due,
    is_pending,
    parse_days,
    parse_sched_action,
    parse_time,
)
from scheduler.model.template import Template, Vector

WAIT_POLL = 0.5  # seconds between two looks at a waited-for backup
FINISHED = {"done": True, "given_up": False, "failed": False, "cancelled": False, "interrupted": False}
REPEAT_OPTIONS = (("weekly", Repeat.WEEKLY), ("monthly", Repeat.MONTHLY), ("yearly", Repeat.YEARLY),
                  ("hourly", Repeat.HOURLY))  # fmt: skip
DATE_FORMATS = "YYYY-MM-DD[ HH:MM[:SS]], MM/DD[/YYYY][ HH:MM], HH:MM (local time)"
DATE_HELP = f"now, +SECONDS after the VM's start (STIME), or a date: {DATE_FORMATS}"


def parse_date(text: str, now: int, zone: tzinfo | None = None) -> int | None:
    """The epoch of a date as onevm reads one, None when it is not one.

    ISO 8601 (``2024-09-23``, ``2024-09-23 14:15``, ``2024-09-23T14:15:00+02:00``), ``MM/DD[/YYYY]``
    with an optional ``HH:MM[:SS]`` (the year of ``now``), or ``HH:MM[:SS]`` alone (the day of
    ``now``). Without an offset the date is wall-clock time in ``zone`` (None: the local zone).
    """
    local_now = datetime.fromtimestamp(now, UTC).astimezone(zone)
    wall = _wall_clock(" ".join(text.split()), local_now)
    if wall is None:
        return None
    if wall.tzinfo is None:
        wall = wall.replace(tzinfo=zone) if zone is not None else wall.astimezone()
    epoch = int(wall.timestamp())
    return epoch if 0 <= epoch <= MAX_EPOCH else None


def _wall_clock(text: str, local_now: datetime) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        pass
    clock = _clock(text)
    if clock is not None:
        return datetime.combine(local_now.date(), clock)
    day_text, _, clock_text = text.partition(" ")
    clock = _clock(clock_text) if clock_text else wall_time(0, 0)
    if day_text.count("/") == 1:
        day_text = f"{day_text}/{local_now.year}"
    try:
        day = datetime.strptime(day_text, "%m/%d/%Y").replace(tzinfo=UTC).date()
    except ValueError:
        return None
    return datetime.combine(day, clock) if clock is not None else None


def _clock(text: str) -> wall_time | None:
    for layout in ("%H:%M", "%H:%M:%S"):
        try:
            return datetime.strptime(text, layout).replace(tzinfo=UTC).time()
        except ValueError:
            continue
    return None


def schedule_time(text: str, now: int, zone: tzinfo | None = None) -> str:
    """The TIME attribute for ``--schedule``: ``now`` as an epoch, ``+N`` as it is, a date as an epoch."""
    given = text.strip()
    if given.lower() == "now":
        return str(now)
    if given.startswith("+"):
        if parse_time(given, 0) is None:
            raise UsageError(f"--schedule {text!r}: +N needs a whole number of seconds")
        return given
    epoch = parse_date(given, now, zone)
    if epoch is None:
        raise UsageError(f"--schedule {text!r}: not a time; expected {DATE_HELP}")
    return str(epoch)


def _repeat_option(args: argparse.Namespace) -> tuple[str, Repeat, str] | None:
    """The repeat option given (argparse lets at most one through): its name, REPEAT and value."""
    for name, repeat in REPEAT_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            return name, repeat, value
    return None


def _days(name: str, repeat: Repeat, value: str) -> str:
    if repeat == Repeat.HOURLY and not _isnumber_of(value):
        raise UsageError(f"--hourly {value!r}: expected the number of hours between two runs, in [1,167]")
    try:
        return ",".join(str(day) for day in sorted(parse_days(value, repeat)))
    except ValidationError as exc:
        raise UsageError(f"--{name} {value!r}: {exc}") from None


def _isnumber_of(text: str) -> bool:
    return text.strip().isascii() and text.strip().isdigit()


def _end_option(text: str, first: int, now: int, zone: tzinfo | None) -> tuple[EndType, int]:
    if _isnumber_of(text):
        return EndType.TIMES, int(text)
    epoch = parse_date(text, now, zone)
    if epoch is None:
        raise UsageError(f"--end {text!r}: expected a number of repetitions or a date ({DATE_FORMATS})")
    if epoch < first:
        raise UsageError(
            f"--end {text!r}: ends at {format_time(str(epoch))}, before the first run at {format_time(str(first))}"
        )
    return EndType.DATE, epoch


def backup_action(
    args: argparse.Namespace, ds_id: int, *, now: int, stime: int, zone: tzinfo | None = None
) -> tuple[Vector, int]:
    """The SCHED_ACTION of ``vm backup --schedule ...`` and the epoch of its first run.

    Each bad option raises UsageError naming it. ``stime`` is the VM's start time, which "+N"
    counts from (as the daemon does); ``zone`` reads dates (None: the local zone).
    """
    time_text = schedule_time(args.schedule, now, zone)
    first = parse_time(time_text, stime)
    if first is None:
        raise UsageError(f"--schedule {args.schedule!r}: out of range")
    vector = Vector([("ACTION", "backup"), ("ARGS", f"{ds_id},{int(args.reset)}"), ("TIME", time_text)])
    repeat = _repeat_option(args)
    if repeat is None and args.end is not None:
        raise UsageError("--end needs a repeat: --weekly, --monthly, --yearly or --hourly")
    if repeat is not None:
        name, kind, value = repeat
        end_type, end_value = _end_option(args.end, first, now, zone) if args.end is not None else (EndType.NEVER, -1)
        vector["REPEAT"], vector["DAYS"] = str(int(kind)), _days(name, kind, value)
        vector["END_TYPE"], vector["END_VALUE"] = str(int(end_type)), str(end_value)
    try:
        parse_sched_action(vector, origin=stime)  # what the daemon checks first, before sending it
    except ValidationError as exc:
        raise UsageError(f"--schedule: {exc}") from None
    return vector, first


def _check_backup_options(args: argparse.Namespace, ds_id: int) -> None:
    if args.schedule is not None:
        if ds_id < 0:
            raise UsageError("--schedule needs -d/--datastore: a scheduled backup names its datastore")
        return
    given = [f"--{name}" for name, _ in (*REPEAT_OPTIONS, ("end", None)) if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{given[0]} needs --schedule")


def backup(ctx: Context, args: argparse.Namespace) -> int:
    """``vm backup VM [-d DS] [--reset] [--wait]``: queue a backup; --wait follows it to its end.

    With ``--schedule`` (and a repeat, an end) it adds a SCHED_ACTION instead (spec §10.2).
    """
    vm_id = ctx.resolve(VMS, args.vm)
    ds_id = ctx.resolve(DATASTORES, args.datastore) if args.datastore is not None else -1
    _check_backup_options(args, ds_id)
    if args.schedule is not None:
        return schedule_backup(ctx, args, vm_id, ds_id)
    ctx.call("one.vm.backup", vm_id, ds_id, args.reset)
    if not args.wait:
        return 0
    return wait_backup(ctx, vm_id, args.wait_timeout)


def schedule_backup(ctx: Context, args: argparse.Namespace, vm_id: int, ds_id: int) -> int:
    """Add the SCHED_ACTION, print its id and next run; --wait (a backup due now) follows its run."""
    now = int(SystemClock().now())
    vm = parse_xml(str(ctx.call("one.vm.info", vm_id, False)))
    vector, first = backup_action(args, ds_id, now=now, stime=int(field(vm, "STIME", "0")))
    if args.wait and first > now:
        raise UsageError(
            f"--wait follows a backup that starts now, but --schedule {args.schedule!r} "
            f"runs at {format_time(str(first))}"
        )
    template = Template()
    template.add("SCHED_ACTION", vector)
    sa_id = int(str(ctx.call("one.vm.schedadd", vm_id, template.render())))
    action = _sched_action(parse_xml(str(ctx.call("one.vm.info", vm_id, False))), sa_id)
    _print_scheduled(ctx, sa_id, action, now)
    if not args.wait:
        return 0
    return follow(ctx, vm_id, args.wait_timeout, lambda: _look_scheduled(ctx, vm_id, sa_id))


def _sched_action(vm: etree._Element, sa_id: int) -> etree._Element | None:
    for action in vm.findall("TEMPLATE/SCHED_ACTION"):
        if field(action, "ID") == str(sa_id):
            return action
    return None


def _print_scheduled(ctx: Context, sa_id: int, action: etree._Element | None, now: int) -> None:
    """``ID: 7`` and ``NEXT: <date> (in 3 days)``; --json/--xml: the stored SCHED_ACTION."""
    if action is None:  # deleted in between: only the id is known
        ctx.print_id(sa_id)
    elif ctx.output == "xml":
        ctx.print(pretty_xml(action))
    elif ctx.output == "json":
        ctx.print(json.dumps(to_json(action), indent=2))
    else:
        ctx.print_id(sa_id)
        ctx.print(f"NEXT: {next_run_text(sched_action_of(action), now)}")


def sched_action_of(element: etree._Element) -> SchedAction:
    """A ``<SCHED_ACTION>`` of the VM's XML as a SchedAction (empty elements take the defaults)."""
    return SchedAction.from_vector(Vector([(child.tag, child.text) for child in element if child.text]))


def next_run_text(action: SchedAction, now: int) -> str:
    """When the action runs next, as told after adding it: a date and how far, or that it is due."""
    if is_due(action, now):
        return f"{format_time(str(action.time))} (due now)"
    if not is_pending(action):
        return "- (finished)"
    return f"{format_time(str(action.time))} (in {time_until(action.time - now)})"


# -- following a backup (--wait) -------------------------------------------------------------------


@dataclass(frozen=True)
class Look:
    """One look at a followed backup: its state, and once it ended, the exit status and last line."""

    state: str
    progress: Progress | None = None
    end: int | None = None
    line: str = ""


def follow(ctx: Context, vm_id: int, timeout: float, look: Callable[[], Look]) -> int:
    """Poll ``look`` until the backup ends or ``timeout`` passes, showing its progress meanwhile."""
    view = ProgressView(ctx.out, f"backup of VM {vm_id}", tty=_is_terminal(ctx.out))
    deadline = time.monotonic() + timeout
    try:
        while True:
            seen = look()
            view.show(seen.progress)
            if seen.end is not None:
                status, line = seen.end, seen.line
                break
            if time.monotonic() > deadline:
                status, line = 1, f"backup of VM {vm_id}: still {seen.state} after {timeout:g} s"
                break
            time.sleep(WAIT_POLL)
    finally:
        view.finish()
    ctx.print(line)
    return status


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


def wait_backup(ctx: Context, vm_id: int, timeout: float) -> int:
    """Follow the VM's last one-shot backup run: 0 when it is done; 1 when an attempt failed or time ran out."""
    return follow(ctx, vm_id, timeout, lambda: _look_one_shot(ctx, vm_id))


def _look_one_shot(ctx: Context, vm_id: int) -> Look:
    status = ctx.call("vmsched.vm.backupstatus", vm_id)
    assert isinstance(status, dict)
    state, message = str(status["STATE"]), str(status.get("MESSAGE") or "")
    progress = Progress.from_struct(status.get("PROGRESS"))
    if state in FINISHED:
        return Look(
            state, progress, 0 if FINISHED[state] else 1, f"backup of VM {vm_id}: {state}: {message}".rstrip(": ")
        )
    if state == "queued" and int(status["ATTEMPT"]) > 0 and message:
        line = f"backup of VM {vm_id}: attempt {status['ATTEMPT']} failed: {message} (it will be retried)"
        return Look(state, progress, 1, line)
    return Look(state, progress)


def _look_scheduled(ctx: Context, vm_id: int, sa_id: int) -> Look:
    """A scheduled action's run: DONE set means it succeeded, MESSAGE set that a run failed."""
    vm = parse_xml(str(ctx.call("one.vm.info", vm_id, False)))
    action = _sched_action(vm, sa_id)
    if action is None:
        return Look("deleted", None, 1, f"backup of VM {vm_id}: scheduled action {sa_id} was deleted")
    message, done, when = field(action, "MESSAGE"), number_of(action, "DONE") or -1, number_of(action, "TIME") or 0
    if message:
        retried = " (it will be retried)" if when > done else ""
        return Look("failed", None, 1, f"backup of VM {vm_id}: scheduled action {sa_id} failed: {message}{retried}")
    if done > 0:
        return Look("done", None, 0, f"backup of VM {vm_id}: done")
    if name_of(LCM_STATES, field(vm, "LCM_STATE")) in BACKUP_LCM_STATES:
        return Look("running", backup_progress(ctx, vm_id))
    return Look("queued")


def backup_cancel(ctx: Context, args: argparse.Namespace) -> int:
    """``vm backup-cancel VM``: stop its running (or waiting) backup; its cleanup runs on the host."""
    vm_id = ctx.resolve(VMS, args.vm)
    ctx.call("one.vm.backupcancel", vm_id)
    ctx.print(f"backup of VM {vm_id}: cancel requested")
    return 0



def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """``vm backup`` and ``vm backup-cancel``, under the ``vm`` command's ``sub`` parsers."""
    p = add_id_command(
        sub, common, "backup", "back up a VM now (through the engine's limits), or schedule it", "vm", backup
    )
    p.add_argument("-d", "--datastore", metavar="DS", help="backup datastore id or name (default: the last one used)")
    p.add_argument("--reset", action="store_true", help="start a new increment chain")
    p.add_argument(
        "--wait", action="store_true", help="wait for the backup to end, showing its progress; exit 1 if it failed"
    )
    p.add_argument("--wait-timeout", type=float, default=6 * 3600.0, help="seconds --wait waits at most")
    p.add_argument("--schedule", metavar="TIME", help=f"add a scheduled backup instead, first run at TIME: {DATE_HELP}")
    repeat = p.add_mutually_exclusive_group()
    repeat.add_argument("--weekly", metavar="D,D", help="repeat on these week days (0-6, 0 = Sunday)")
    repeat.add_argument("--monthly", metavar="D,D", help="repeat on these days of the month (1-31)")
    repeat.add_argument("--yearly", metavar="D,D", help="repeat on these days of the year (0-365, 0 = January 1)")
    repeat.add_argument("--hourly", metavar="N", help="repeat every N hours (1-167)")
    p.add_argument("--end", metavar="N|DATE", help="stop repeating after N more runs, or after DATE")

    add_id_command(
        sub, common, "backup-cancel", "cancel the VM's backup in progress (onevm backup-cancel)", "vm", backup_cancel
    )
