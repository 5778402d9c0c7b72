"""SCHED_ACTION: validation and the calendar maths of when an action runs next (spec §2).

Everything here is pure: the current time is always the ``now`` parameter (epoch seconds) and the
zone a ``ZoneInfo``. OpenNebula's meaning is kept (weekly DAYS 0-6 with Sunday = 0, monthly 1-31,
yearly day of year 0-365, hourly every N hours; the wall-clock time of day of TIME is kept), with
these deliberate departures (spec §12 items 5-8):

* The next TIME is the first occurrence after both the old TIME and ``now``: a late run (daemon
  down) never yields a past TIME and never kills the action (OpenNebula adds a delta computed
  from today to the old TIME, once).
* Days are calendar days in the configured zone, so the wall-clock time survives DST changes. A
  wall-clock time that does not exist (spring forward) runs at the first valid instant after the
  gap; one that exists twice (fall back) runs at its first occurrence. Hourly repeats count
  elapsed hours and ignore DST.
* A monthly day beyond the month's length runs on the month's last day (DAYS=31 runs on Apr 30,
  Feb 28/29) instead of rolling into the next month; likewise yearly day 365 runs on Dec 31 in
  non-leap years.
* END_TYPE=DATE: no repetition is scheduled after the end date (OpenNebula allows one more).
  END_TYPE>0 without END_VALUE is rejected (OpenNebula accepts it and ends after one run).
* The hourly range message says the range really accepted, [1,167].
* REPEAT=4 is our cron extension: DAYS holds a five-field cron expression ("m h dom mon dow")
  evaluated in the zone. The XSD admits no CRON element, so ``CRON = "..."`` in input is stored
  as REPEAT=4 with the expression in DAYS.

The time of day comes from ``SchedAction.anchor``, the TIME as last given in input. It is not part
of OpenNebula's XML (the store keeps it beside the body): TIME alone cannot carry it, since every
wall-clock time inside a spring-forward gap runs at the same instant (02:30 -> 03:00) and the next
day must be back at 02:30. Without an anchor (-1, e.g. an action read from XML) TIME is used.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from datetime import time as wall_time
from enum import IntEnum
from itertools import islice
from typing import Literal, Protocol
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

from scheduler.errors import ValidationError
from scheduler.model.template import Vector


class Repeat(IntEnum):
    NONE = -1
    WEEKLY = 0
    MONTHLY = 1
    YEARLY = 2
    HOURLY = 3
    CRON = 4  # vmsched extension: DAYS holds a cron expression


class EndType(IntEnum):
    NONE = -1
    NEVER = 0
    TIMES = 1
    DATE = 2


# ScheduledAction::VM_ACTIONS (spec §2.8); the actions registry refines this through a hook.
VM_ACTIONS = frozenset(
    {
        "terminate", "terminate-hard", "undeploy", "undeploy-hard", "hold", "release", "stop",
        "suspend", "resume", "reboot", "reboot-hard", "poweroff", "poweroff-hard",
        "snapshot-create", "snapshot-revert", "snapshot-delete",
        "disk-snapshot-create", "disk-snapshot-revert", "disk-snapshot-delete", "backup",
    }
)  # fmt: skip

# Element order of the SCHED_ACTION complex type (shared.xsd, used by vm.xsd and backupjob.xsd).
XML_ORDER = (
    "ID", "PARENT_ID", "TYPE", "ACTION", "ARGS", "TIME", "REPEAT", "DAYS",
    "END_TYPE", "END_VALUE", "DONE", "MESSAGE", "WARNING",
)  # fmt: skip

MAX_EPOCH = 32503680000  # 3000-01-01T00:00:00Z: later times are rejected as unparsable
MAX_MISSED_RUNS = 1000  # bound of the ALL missed-runs policy
MissedRuns = Literal["ONCE", "SKIP", "ALL"]
ActionValidator = Callable[[str, str], None]

_CALENDAR = (Repeat.WEEKLY, Repeat.MONTHLY, Repeat.YEARLY)
_INT_RE = re.compile(r"[+-]?\d+")
_DAY_RULES = {
    Repeat.WEEKLY: (0, 6, "Days in a week have to be in [0,6] range"),
    Repeat.MONTHLY: (1, 31, "Days in a month have to be in [1,31] range"),
    Repeat.YEARLY: (0, 365, "Days in a year have to be in [0,365] range"),
    Repeat.HOURLY: (1, 167, "Hours have to be in [1,167] range"),
}
_SCAN_DAYS = 800  # more than any gap between two calendar occurrences (yearly: 366 days)
_CRON_STEPS = 10_000  # cron candidates examined before giving up (a fall-back hour skips 60)


@dataclass(frozen=True)
class SchedAction:
    """One scheduled action as stored (spec §2.2). Times are epoch seconds; -1 means unset."""

    id: int = -1
    parent_id: int = -1
    type: str = "VM"  # "VM" | "BACKUPJOB"
    action: str = ""
    args: str = ""
    time: int = -1
    repeat: int = Repeat.NONE
    days: str = ""
    end_type: int = EndType.NONE
    end_value: int = -1
    done: int = -1
    message: str = ""
    warning: int = 0
    anchor: int = -1  # not in the XML: the TIME as given, whose time of day calendar repeats keep

    def to_vector(self) -> Vector:
        """The stored form; insertion order is the XSD element order (``XML_ORDER``)."""
        return Vector([(name, _text(getattr(self, name.lower()))) for name in XML_ORDER])

    @classmethod
    def from_vector(cls, vector: Vector, *, anchor: int = -1) -> SchedAction:
        """Read the stored form back (missing elements take OpenNebula's defaults)."""
        defaults = cls()
        values: dict[str, object] = {"anchor": anchor}
        for name in XML_ORDER:
            field = name.lower()
            default = getattr(defaults, field)
            raw = vector.get(name)
            if raw is None:
                values[field] = default
            elif isinstance(default, int):
                values[field] = _stored_int(name, raw)
            else:
                values[field] = raw
        return cls(**values)  # type: ignore[arg-type]


def _text(value: object) -> str:
    return str(int(value)) if isinstance(value, int) else str(value)  # IntEnum members as numbers


def _stored_int(name: str, raw: str) -> int:
    if not _INT_RE.fullmatch(raw.strip()):
        raise ValidationError(f"SCHED_ACTION/{name} is not an integer: {raw!r}")
    return int(raw)


# ---- validation (ScheduledAction::parse, spec §2.3) ----------------------------------------------


def parse_sched_action(
    vector: Vector,
    *,
    origin: int,
    current: SchedAction | None = None,
    parent_type: str = "VM",
    validate_action: ActionValidator | None = None,
) -> SchedAction:
    """Validate a SCHED_ACTION vector; with ``current`` it is merged into that action (update).

    Attributes the vector does not carry keep their current value. ``origin`` resolves relative
    times ("+N", the VM's STIME). DONE and MESSAGE are never taken from input. ``validate_action``
    (action, args) replaces the built-in check of the action name when given.
    """
    base = current or SchedAction(type=parent_type)
    if base.type not in ("VM", "BACKUPJOB"):
        raise ValidationError("Not supported object type")
    relative_ok = base.type == "VM"
    args = _given(vector, "ARGS", base.args)
    if base.type == "BACKUPJOB":
        action, args = "backup", ""
    else:
        action = _parse_action(vector.get("ACTION"), base.action, args, validate_action)
    time = _parse_time_attribute(vector.get("TIME"), base.time, origin, relative_ok)
    warning = _parse_warning(vector.get("WARNING"), base.warning, origin, relative_ok)
    repeat, days = _parse_repeat(vector, base)
    end_type, end_value = _parse_end(vector, base)
    anchor = base.anchor if time == base.time else time
    return replace(
        base, action=action, args=args, time=time, anchor=anchor, warning=warning, repeat=repeat,
        days=days, end_type=end_type, end_value=end_value,
    )  # fmt: skip


def _given(vector: Vector, name: str, default: str) -> str:
    value = vector.get(name)
    return default if value is None else value


def _parse_action(given: str | None, current: str, args: str, hook: ActionValidator | None) -> str:
    action = current
    if given:
        if hook is None and given not in VM_ACTIONS:
            raise ValidationError(f"{given} is not supported.")
        action = given
    if not action:
        raise ValidationError("No ACTION in template for Scheduled Action.")
    if hook is not None:
        hook(action, args)
    return action


def parse_time(text: str, origin: int, *, relative_ok: bool = True) -> int | None:
    """Spec §2.4: "+N" is origin + N, otherwise an integer epoch; None when it does not parse."""
    text = text.strip()
    relative = text.startswith("+")
    digits = text[1:] if relative else text
    if not digits.isascii() or not digits.isdigit() or (relative and not relative_ok):
        return None
    value = int(digits) + (origin if relative else 0)
    return value if 0 <= value <= MAX_EPOCH else None


def _parse_time_attribute(given: str | None, current: int, origin: int, relative_ok: bool) -> int:
    if given and given.strip():
        value = parse_time(given, origin, relative_ok=relative_ok)
        if value is not None:
            return value
    elif current != -1:
        return current
    raise ValidationError(f"Unable to parse the time value or value is empty: {given or ''}")


def _parse_warning(given: str | None, current: int, origin: int, relative_ok: bool) -> int:
    if given is None or not given.strip():
        return current
    value = parse_time(given, origin, relative_ok=relative_ok)
    if value is None:
        raise ValidationError(f"Unable to parse the warning value: {given}")
    return value


def _parse_repeat(vector: Vector, base: SchedAction) -> tuple[int, str]:
    raw = vector.get("REPEAT")
    cron = vector.get("CRON")
    repeat = base.repeat
    if raw is not None and raw.strip():
        if not _INT_RE.fullmatch(raw.strip()) or not Repeat.NONE <= int(raw) <= Repeat.CRON:
            raise ValidationError(f"Wrong REPEAT value: {raw}")
        repeat = int(raw)
    days = _given(vector, "DAYS", base.days)
    if cron is not None and cron.strip():
        if raw is not None and raw.strip() and repeat != Repeat.CRON:
            raise ValidationError(f"CRON cannot be combined with REPEAT={raw}")
        if vector.get("DAYS") is not None:
            raise ValidationError("CRON and DAYS cannot both be set")
        repeat, days = int(Repeat.CRON), cron
    if repeat == Repeat.NONE:
        return repeat, ""
    if not days.strip():
        raise ValidationError("Repeat set, but DAYS are empty")
    if repeat == Repeat.CRON:
        return repeat, validate_cron(days)
    parse_days(days, repeat)
    return repeat, days


def parse_days(days: str, repeat: int) -> frozenset[int]:
    """DAYS as a set of ints, checked against the range of ``repeat`` (spec §2.3 rule 5)."""
    tokens = [token.strip() for token in days.split(",") if token.strip()]
    if not tokens:
        raise ValidationError("Repeat set, but DAYS are empty")
    low, high, message = _DAY_RULES[Repeat(repeat)]
    if not all(_INT_RE.fullmatch(token) for token in tokens):
        raise ValidationError(message)
    values = frozenset(int(token) for token in tokens)
    if min(values) < low or max(values) > high or (repeat == Repeat.HOURLY and len(values) != 1):
        raise ValidationError(message)
    return values


def validate_cron(expression: str) -> str:
    """A five-field cron expression that matches some date, normalised to single spaces."""
    normalized = " ".join(expression.split())
    if len(normalized.split(" ")) != 5 or not croniter.is_valid(normalized):
        raise ValidationError(
            f'Wrong CRON expression, expected "minute hour day-of-month month day-of-week": {expression}'
        )
    try:
        croniter(normalized, datetime(2000, 1, 1)).get_next(datetime)  # noqa: DTZ001 - wall clock
    except CroniterBadDateError:
        raise ValidationError(f"CRON expression never matches a date: {expression}") from None
    return normalized


def _parse_end(vector: Vector, base: SchedAction) -> tuple[int, int]:
    raw = vector.get("END_TYPE")
    end_type = base.end_type
    if raw is not None and raw.strip():
        if not _INT_RE.fullmatch(raw.strip()) or not EndType.NONE <= int(raw) <= EndType.DATE:
            raise ValidationError(f"Wrong END_TYPE value: {raw}")
        end_type = int(raw)
    if end_type <= EndType.NEVER:
        return end_type, -1
    given = vector.get("END_VALUE")
    if given is None or not given.strip():
        if base.end_value < 0:
            raise ValidationError("END_TYPE set, but END_VALUE is empty")
        given = str(base.end_value)
    valid = _INT_RE.fullmatch(given.strip()) is not None
    if end_type == EndType.TIMES and (not valid or int(given) < 0):
        raise ValidationError("Error parsing END_VALUE, times has to be greater or equal to 0")
    if end_type == EndType.DATE and (not valid or not 0 <= int(given) <= MAX_EPOCH):
        raise ValidationError("Error parsing END_VALUE, wrong format for date.")
    return end_type, int(given)


# ---- wall clock <-> instants ---------------------------------------------------------------------


def wall_clock(instant: int, tz: ZoneInfo) -> datetime:
    """The naive local date and time of an epoch in ``tz``."""
    return datetime.fromtimestamp(instant, tz).replace(tzinfo=None)


def local_instant(wall: datetime, tz: ZoneInfo) -> int:
    """The epoch of a naive wall-clock time in ``tz``.

    Ambiguous (fall back): the first occurrence. Nonexistent (spring forward): the first valid
    instant after the gap, i.e. the transition itself.
    """
    wall = wall.replace(microsecond=0)
    instants = [int(wall.replace(tzinfo=tz, fold=fold).timestamp()) for fold in (0, 1)]
    for instant in instants:
        if wall_clock(instant, tz) == wall:
            return instant
    low, high = min(instants), max(instants)  # the gap's transition lies in (low, high]
    before = _offset(low, tz)
    while high - low > 1:
        middle = (low + high) // 2
        if _offset(middle, tz) == before:
            low = middle
        else:
            high = middle
    return high


def _offset(instant: int, tz: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(instant, tz).utcoffset()


# ---- recurrence rules ----------------------------------------------------------------------------


class _Rule(Protocol):
    def after(self, ref: int) -> int | None: ...

    def at_or_before(self, ref: int) -> int | None: ...


@dataclass(frozen=True)
class _Hourly:
    """Every ``step`` seconds from ``start`` (elapsed time, DST does not matter)."""

    start: int
    step: int

    def after(self, ref: int) -> int | None:
        if ref < self.start:
            return self.start
        return self.start + ((ref - self.start) // self.step + 1) * self.step

    def at_or_before(self, ref: int) -> int | None:
        if ref < self.start:
            return None
        return self.start + ((ref - self.start) // self.step) * self.step


@dataclass(frozen=True)
class _Calendar:
    """Days of the week / month / year at a fixed wall-clock time of day."""

    repeat: int
    days: frozenset[int]
    clock: wall_time
    tz: ZoneInfo

    def after(self, ref: int) -> int | None:
        start = wall_clock(ref, self.tz).date() - timedelta(days=1)
        for offset in range(_SCAN_DAYS):
            instant = self._on(start + timedelta(days=offset))
            if instant is not None and instant > ref:
                return instant
        return None

    def at_or_before(self, ref: int) -> int | None:
        start = wall_clock(ref, self.tz).date() + timedelta(days=1)
        for offset in range(_SCAN_DAYS):
            instant = self._on(start - timedelta(days=offset))
            if instant is not None and instant <= ref:
                return instant
        return None

    def _on(self, day: date) -> int | None:
        if not self._matches(day):
            return None
        return local_instant(datetime.combine(day, self.clock), self.tz)

    def _matches(self, day: date) -> bool:
        if self.repeat == Repeat.WEEKLY:
            return day.isoweekday() % 7 in self.days
        tomorrow = day + timedelta(days=1)
        if self.repeat == Repeat.MONTHLY:
            number, last = day.day, tomorrow.month != day.month
        else:
            number, last = day.timetuple().tm_yday - 1, tomorrow.year != day.year
        # A day the period does not have (31 in April, 365 in a common year) runs on its last day.
        return number in self.days or (last and max(self.days) > number)


@dataclass(frozen=True)
class _Cron:
    """A cron expression evaluated on wall-clock time in ``tz``."""

    expression: str
    tz: ZoneInfo

    def after(self, ref: int) -> int | None:
        walls = croniter(self.expression, wall_clock(ref, self.tz))
        return self._first(lambda: walls.get_next(datetime), lambda instant: instant > ref)

    def at_or_before(self, ref: int) -> int | None:
        walls = croniter(self.expression, wall_clock(ref, self.tz) + timedelta(seconds=1))
        return self._first(lambda: walls.get_prev(datetime), lambda instant: instant <= ref)

    def _first(self, step: Callable[[], datetime], accept: Callable[[int], bool]) -> int | None:
        # Wall times map to instants monotonically, so only a fall-back hour (walls that resolve
        # to their first occurrence, before ``ref``) or a gap (many walls, one instant) is skipped.
        try:
            for _ in range(_CRON_STEPS):
                instant = local_instant(step(), self.tz)
                if accept(instant):
                    return instant
        except CroniterBadDateError:
            return None
        return None


def _rule(sa: SchedAction, tz: ZoneInfo) -> _Rule | None:
    if sa.repeat == Repeat.NONE or not sa.days.strip():
        return None
    if sa.repeat == Repeat.CRON:
        return _Cron(validate_cron(sa.days), tz)
    days = parse_days(sa.days, sa.repeat)
    if sa.repeat == Repeat.HOURLY:
        return _Hourly(sa.time, min(days) * 3600)
    anchor = sa.anchor if sa.anchor >= 0 else sa.time
    return _Calendar(sa.repeat, days, wall_clock(anchor, tz).time(), tz)


def _past_end(sa: SchedAction, instant: int) -> bool:
    return sa.end_type == EndType.DATE and instant > sa.end_value


# ---- next execution ------------------------------------------------------------------------------


def _times_used_up(sa: SchedAction) -> bool:
    return sa.end_type == EndType.TIMES and sa.end_value <= 0


def is_pending(sa: SchedAction) -> bool:
    """TIME is an occurrence not yet closed (OpenNebula: ``time > done``)."""
    return sa.time > sa.done


def is_due(sa: SchedAction, now: int) -> bool:
    return is_pending(sa) and sa.time <= now


def next_time(sa: SchedAction, *, now: int, tz: ZoneInfo) -> int | None:
    """The occurrence that follows a successful or given-up run at ``now``; None when finished.

    Always later than both the old TIME and ``now``. END_TYPE=TIMES with END_VALUE <= 0 and an
    occurrence after END_TYPE=DATE's END_VALUE finish the action.
    """
    rule = _rule(sa, tz)
    if rule is None or _times_used_up(sa):
        return None
    candidate = rule.after(max(sa.time, now))
    if candidate is None or _past_end(sa, candidate):
        return None
    return candidate


def after_run(sa: SchedAction, *, now: int, tz: ZoneInfo, success: bool, message: str = "") -> SchedAction:
    """The action after a run finished at ``now``: succeeded, or failed and given up.

    Success sets DONE = now and clears MESSAGE; a given-up run keeps DONE and sets MESSAGE (as the
    caller formatted it). Either way the occurrence is consumed: TIME moves to ``next_time`` and
    END_TYPE=TIMES spends one of END_VALUE; calendar and cron repeats reset WARNING. When nothing
    follows, the action is closed with TIME <= DONE = now (also after a given-up last run, so it
    is never due again; MESSAGE then tells it failed).

    A run finishing at ``now`` is for an occurrence at or before ``now``: when TIME is already
    later, an earlier run of the same catch-up batch (policy ALL) has moved it, and this run only
    spends END_VALUE, so calling ``after_run`` once per run of a batch is correct.
    """
    if sa.time > now and _rule(sa, tz) is not None and not _times_used_up(sa):
        following: int | None = sa.time
    else:
        following = next_time(sa, now=now, tz=tz)
    message = "" if success else message
    if following is None:
        return replace(sa, time=min(sa.time, now), done=now, message=message)
    return replace(
        sa,
        time=following,
        done=now if success else sa.done,
        message=message,
        end_value=sa.end_value - 1 if sa.end_type == EndType.TIMES else sa.end_value,
        warning=0 if sa.repeat in (*_CALENDAR, Repeat.CRON) else sa.warning,
    )


def skip_missed(sa: SchedAction, *, now: int, tz: ZoneInfo) -> SchedAction:
    """TIME moved to the next occurrence after ``now`` without a run (policy SKIP).

    DONE, MESSAGE and END_VALUE are untouched; unchanged when no occurrence follows (then
    ``due_occurrences`` asks for the last one to run).
    """
    following = next_time(sa, now=now, tz=tz)
    return sa if following is None else replace(sa, time=following)


# ---- missed runs ---------------------------------------------------------------------------------


def due_occurrences(sa: SchedAction, *, now: int, tz: ZoneInfo, policy: str = "ONCE") -> list[int]:
    """The occurrences to run now for a due action (TIME <= now, not yet done), oldest first.

    The occurrences of an action are its TIME and then each following occurrence of its repeat
    (bounded by END_TYPE=DATE). Those up to ``now`` were missed (the daemon was down, or TIME was
    set in the past). Per ``policy`` (MISSED_RUNS, case-insensitive):

    * ONCE: one catch-up run, labelled with the latest missed occurrence.
    * SKIP: no run; ``skip_missed`` moves TIME to the next future occurrence. When there is none
      (a one-shot action, END_VALUE spent, or END date passed) the last occurrence still runs once:
      an action is never finished without running.
    * ALL: every missed occurrence, oldest first, at most END_VALUE + 1 with END_TYPE=TIMES and at
      most ``MAX_MISSED_RUNS`` (the oldest ones; later missed occurrences are skipped).

    A one-shot action (REPEAT=-1) always gives ``[TIME]``. The engine queues the returned runs
    together and calls ``after_run`` once per finished run: the first call moves TIME past
    ``now``, each call spends one of END_TYPE=TIMES' END_VALUE.
    """
    policy = _missed_runs_policy(policy)
    if not is_due(sa, now):
        return []
    rule = _rule(sa, tz)
    if rule is None:
        return [sa.time]
    if policy == "ALL":
        limit = MAX_MISSED_RUNS
        if sa.end_type == EndType.TIMES:
            limit = min(limit, max(sa.end_value, 0) + 1)
        return list(islice(_occurrences(sa, rule, until=now), limit))
    if policy == "SKIP" and next_time(sa, now=now, tz=tz) is not None:
        return []
    return [_latest_missed(sa, rule, now)]


def _missed_runs_policy(policy: str) -> MissedRuns:
    upper = policy.upper()
    if upper not in ("ONCE", "SKIP", "ALL"):
        raise ValidationError(f"Unknown missed-runs policy {policy!r}, expected once, skip or all")
    return upper  # type: ignore[return-value]


def _occurrences(sa: SchedAction, rule: _Rule, *, until: int) -> Iterator[int]:
    instant: int | None = sa.time
    while instant is not None and instant <= until:
        yield instant
        instant = rule.after(instant)
        if instant is not None and _past_end(sa, instant):
            return


def _latest_missed(sa: SchedAction, rule: _Rule, now: int) -> int:
    limit = min(now, sa.end_value) if sa.end_type == EndType.DATE else now
    latest = rule.at_or_before(limit) if limit >= sa.time else None
    return sa.time if latest is None else max(sa.time, latest)


def upcoming(sa: SchedAction, *, now: int, tz: ZoneInfo, count: int, policy: str = "ONCE") -> list[int]:
    """The next ``count`` runs as the engine would make them, each labelled by its occurrence.

    A due action first lists its catch-up runs (``due_occurrences``; these are <= now and run
    immediately); then every run is assumed to succeed on time.
    """
    runs: list[int] = []
    current = sa
    if is_due(sa, now):
        runs = due_occurrences(sa, now=now, tz=tz, policy=policy)
        for _ in runs:
            current = after_run(current, now=now, tz=tz, success=True)
        if not runs:
            current = skip_missed(current, now=now, tz=tz)
    while len(runs) < count and is_pending(current):
        runs.append(current.time)
        current = after_run(current, now=current.time, tz=tz, success=True)
    return runs[:count]
