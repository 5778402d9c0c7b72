"""SCHED_ACTION validation and next-time maths (scheduler/model/schedule.py): spec §2, §12 items 5-8."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from scheduler.errors import ValidationError
from scheduler.model.schedule import (
    MAX_MISSED_RUNS,
    VM_ACTIONS,
    XML_ORDER,
    EndType,
    Repeat,
    SchedAction,
    after_run,
    due_occurrences,
    is_due,
    is_pending,
    local_instant,
    next_time,
    parse_sched_action,
    skip_missed,
    upcoming,
)
from scheduler.model.template import Vector
from tests import xsd

SHARED_XSD = Path(__file__).resolve().parents[2] / "shared" / "reference" / "opennebula-7.0-xsd" / "shared.xsd"

UTC = ZoneInfo("UTC")
MADRID = ZoneInfo("Europe/Madrid")  # 2024: CET->CEST Mar 31 02:00->03:00, CEST->CET Oct 27 03:00->02:00
NEW_YORK = ZoneInfo("America/New_York")  # 2024: Mar 10 02:00->03:00, Nov 3 02:00->01:00
ZONES = {"UTC": UTC, "Madrid": MADRID, "NY": NEW_YORK}

WEEKLY, MONTHLY, YEARLY, HOURLY, CRON = Repeat.WEEKLY, Repeat.MONTHLY, Repeat.YEARLY, Repeat.HOURLY, Repeat.CRON
EVERY_DAY = "0,1,2,3,4,5,6"


def at(text: str) -> int:
    """Epoch of an ISO time with an explicit offset (independent of the code under test)."""
    return int(datetime.fromisoformat(text).timestamp())


def iso(instant: int | None, zone: ZoneInfo) -> str | None:
    return None if instant is None else datetime.fromtimestamp(instant, zone).isoformat()


def action(time: str, repeat: int = Repeat.NONE, days: str = "", **fields: int | str) -> SchedAction:
    return SchedAction(action="backup", args="100", time=at(time), repeat=repeat, days=days, **fields)


# ---- next_time: (case, zone, TIME, REPEAT, DAYS, now, expected next TIME) ---------------------

# fmt: off
NEXT_TIME_CASES = [
    # spec §2.7 worked examples (oned TZ = UTC); same results as OpenNebula when runs are on time
    ("2.7 weekly Mon -> Wed", "UTC", "2024-01-01T10:00:00+00:00", WEEKLY, "1,3", "2024-01-01T10:00:10+00:00", "2024-01-03T10:00:00+00:00"),
    ("2.7 weekly Wed -> Mon", "UTC", "2024-01-03T10:00:00+00:00", WEEKLY, "1,3", "2024-01-03T10:00:10+00:00", "2024-01-08T10:00:00+00:00"),
    ("2.7 monthly Jan 31 -> Feb 1", "UTC", "2024-01-31T02:00:00+00:00", MONTHLY, "1", "2024-01-31T02:00:05+00:00", "2024-02-01T02:00:00+00:00"),
    ("2.7 hourly 10:00 -> 16:00", "UTC", "2024-01-01T10:00:00+00:00", HOURLY, "6", "2024-01-01T10:00:01+00:00", "2024-01-01T16:00:00+00:00"),
    ("2.7 hourly 16:00 -> 22:00", "UTC", "2024-01-01T16:00:00+00:00", HOURLY, "6", "2024-01-01T16:00:01+00:00", "2024-01-01T22:00:00+00:00"),
    ("first TIME off DAYS, later runs follow DAYS", "UTC", "2024-01-02T10:00:00+00:00", WEEKLY, "1", "2024-01-02T10:00:01+00:00", "2024-01-08T10:00:00+00:00"),
    ("weekly Sunday is 0", "UTC", "2024-01-01T10:00:00+00:00", WEEKLY, "0", "2024-01-01T10:00:01+00:00", "2024-01-07T10:00:00+00:00"),
    # late runs: OpenNebula adds delta(today) to the old TIME (Jan 1 + 1 day = Jan 2, dead action)
    ("daily, run 3 days late, after today's time", "UTC", "2024-01-01T10:00:00+00:00", WEEKLY, EVERY_DAY, "2024-01-04T12:00:00+00:00", "2024-01-05T10:00:00+00:00"),
    ("daily, run 3 days late, before today's time", "UTC", "2024-01-01T10:00:00+00:00", WEEKLY, EVERY_DAY, "2024-01-04T09:00:00+00:00", "2024-01-04T10:00:00+00:00"),
    ("weekly Mon, run Thu (ONE: Fri Jan 5)", "UTC", "2024-01-01T10:00:00+00:00", WEEKLY, "1", "2024-01-04T12:00:00+00:00", "2024-01-08T10:00:00+00:00"),
    ("monthly 1, run 2 days late (ONE: Jan 30)", "UTC", "2024-01-01T02:00:00+00:00", MONTHLY, "1", "2024-01-03T00:00:00+00:00", "2024-02-01T02:00:00+00:00"),
    ("yearly, run a year late", "UTC", "2023-01-01T02:00:00+00:00", YEARLY, "0", "2024-01-01T03:00:00+00:00", "2025-01-01T02:00:00+00:00"),
    ("hourly catch-up keeps the phase", "UTC", "2024-01-01T10:00:00+00:00", HOURLY, "6", "2024-01-03T11:00:00+00:00", "2024-01-03T16:00:00+00:00"),
    ("hourly exactly on an occurrence moves past it", "UTC", "2024-01-01T10:00:00+00:00", HOURLY, "1", "2024-01-01T13:00:00+00:00", "2024-01-01T14:00:00+00:00"),
    ("hourly 167", "UTC", "2024-01-01T10:00:00+00:00", HOURLY, "167", "2024-01-01T10:00:01+00:00", "2024-01-08T09:00:00+00:00"),
    # month ends: a day the month lacks runs on its last day (ONE rolls into the next month)
    ("monthly 31 in April", "UTC", "2024-03-31T02:00:00+00:00", MONTHLY, "31", "2024-03-31T02:00:01+00:00", "2024-04-30T02:00:00+00:00"),
    ("monthly 31 back to May 31", "UTC", "2024-04-30T02:00:00+00:00", MONTHLY, "31", "2024-04-30T02:00:01+00:00", "2024-05-31T02:00:00+00:00"),
    ("monthly 30 in leap February", "UTC", "2024-01-30T02:00:00+00:00", MONTHLY, "30", "2024-01-30T02:00:01+00:00", "2024-02-29T02:00:00+00:00"),
    ("monthly 30 in common February", "UTC", "2023-01-30T02:00:00+00:00", MONTHLY, "30", "2023-01-30T02:00:01+00:00", "2023-02-28T02:00:00+00:00"),
    ("monthly 29,30,31 run once on Feb 28", "UTC", "2023-02-28T02:00:00+00:00", MONTHLY, "29,30,31", "2023-02-28T02:00:01+00:00", "2023-03-29T02:00:00+00:00"),
    ("monthly 29 in leap February", "UTC", "2024-01-29T02:00:00+00:00", MONTHLY, "29", "2024-01-29T02:00:01+00:00", "2024-02-29T02:00:00+00:00"),
    ("monthly 15,31 mid-month", "UTC", "2024-06-15T02:00:00+00:00", MONTHLY, "15,31", "2024-06-15T02:00:01+00:00", "2024-06-30T02:00:00+00:00"),
    # years: day of year counts from 0 = Jan 1; 365 exists in leap years only, else Dec 31
    ("yearly 365 in a leap year", "UTC", "2024-01-01T02:00:00+00:00", YEARLY, "365", "2024-01-01T02:00:01+00:00", "2024-12-31T02:00:00+00:00"),
    ("yearly 365 in a common year", "UTC", "2023-01-01T02:00:00+00:00", YEARLY, "365", "2023-01-01T02:00:01+00:00", "2023-12-31T02:00:00+00:00"),
    ("yearly 364 in a leap year is Dec 30", "UTC", "2024-01-01T02:00:00+00:00", YEARLY, "364", "2024-01-01T02:00:01+00:00", "2024-12-30T02:00:00+00:00"),
    ("yearly 59 is Feb 29 in a leap year", "UTC", "2024-01-01T02:00:00+00:00", YEARLY, "59", "2024-01-01T02:00:01+00:00", "2024-02-29T02:00:00+00:00"),
    ("yearly 59 is Mar 1 in a common year", "UTC", "2023-01-01T02:00:00+00:00", YEARLY, "59", "2023-01-01T02:00:01+00:00", "2023-03-01T02:00:00+00:00"),
    # DST: wall-clock time kept; gap -> first valid instant; overlap -> first occurrence
    ("Madrid 10:00 across spring forward", "Madrid", "2024-03-30T10:00:00+01:00", WEEKLY, EVERY_DAY, "2024-03-30T10:00:01+01:00", "2024-03-31T10:00:00+02:00"),
    ("Madrid 10:00 across fall back", "Madrid", "2024-10-26T10:00:00+02:00", WEEKLY, EVERY_DAY, "2024-10-26T10:00:01+02:00", "2024-10-27T10:00:00+01:00"),
    ("Madrid 02:30 inside the gap", "Madrid", "2024-03-30T02:30:00+01:00", WEEKLY, EVERY_DAY, "2024-03-30T02:30:01+01:00", "2024-03-31T03:00:00+02:00"),
    ("Madrid 02:30 inside the overlap", "Madrid", "2024-10-26T02:30:00+02:00", WEEKLY, EVERY_DAY, "2024-10-26T02:30:01+02:00", "2024-10-27T02:30:00+02:00"),
    ("Madrid 02:30 after the overlap", "Madrid", "2024-10-27T02:30:00+02:00", WEEKLY, EVERY_DAY, "2024-10-27T02:30:01+02:00", "2024-10-28T02:30:00+01:00"),
    ("Madrid run in the repeated hour", "Madrid", "2024-10-27T02:30:00+02:00", WEEKLY, EVERY_DAY, "2024-10-27T02:45:00+01:00", "2024-10-28T02:30:00+01:00"),
    ("Madrid weekly Sunday 02:30 gap", "Madrid", "2024-03-24T02:30:00+01:00", WEEKLY, "0", "2024-03-24T02:30:01+01:00", "2024-03-31T03:00:00+02:00"),
    ("Madrid monthly 31 at 02:30 gap", "Madrid", "2024-02-29T02:30:00+01:00", MONTHLY, "31", "2024-02-29T02:30:01+01:00", "2024-03-31T03:00:00+02:00"),
    ("NY 02:15 inside the gap", "NY", "2024-03-09T02:15:00-05:00", WEEKLY, EVERY_DAY, "2024-03-09T02:15:01-05:00", "2024-03-10T03:00:00-04:00"),
    ("NY 10:00 across spring forward", "NY", "2024-03-09T10:00:00-05:00", WEEKLY, EVERY_DAY, "2024-03-09T10:00:01-05:00", "2024-03-10T10:00:00-04:00"),
    ("NY 01:30 inside the overlap", "NY", "2024-11-02T01:30:00-04:00", WEEKLY, EVERY_DAY, "2024-11-02T01:30:01-04:00", "2024-11-03T01:30:00-04:00"),
    ("NY run in the repeated hour", "NY", "2024-11-03T01:30:00-04:00", WEEKLY, EVERY_DAY, "2024-11-03T01:45:00-05:00", "2024-11-04T01:30:00-05:00"),
    ("hourly counts elapsed hours over the gap", "Madrid", "2024-03-31T01:30:00+01:00", HOURLY, "1", "2024-03-31T01:30:01+01:00", "2024-03-31T03:30:00+02:00"),
    ("hourly counts elapsed hours over the overlap", "NY", "2024-11-03T01:30:00-04:00", HOURLY, "1", "2024-11-03T01:30:01-04:00", "2024-11-03T01:30:00-05:00"),
    ("hourly 24 drifts in wall time over DST", "Madrid", "2024-03-30T10:00:00+01:00", HOURLY, "24", "2024-03-30T10:00:01+01:00", "2024-03-31T11:00:00+02:00"),
    # cron (REPEAT=4), evaluated on wall-clock time in the zone
    ("cron weekdays 02:00", "UTC", "2024-01-05T02:00:00+00:00", CRON, "0 2 * * 1-5", "2024-01-05T02:00:01+00:00", "2024-01-08T02:00:00+00:00"),
    ("cron last day of month", "UTC", "2024-01-31T03:00:00+00:00", CRON, "0 3 L * *", "2024-01-31T03:00:01+00:00", "2024-02-29T03:00:00+00:00"),
    ("cron Feb 29 only", "UTC", "2024-02-29T00:00:00+00:00", CRON, "0 0 29 2 *", "2024-02-29T00:00:01+00:00", "2028-02-29T00:00:00+00:00"),
    ("cron run late", "UTC", "2024-01-01T02:00:00+00:00", CRON, "0 2 * * *", "2024-01-04T12:00:00+00:00", "2024-01-05T02:00:00+00:00"),
    ("cron Madrid 02:30 gap", "Madrid", "2024-03-30T02:30:00+01:00", CRON, "30 2 * * *", "2024-03-30T02:30:01+01:00", "2024-03-31T03:00:00+02:00"),
    ("cron Madrid after the gap", "Madrid", "2024-03-31T03:00:00+02:00", CRON, "30 2 * * *", "2024-03-31T03:00:01+02:00", "2024-04-01T02:30:00+02:00"),
    ("cron Madrid 10:00 across spring forward", "Madrid", "2024-03-30T10:00:00+01:00", CRON, "0 10 * * *", "2024-03-30T10:00:01+01:00", "2024-03-31T10:00:00+02:00"),
    ("cron NY overlap first occurrence", "NY", "2024-11-02T01:30:00-04:00", CRON, "30 1 * * *", "2024-11-02T01:30:01-04:00", "2024-11-03T01:30:00-04:00"),
    ("cron NY overlap not repeated", "NY", "2024-11-03T01:30:00-04:00", CRON, "30 1 * * *", "2024-11-03T01:30:01-04:00", "2024-11-04T01:30:00-05:00"),
    ("cron NY every 30 min over fall back", "NY", "2024-11-03T01:30:00-04:00", CRON, "*/30 * * * *", "2024-11-03T01:30:01-04:00", "2024-11-03T02:00:00-05:00"),
    ("cron NY every 30 min over spring forward", "NY", "2024-03-10T01:30:00-05:00", CRON, "*/30 * * * *", "2024-03-10T01:30:01-05:00", "2024-03-10T03:00:00-04:00"),
]
# fmt: on


@pytest.mark.parametrize(
    ("zone", "time", "repeat", "days", "now", "expected"),
    [case[1:] for case in NEXT_TIME_CASES],
    ids=[case[0] for case in NEXT_TIME_CASES],
)
def test_next_time(zone: str, time: str, repeat: int, days: str, now: str, expected: str) -> None:
    tz = ZONES[zone]
    result = next_time(action(time, repeat, days), now=at(now), tz=tz)
    assert iso(result, tz) == iso(at(expected), tz)
    assert result > max(at(time), at(now))


@pytest.mark.parametrize(
    ("sa", "now", "expected"),
    [
        pytest.param(action("2024-01-01T10:00:00+00:00"), "2024-01-01T10:00:01+00:00", None, id="one-shot"),
        pytest.param(action("2024-01-01T10:00:00+00:00", WEEKLY, ""), "2024-01-01T10:00:01+00:00", None, id="no days"),
        pytest.param(
            action("2024-01-01T10:00:00+00:00", WEEKLY, "1", end_type=EndType.TIMES, end_value=0),
            "2024-01-01T10:00:01+00:00", None, id="times 0",
        ),
        pytest.param(
            action("2024-01-01T10:00:00+00:00", WEEKLY, "1", end_type=EndType.TIMES, end_value=1),
            "2024-01-01T10:00:01+00:00", "2024-01-08T10:00:00+00:00", id="times 1",
        ),
        pytest.param(
            action("2024-01-01T10:00:00+00:00", WEEKLY, "1", end_type=EndType.DATE, end_value=at("2024-01-08T10:00:00+00:00")),
            "2024-01-01T10:00:01+00:00", "2024-01-08T10:00:00+00:00", id="date on the end",
        ),
        pytest.param(
            action("2024-01-01T10:00:00+00:00", WEEKLY, "1", end_type=EndType.DATE, end_value=at("2024-01-08T09:59:59+00:00")),
            "2024-01-01T10:00:01+00:00", None, id="date before the next (ONE runs once more)",
        ),
        pytest.param(
            action("2024-01-01T10:00:00+00:00", WEEKLY, "1", end_type=EndType.NEVER),
            "2024-01-01T10:00:01+00:00", "2024-01-08T10:00:00+00:00", id="never",
        ),
    ],
)  # fmt: skip
def test_next_time_end_conditions(sa: SchedAction, now: str, expected: str | None) -> None:
    assert next_time(sa, now=at(now), tz=UTC) == (None if expected is None else at(expected))


def test_gap_time_of_day_comes_back_with_an_anchor() -> None:
    """After 02:30 ran at 03:00 in the gap, the next day is back at 02:30 (the anchor keeps it)."""
    first = action("2024-03-30T02:30:00+01:00", WEEKLY, EVERY_DAY)
    assert first.anchor == -1
    anchored = replace(first, anchor=first.time)
    runs = upcoming(anchored, now=at("2024-03-30T00:00:00+01:00"), tz=MADRID, count=3)
    assert [iso(run, MADRID) for run in runs] == [
        "2024-03-30T02:30:00+01:00", "2024-03-31T03:00:00+02:00", "2024-04-01T02:30:00+02:00",
    ]  # fmt: skip
    # without an anchor (an action read from OpenNebula XML) the moved time of day is kept
    runs = upcoming(first, now=at("2024-03-30T00:00:00+01:00"), tz=MADRID, count=3)
    assert iso(runs[2], MADRID) == "2024-04-01T03:00:00+02:00"


def test_cron_gap_runs_once_for_many_wall_times() -> None:
    sa = action("2024-03-30T02:45:00+01:00", CRON, "*/15 2 * * *")
    runs = upcoming(sa, now=at("2024-03-30T00:00:00+01:00"), tz=MADRID, count=3)
    assert [iso(run, MADRID) for run in runs] == [
        "2024-03-30T02:45:00+01:00", "2024-03-31T03:00:00+02:00", "2024-04-01T02:00:00+02:00",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("zone", "wall", "expected"),
    [
        (MADRID, "2024-03-31T02:00:00", "2024-03-31T03:00:00+02:00"),
        (MADRID, "2024-03-31T02:59:59", "2024-03-31T03:00:00+02:00"),
        (MADRID, "2024-03-31T01:59:59", "2024-03-31T01:59:59+01:00"),
        (MADRID, "2024-10-27T02:00:00", "2024-10-27T02:00:00+02:00"),
        (MADRID, "2024-10-27T03:00:00", "2024-10-27T03:00:00+01:00"),
        (NEW_YORK, "2024-03-10T02:30:00", "2024-03-10T03:00:00-04:00"),
        (NEW_YORK, "2024-11-03T01:30:00", "2024-11-03T01:30:00-04:00"),
        (ZoneInfo("Australia/Lord_Howe"), "2024-10-06T02:10:00", "2024-10-06T02:30:00+11:00"),
    ],
)
def test_local_instant(zone: ZoneInfo, wall: str, expected: str) -> None:
    assert local_instant(datetime.fromisoformat(wall), zone) == at(expected)


# ---- END conditions, after_run -------------------------------------------------------------------


@pytest.mark.parametrize(("times", "runs"), [(0, 1), (1, 2), (5, 6)])
def test_end_times_gives_n_plus_one_runs(times: int, runs: int) -> None:
    sa = action("2024-01-01T10:00:00+00:00", WEEKLY, "1,3", end_type=EndType.TIMES, end_value=times)
    assert len(upcoming(sa, now=at("2024-01-01T00:00:00+00:00"), tz=UTC, count=100)) == runs


def test_end_date_bounds_the_repetitions() -> None:
    sa = action(
        "2024-01-01T10:00:00+00:00", WEEKLY, "1", end_type=EndType.DATE, end_value=at("2024-01-22T10:00:00+00:00")
    )
    runs = upcoming(sa, now=at("2024-01-01T00:00:00+00:00"), tz=UTC, count=100)
    assert [iso(run, UTC)[:10] for run in runs] == ["2024-01-01", "2024-01-08", "2024-01-15", "2024-01-22"]


def test_end_date_before_time_still_runs_time_once() -> None:
    sa = action(
        "2024-01-01T10:00:00+00:00", WEEKLY, "1", end_type=EndType.DATE, end_value=at("2023-12-01T00:00:00+00:00")
    )
    assert upcoming(sa, now=at("2023-12-31T00:00:00+00:00"), tz=UTC, count=10) == [sa.time]


def test_after_successful_run() -> None:
    sa = replace(
        action("2024-01-01T10:00:00+00:00", WEEKLY, "1,3", end_type=EndType.TIMES, end_value=3),
        message="Mon Jan  1 09:00:00 2024 : boom", warning=at("2024-01-01T09:00:00+00:00"), id=7,
    )  # fmt: skip
    done = at("2024-01-01T10:05:00+00:00")
    after = after_run(sa, now=done, tz=UTC, success=True, message="ignored")
    assert after == replace(sa, time=at("2024-01-03T10:00:00+00:00"), done=done, message="", end_value=2, warning=0)
    assert is_pending(after) and not is_due(after, done)


def test_after_given_up_run_keeps_done_and_the_error() -> None:
    sa = replace(action("2024-01-01T10:00:00+00:00", WEEKLY, "1"), done=at("2023-12-25T10:00:00+00:00"))
    now = at("2024-01-01T11:00:00+00:00")
    after = after_run(sa, now=now, tz=UTC, success=False, message="Mon Jan  1 11:00:00 2024 : no space")
    assert after.time == at("2024-01-08T10:00:00+00:00")
    assert after.done == sa.done
    assert after.message == "Mon Jan  1 11:00:00 2024 : no space"


def test_hourly_keeps_warning_calendar_resets_it() -> None:
    warning = at("2024-01-01T09:00:00+00:00")
    now = at("2024-01-01T10:00:01+00:00")
    hourly = action("2024-01-01T10:00:00+00:00", HOURLY, "2", warning=warning)
    cron = action("2024-01-01T10:00:00+00:00", CRON, "0 10 * * *", warning=warning)
    assert after_run(hourly, now=now, tz=UTC, success=True).warning == warning
    assert after_run(cron, now=now, tz=UTC, success=True).warning == 0


@pytest.mark.parametrize("success", [True, False])
def test_last_run_closes_the_action(success: bool) -> None:
    sa = action("2024-01-01T10:00:00+00:00")
    now = at("2024-01-01T10:00:30+00:00")
    after = after_run(sa, now=now, tz=UTC, success=success, message="error")
    assert (after.time, after.done) == (sa.time, now)
    assert after.message == ("" if success else "error")
    assert not is_pending(after)
    assert due_occurrences(after, now=now + 86400, tz=UTC) == []


def test_late_run_never_yields_a_past_time() -> None:
    sa = action("2024-01-01T10:00:00+00:00", WEEKLY, "1,3")
    now = at("2024-01-04T10:00:00+00:00")  # 3 days late
    after = after_run(sa, now=now, tz=UTC, success=True)
    assert after.time == at("2024-01-08T10:00:00+00:00")
    assert after.time > after.done


# ---- missed runs ---------------------------------------------------------------------------------

DAILY_JAN1 = action("2024-01-01T10:00:00+00:00", WEEKLY, EVERY_DAY)
JAN4_NOON = "2024-01-04T12:00:00+00:00"
JAN = [f"2024-01-0{day}T10:00:00+00:00" for day in range(1, 5)]


@pytest.mark.parametrize(
    ("sa", "policy", "expected"),
    [
        (DAILY_JAN1, "ONCE", [JAN[3]]),
        (DAILY_JAN1, "once", [JAN[3]]),
        (DAILY_JAN1, "SKIP", []),
        (DAILY_JAN1, "ALL", JAN),
        (replace(DAILY_JAN1, end_type=EndType.TIMES, end_value=1), "ALL", JAN[:2]),
        (replace(DAILY_JAN1, end_type=EndType.TIMES, end_value=9), "ONCE", [JAN[3]]),
        (replace(DAILY_JAN1, end_type=EndType.TIMES, end_value=0), "SKIP", [JAN[3]]),
        (replace(DAILY_JAN1, end_type=EndType.DATE, end_value=at(JAN[1])), "ALL", JAN[:2]),
        (replace(DAILY_JAN1, end_type=EndType.DATE, end_value=at(JAN[2]) + 60), "ONCE", [JAN[2]]),
        (replace(DAILY_JAN1, end_type=EndType.DATE, end_value=at(JAN[2])), "SKIP", [JAN[2]]),
        (replace(DAILY_JAN1, end_type=EndType.DATE, end_value=at("2024-02-01T00:00:00+00:00")), "SKIP", []),
        (action(JAN[0]), "SKIP", [JAN[0]]),
        (action(JAN[0]), "ALL", [JAN[0]]),
        (action(JAN[0], HOURLY, "5"), "ONCE", ["2024-01-04T08:00:00+00:00"]),  # Jan 1 10:00 + 14 * 5 h
        (action(JAN[0], HOURLY, "74"), "ONCE", [JAN4_NOON]),
        (action(JAN[0], CRON, "0 10 * * 1-5"), "ALL", JAN[:4]),
        (action(JAN[0], CRON, "0 10 * * 1-5"), "ONCE", [JAN[3]]),
        (action("2023-12-31T10:00:00+00:00", MONTHLY, "15"), "ONCE", ["2023-12-31T10:00:00+00:00"]),
        (action("2023-12-31T10:00:00+00:00", MONTHLY, "15"), "SKIP", []),
    ],
)
def test_due_occurrences(sa: SchedAction, policy: str, expected: list[str]) -> None:
    assert due_occurrences(sa, now=at(JAN4_NOON), tz=UTC, policy=policy) == [at(t) for t in expected]


@pytest.mark.parametrize(
    "sa",
    [
        action("2024-01-05T10:00:00+00:00", WEEKLY, EVERY_DAY),  # in the future
        replace(DAILY_JAN1, done=at(JAN[0])),  # closed (TIME <= DONE)
    ],
)
def test_nothing_due(sa: SchedAction) -> None:
    for policy in ("ONCE", "SKIP", "ALL"):
        assert due_occurrences(sa, now=at(JAN4_NOON), tz=UTC, policy=policy) == []


def test_all_policy_is_bounded() -> None:
    sa = action(JAN[0], HOURLY, "1")
    runs = due_occurrences(sa, now=sa.time + 5000 * 3600, tz=UTC, policy="ALL")
    assert len(runs) == MAX_MISSED_RUNS
    assert runs[0] == sa.time and runs[-1] == sa.time + (MAX_MISSED_RUNS - 1) * 3600


def test_unknown_policy() -> None:
    with pytest.raises(ValidationError, match="missed-runs policy 'LATER'"):
        due_occurrences(DAILY_JAN1, now=at(JAN4_NOON), tz=UTC, policy="LATER")


def test_skip_moves_on_without_spending() -> None:
    sa = replace(DAILY_JAN1, end_type=EndType.TIMES, end_value=4)
    skipped = skip_missed(sa, now=at(JAN4_NOON), tz=UTC)
    assert skipped == replace(sa, time=at("2024-01-05T10:00:00+00:00"))


def test_all_runs_then_after_run_each() -> None:
    """The engine runs every missed occurrence and calls after_run once per run."""
    sa = replace(DAILY_JAN1, end_type=EndType.TIMES, end_value=5)
    now = at(JAN4_NOON)
    runs = due_occurrences(sa, now=now, tz=UTC, policy="ALL")
    for _ in runs:
        sa = after_run(sa, now=now, tz=UTC, success=True)
    assert (len(runs), sa.end_value, sa.time) == (4, 1, at("2024-01-05T10:00:00+00:00"))
    exhausted = replace(DAILY_JAN1, end_type=EndType.TIMES, end_value=1)
    for _ in due_occurrences(exhausted, now=now, tz=UTC, policy="ALL"):
        exhausted = after_run(exhausted, now=now, tz=UTC, success=True)
    assert not is_pending(exhausted)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("ONCE", [JAN[3], "2024-01-05T10:00:00+00:00", "2024-01-06T10:00:00+00:00"]),
        ("SKIP", ["2024-01-05T10:00:00+00:00", "2024-01-06T10:00:00+00:00", "2024-01-07T10:00:00+00:00"]),
        ("ALL", JAN[:3]),
    ],
)
def test_upcoming_after_downtime(policy: str, expected: list[str]) -> None:
    assert upcoming(DAILY_JAN1, now=at(JAN4_NOON), tz=UTC, count=3, policy=policy) == [at(t) for t in expected]


def test_upcoming_hourly_catch_up() -> None:
    sa = action("2024-01-01T10:00:00+00:00", HOURLY, "6")
    runs = upcoming(sa, now=at("2024-01-03T11:00:00+00:00"), tz=UTC, count=3)
    assert [iso(run, UTC) for run in runs] == [
        "2024-01-03T10:00:00+00:00", "2024-01-03T16:00:00+00:00", "2024-01-03T22:00:00+00:00",
    ]  # fmt: skip


# ---- property ------------------------------------------------------------------------------------

EPOCHS = st.integers(min_value=at("2000-01-01T00:00:00+00:00"), max_value=at("2040-01-01T00:00:00+00:00"))


@st.composite
def repeating_actions(draw: st.DrawFn) -> SchedAction:
    repeat = draw(st.sampled_from([WEEKLY, MONTHLY, YEARLY, HOURLY, CRON]))
    if repeat == HOURLY:
        days = str(draw(st.integers(1, 167)))
    elif repeat == CRON:
        days = draw(st.sampled_from(["0 2 * * *", "*/7 * * * *", "30 2 * * 0", "0 3 L * *", "15 1 29 2 *"]))
    else:
        low, high = {WEEKLY: (0, 6), MONTHLY: (1, 31), YEARLY: (0, 365)}[repeat]
        days = ",".join(map(str, draw(st.sets(st.integers(low, high), min_size=1, max_size=5))))
    time = draw(EPOCHS)
    end = draw(st.sampled_from([(EndType.NONE, -1), (EndType.TIMES, 3), (EndType.DATE, time + 10**8)]))
    anchor = draw(st.sampled_from([-1, time, draw(EPOCHS)]))
    return SchedAction(
        action="backup", time=time, repeat=repeat, days=days, end_type=end[0], end_value=end[1], anchor=anchor
    )


@settings(max_examples=300, deadline=None)
@given(
    sa=repeating_actions(),
    now=EPOCHS,
    zone=st.sampled_from(["UTC", "Europe/Madrid", "America/New_York", "Australia/Lord_Howe"]),
)
def test_next_time_is_after_old_time_and_now(sa: SchedAction, now: int, zone: str) -> None:
    result = next_time(sa, now=now, tz=ZoneInfo(zone))
    assert result is None or result > max(sa.time, now)
    after = after_run(sa, now=now, tz=ZoneInfo(zone), success=True)
    assert after.done == now and (not is_pending(after) or after.time > now)


# ---- validation ----------------------------------------------------------------------------------

BASE = {"ACTION": "backup", "ARGS": "100,0", "TIME": "1704103200"}


def rejected(attributes: dict[str, str], **kwargs: object) -> str:
    with pytest.raises(ValidationError) as caught:
        parse_sched_action(Vector(attributes), origin=kwargs.pop("origin", 1000), **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({**BASE, "ACTION": "explode"}, "explode is not supported."),
        ({"TIME": "1"}, "No ACTION in template for Scheduled Action."),
        ({**BASE, "ACTION": ""}, "No ACTION in template for Scheduled Action."),
        ({"ACTION": "backup"}, "Unable to parse the time value or value is empty: "),
        ({**BASE, "TIME": ""}, "Unable to parse the time value or value is empty: "),
        ({**BASE, "TIME": "tomorrow"}, "Unable to parse the time value or value is empty: tomorrow"),
        ({**BASE, "TIME": "12x"}, "Unable to parse the time value or value is empty: 12x"),
        ({**BASE, "TIME": "-5"}, "Unable to parse the time value or value is empty: -5"),
        ({**BASE, "TIME": "+-5"}, "Unable to parse the time value or value is empty: +-5"),
        ({**BASE, "TIME": "+"}, "Unable to parse the time value or value is empty: +"),
        ({**BASE, "TIME": "99999999999"}, "Unable to parse the time value or value is empty: 99999999999"),
        ({**BASE, "WARNING": "soon"}, "Unable to parse the warning value: soon"),
        ({**BASE, "REPEAT": "5"}, "Wrong REPEAT value: 5"),
        ({**BASE, "REPEAT": "-2"}, "Wrong REPEAT value: -2"),
        ({**BASE, "REPEAT": "weekly"}, "Wrong REPEAT value: weekly"),
        ({**BASE, "REPEAT": "0"}, "Repeat set, but DAYS are empty"),
        ({**BASE, "REPEAT": "0", "DAYS": ""}, "Repeat set, but DAYS are empty"),
        ({**BASE, "REPEAT": "1", "DAYS": " , "}, "Repeat set, but DAYS are empty"),
        ({**BASE, "REPEAT": "0", "DAYS": "1,7"}, "Days in a week have to be in [0,6] range"),
        ({**BASE, "REPEAT": "0", "DAYS": "-1"}, "Days in a week have to be in [0,6] range"),
        ({**BASE, "REPEAT": "0", "DAYS": "mon"}, "Days in a week have to be in [0,6] range"),
        ({**BASE, "REPEAT": "1", "DAYS": "0"}, "Days in a month have to be in [1,31] range"),
        ({**BASE, "REPEAT": "1", "DAYS": "15,32"}, "Days in a month have to be in [1,31] range"),
        ({**BASE, "REPEAT": "2", "DAYS": "366"}, "Days in a year have to be in [0,365] range"),
        ({**BASE, "REPEAT": "3", "DAYS": "0"}, "Hours have to be in [1,167] range"),
        ({**BASE, "REPEAT": "3", "DAYS": "168"}, "Hours have to be in [1,167] range"),
        ({**BASE, "REPEAT": "3", "DAYS": "1,2"}, "Hours have to be in [1,167] range"),
        ({**BASE, "END_TYPE": "3"}, "Wrong END_TYPE value: 3"),
        ({**BASE, "END_TYPE": "-2"}, "Wrong END_TYPE value: -2"),
        (
            {**BASE, "END_TYPE": "1", "END_VALUE": "-1"},
            "Error parsing END_VALUE, times has to be greater or equal to 0",
        ),
        (
            {**BASE, "END_TYPE": "1", "END_VALUE": "five"},
            "Error parsing END_VALUE, times has to be greater or equal to 0",
        ),
        ({**BASE, "END_TYPE": "2", "END_VALUE": "next year"}, "Error parsing END_VALUE, wrong format for date."),
        ({**BASE, "END_TYPE": "2", "END_VALUE": "-7"}, "Error parsing END_VALUE, wrong format for date."),
        ({**BASE, "END_TYPE": "1"}, "END_TYPE set, but END_VALUE is empty"),
        (
            {**BASE, "CRON": "61 * * * *"},
            'Wrong CRON expression, expected "minute hour day-of-month month day-of-week": 61 * * * *',
        ),
        (
            {**BASE, "CRON": "0 2 * *"},
            'Wrong CRON expression, expected "minute hour day-of-month month day-of-week": 0 2 * *',
        ),
        (
            {**BASE, "CRON": "0 0 2 * * *"},
            'Wrong CRON expression, expected "minute hour day-of-month month day-of-week": 0 0 2 * * *',
        ),
        ({**BASE, "CRON": "0 2 31 2 *"}, "CRON expression never matches a date: 0 2 31 2 *"),
        ({**BASE, "CRON": "0 2 * * *", "REPEAT": "0"}, "CRON cannot be combined with REPEAT=0"),
        ({**BASE, "CRON": "0 2 * * *", "DAYS": "1"}, "CRON and DAYS cannot both be set"),
        (
            {**BASE, "REPEAT": "4", "DAYS": "1,3"},
            'Wrong CRON expression, expected "minute hour day-of-month month day-of-week": 1,3',
        ),
    ],
)
def test_validation_messages(attributes: dict[str, str], message: str) -> None:
    assert rejected(attributes) == message


def test_backup_jobs_reject_relative_times() -> None:
    message = rejected({"TIME": "+3600"}, parent_type="BACKUPJOB")
    assert message == "Unable to parse the time value or value is empty: +3600"
    assert (
        rejected({"TIME": "1", "WARNING": "+60"}, parent_type="BACKUPJOB") == "Unable to parse the warning value: +60"
    )


def test_unknown_parent_type() -> None:
    assert rejected(BASE, parent_type="HOST") == "Not supported object type"


@pytest.mark.parametrize("name", sorted(VM_ACTIONS))
def test_every_vm_action_is_accepted(name: str) -> None:
    assert parse_sched_action(Vector({**BASE, "ACTION": name}), origin=0).action == name


def test_action_hook_replaces_the_name_check() -> None:
    calls: list[tuple[str, str]] = []

    def hook(name: str, args: str) -> None:
        calls.append((name, args))
        if args != "100,0":
            raise ValidationError(f"Missing or malformed ARGS for: {name}. Format: DS_ID[,RESET]")

    sa = parse_sched_action(Vector({**BASE, "ACTION": "custom"}), origin=0, validate_action=hook)
    assert sa.action == "custom" and calls == [("custom", "100,0")]
    assert (
        rejected({**BASE, "ARGS": "x"}, validate_action=hook)
        == "Missing or malformed ARGS for: backup. Format: DS_ID[,RESET]"
    )
    # an update that only changes ARGS is checked against the current action
    assert (
        rejected({"ARGS": "y"}, current=sa, validate_action=hook)
        == "Missing or malformed ARGS for: custom. Format: DS_ID[,RESET]"
    )


# ---- parse results and merge semantics -------------------------------------------------------------


def test_new_action_from_a_full_vector() -> None:
    sa = parse_sched_action(
        Vector({**BASE, "REPEAT": "0", "DAYS": "0,2,4", "END_TYPE": "1", "END_VALUE": "5",
                "DONE": "99", "MESSAGE": "forged", "ID": "3"}),
        origin=0,
    )  # fmt: skip
    assert sa == SchedAction(
        action="backup", args="100,0", time=1704103200, repeat=0, days="0,2,4", end_type=1, end_value=5,
        anchor=1704103200,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("time", "origin", "expected"),
    [("+3600", 1000, 4600), ("+0", 1000, 1000), ("1704103200", 1000, 1704103200), (" 42 ", 5, 42), ("0", 9, 0)],
)
def test_relative_and_absolute_time(time: str, origin: int, expected: int) -> None:
    assert parse_sched_action(Vector({**BASE, "TIME": time}), origin=origin).time == expected


def test_relative_time_from_an_old_stime_is_in_the_past_and_due() -> None:
    stime = at("2024-01-01T00:00:00+00:00")
    sa = parse_sched_action(Vector({**BASE, "TIME": "+3600"}), origin=stime)
    assert is_due(sa, now=at("2024-01-03T00:00:00+00:00"))


def test_warning_absolute_or_relative() -> None:
    assert parse_sched_action(Vector({**BASE, "WARNING": "+60"}), origin=1000).warning == 1060
    assert parse_sched_action(Vector({**BASE, "WARNING": "1704100000"}), origin=1000).warning == 1704100000


@pytest.mark.parametrize(
    ("attributes", "fields"),
    [
        ({**BASE, "REPEAT": "-1", "DAYS": "1,2"}, {"repeat": -1, "days": ""}),
        ({**BASE, "END_TYPE": "0", "END_VALUE": "9"}, {"end_type": 0, "end_value": -1}),
        ({**BASE, "END_TYPE": "-1", "END_VALUE": "9"}, {"end_type": -1, "end_value": -1}),
        ({**BASE, "REPEAT": "3", "DAYS": "167"}, {"repeat": 3, "days": "167"}),
        ({**BASE, "REPEAT": "1", "DAYS": "31, 1"}, {"repeat": 1, "days": "31, 1"}),
        ({**BASE, "CRON": "  0  2 * *   1-5 "}, {"repeat": 4, "days": "0 2 * * 1-5"}),
        ({**BASE, "CRON": "0 2 * * *", "REPEAT": "4"}, {"repeat": 4, "days": "0 2 * * *"}),
        ({**BASE, "REPEAT": "4", "DAYS": "30 1 * * 0"}, {"repeat": 4, "days": "30 1 * * 0"}),
        ({**BASE, "END_TYPE": "2", "END_VALUE": "1735689600"}, {"end_type": 2, "end_value": 1735689600}),
        ({**BASE, "END_TYPE": "1", "END_VALUE": "0"}, {"end_type": 1, "end_value": 0}),
    ],
)
def test_parse_normalises(attributes: dict[str, str], fields: dict[str, object]) -> None:
    sa = parse_sched_action(Vector(attributes), origin=0)
    assert {name: getattr(sa, name) for name in fields} == fields


def test_backup_job_forces_backup_and_drops_args() -> None:
    sa = parse_sched_action(Vector({"ACTION": "poweroff", "ARGS": "1", "TIME": "5"}), origin=0, parent_type="BACKUPJOB")
    assert (sa.type, sa.action, sa.args) == ("BACKUPJOB", "backup", "")


CURRENT = SchedAction(
    id=4, parent_id=42, action="backup", args="100,0", time=1704103200, repeat=0, days="1,3", end_type=1,
    end_value=5, done=1704000000, message="old error", warning=1704100000, anchor=1704016800,
)  # fmt: skip


@pytest.mark.parametrize(
    ("update", "changed"),
    [
        ({}, {}),
        ({"ARGS": "101"}, {"args": "101"}),
        ({"ACTION": "poweroff"}, {"action": "poweroff"}),
        ({"ACTION": ""}, {}),
        ({"TIME": "+60"}, {"time": 1060, "anchor": 1060}),
        ({"TIME": "1704103200"}, {}),
        ({"REPEAT": "1"}, {"repeat": 1}),
        ({"DAYS": "5"}, {"days": "5"}),
        ({"REPEAT": "-1"}, {"repeat": -1, "days": ""}),
        ({"END_TYPE": "0"}, {"end_type": 0, "end_value": -1}),
        ({"END_VALUE": "9"}, {"end_value": 9}),
        ({"END_TYPE": "2"}, {"end_type": 2}),
        ({"CRON": "0 4 * * *"}, {"repeat": 4, "days": "0 4 * * *"}),
        ({"DONE": "1", "MESSAGE": "x", "ID": "99", "PARENT_ID": "1"}, {}),
    ],
)
def test_update_merges_into_the_current_action(update: dict[str, str], changed: dict[str, object]) -> None:
    assert parse_sched_action(Vector(update), origin=1000, current=CURRENT) == replace(CURRENT, **changed)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"REPEAT": "3"}, "Hours have to be in [1,167] range"),  # kept DAYS 1,3 checked again
        ({"REPEAT": "4"}, 'Wrong CRON expression, expected "minute hour day-of-month month day-of-week": 1,3'),
        ({"DAYS": "9"}, "Days in a week have to be in [0,6] range"),
        ({"END_TYPE": "1", "END_VALUE": "-3"}, "Error parsing END_VALUE, times has to be greater or equal to 0"),
        ({"ACTION": "fly"}, "fly is not supported."),
    ],
)
def test_update_validates_the_merged_action(update: dict[str, str], message: str) -> None:
    assert rejected(update, current=CURRENT) == message


def test_update_without_end_value_needs_a_current_one() -> None:
    current = replace(CURRENT, end_type=0, end_value=-1)
    assert rejected({"END_TYPE": "2"}, current=current) == "END_TYPE set, but END_VALUE is empty"


# ---- stored form ---------------------------------------------------------------------------------


def test_vector_round_trip_in_xsd_order() -> None:
    vector = CURRENT.to_vector()
    assert list(vector._values) == list(XML_ORDER)  # insertion order = the XSD's element order
    assert vector["REPEAT"] == "0" and vector["TIME"] == "1704103200" and vector["MESSAGE"] == "old error"
    assert SchedAction.from_vector(vector) == replace(CURRENT, anchor=-1)
    assert SchedAction.from_vector(vector, anchor=CURRENT.anchor) == CURRENT
    enum_valued = replace(CURRENT, repeat=Repeat.CRON, days="0 2 * * *", end_type=EndType.NEVER)
    assert enum_valued.to_vector()["REPEAT"] == "4" and enum_valued.to_vector()["END_TYPE"] == "0"


def test_from_vector_defaults_and_bad_numbers() -> None:
    assert SchedAction.from_vector(Vector({"ACTION": "hold", "TIME": "5"})) == SchedAction(action="hold", time=5)
    with pytest.raises(ValidationError, match="SCHED_ACTION/TIME is not an integer"):
        SchedAction.from_vector(Vector({"TIME": "soon"}))


def test_xml_order_matches_the_opennebula_schema() -> None:
    """shared.xsd's SCHED_ACTION type (used by vm.xsd) lists exactly these elements; no CRON."""
    xsd.require_schemas()
    schema = etree.parse(str(SHARED_XSD))
    ns = {"xs": "http://www.w3.org/2001/XMLSchema"}
    elements = schema.xpath("//xs:complexType[@name='SCHED_ACTION']/xs:sequence/xs:element/@name", namespaces=ns)
    assert tuple(elements) == XML_ORDER
    assert "CRON" not in elements
