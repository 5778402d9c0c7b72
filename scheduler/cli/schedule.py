"""``vmsched schedule next``: when the SCHED_ACTIONs of a template file would run (no daemon needed).

Each action is validated as the daemon validates it at VM creation (relative times "+N" count from
``--now``; the backup datastore is not checked, there are no objects offline), then its next runs
are listed as the engine would make them, one per line: ``<index> <epoch> <ISO time in --tz>``.
A due action (TIME <= --now) first lists its catch-up run, labelled with its occurrence.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from scheduler.actions.registry import validate_action
from scheduler.cli.client import UsageError
from scheduler.cli.context import Context
from scheduler.errors import ValidationError
from scheduler.model.schedule import SchedAction, parse_sched_action, upcoming
from scheduler.model.template import Template, Vector

EXIT_INVALID = 2
DEFAULT_COUNT = 5


def parse_template_actions(template: Template, now: int) -> list[SchedAction]:
    """The template's actions, validated; the first invalid one raises, naming its index."""
    actions = []
    for index, value in enumerate(template.values("SCHED_ACTION")):
        try:
            if not isinstance(value, Vector):
                raise ValidationError("must be a vector: SCHED_ACTION = [ ACTION = ..., TIME = ..., ... ]")
            actions.append(parse_sched_action(value, origin=now, validate_action=validate_action))
        except ValidationError as exc:
            raise ValidationError(f"SCHED_ACTION #{index}: {exc}") from None
    return actions


def next_runs(ctx: Context, args: argparse.Namespace) -> int:
    zone = _zone(args.tz)
    template = ctx.read_template(args.file)
    source = "<stdin>" if args.file == "-" else args.file
    if not template.values("SCHED_ACTION"):
        raise UsageError(f"{source}: no SCHED_ACTION to schedule")
    try:
        actions = parse_template_actions(template, args.now)
    except ValidationError as exc:
        ctx.err.write(f"{source}: {exc}\n")
        return EXIT_INVALID
    for index, action in enumerate(actions):
        for instant in upcoming(action, now=args.now, tz=zone, count=args.count):
            ctx.print(f"{index} {instant} {datetime.fromtimestamp(instant, zone).isoformat()}")
    return 0


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise UsageError(f"unknown time zone {name!r} (expected an IANA name such as Europe/Paris)") from None


def _epoch(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"not an epoch (seconds since 1970): {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {text!r}")
    return int(text)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("schedule", help="work on SCHED_ACTIONs offline", parents=[common])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    text = "list the next runs of each SCHED_ACTION of a template file"
    p = sub.add_parser("next", help=text, description=text, parents=[common])
    p.add_argument("file", metavar="FILE", help="template file, - for standard input")
    p.add_argument("--now", metavar="EPOCH", type=_epoch, required=True, help='the present, and the origin of "+N"')
    p.add_argument(
        "--count", metavar="N", type=_count, default=DEFAULT_COUNT, help=f"runs per action ({DEFAULT_COUNT})"
    )
    p.add_argument("--tz", metavar="ZONE", default="UTC", help="time zone of the schedule (UTC)")
    p.set_defaults(handler=next_runs)
