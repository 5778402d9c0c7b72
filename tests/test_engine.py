"""The scheduling engine on virtual time: timing, limits, retries, missed runs, reload, restart.

Every test runs the real Engine, Journal, State and SQLite store on a VirtualTimeLoop
(tests/engine_harness.py): hours of schedule take milliseconds and every time is exact.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from scheduler.engine.journal import Run
from scheduler.engine.loop import EngineSettings
from scheduler.engine.metrics import render
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.image import NEW_CHAIN_CAUSE, Image
from scheduler.model.objects.states import DatastoreType, HostState, ImageType
from scheduler.model.schedule import EndType, Repeat, is_pending
from scheduler.model.template import Template
from tests.engine_harness import (
    BACKUP_DS,
    DAY,
    HOUR,
    START,
    EngineHarness,
    Execution,
    Script,
    run_virtual,
    settings,
)

T0 = START + 2 * HOUR  # Thursday 2026-01-01 02:00 UTC
EVERY_DAY = "0,1,2,3,4,5,6"

Body = Callable[[EngineHarness], Awaitable[None]]


def simulate(tmp_path: Path, body: Body, engine_settings: EngineSettings | None = None,
             script: Script | None = None) -> EngineHarness:
    """Open a harness on a fresh state file, run ``body`` (it adds objects and starts the engine), close."""

    async def scenario() -> EngineHarness:
        harness = await EngineHarness(tmp_path / "vmsched.db", engine_settings, script).open()
        try:
            await body(harness)
        finally:
            await harness.close()
        return harness

    return run_virtual(scenario)


def fleet(h: EngineHarness, placement: dict[int, int], datastores: Iterable[int] = (BACKUP_DS,)) -> None:
    """Hosts, backup datastores and VMs: ``placement`` maps vm id -> host id."""
    for host_id in sorted(set(placement.values())):
        h.host(host_id)
    for ds_id in datastores:
        h.datastore(ds_id)
    for vm_id, host_id in placement.items():
        h.vm(vm_id, host_id)


def peak(executions: Iterable[Execution], key: Callable[[Execution], object] = lambda e: None) -> dict[object, int]:
    """The most executions in flight at once, per ``key`` (a slot freed at t can be taken at t)."""
    events: dict[object, list[tuple[float, int]]] = defaultdict(list)
    for e in executions:
        events[key(e)] += [(e.started, 1), (e.finished if e.finished is not None else float("inf"), -1)]
    peaks = {}
    for group, points in events.items():
        level = best = 0
        for _, delta in sorted(points):
            level += delta
            best = max(best, level)
        peaks[group] = best
    return peaks


def overlapping_per_vm(executions: list[Execution]) -> list[int]:
    return [vm for vm, most in peak(executions, lambda e: e.vm_id).items() if most > 1]


def stamp(epoch: float) -> str:
    """MESSAGE's time format (UTC in these tests)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%a %b %d %H:%M:%S %Y")


# -- timing ------------------------------------------------------------------------------------------


def test_one_shot_runs_once_exactly_at_its_time(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        sa = h.action(1, time=T0)
        h.state.update_soon("schedaction", replace(sa, message="Wed Dec 31 02:00:10 2025 : disk full"))
        engine = await h.start()
        await h.until(T0 - 1)
        assert h.executions == []  # not before its time
        await h.wait_for(lambda: not is_pending(h.sched(sa.id)), within=2 * HOUR)
        await h.until(T0 + 3 * DAY)
        [run] = h.executions
        assert (run.started, run.finished, run.scheduled) == (T0, T0 + 10, T0)
        assert engine.stats.lateness == [0.0]
        done = h.sched(sa.id)
        assert (done.done, done.message) == (T0 + 10, "")
        rows = await h.runs()
        assert [(r[1], r[3], r[4], r[5]) for r in rows] == [(sa.id, T0, "done", 1)]

    simulate(tmp_path, body)


@pytest.mark.parametrize(
    ("repeat", "days", "expected"),
    [
        # Thursday 02:00, then Mondays and Thursdays.
        (Repeat.WEEKLY, "1,4", [T0, T0 + 4 * DAY, T0 + 7 * DAY, T0 + 11 * DAY, T0 + 14 * DAY]),
        # Every day of the week: daily.
        (Repeat.WEEKLY, EVERY_DAY, [T0 + d * DAY for d in range(15)]),
        # The 1st, 5th and 10th of the month.
        (Repeat.MONTHLY, "1,5,10", [T0, T0 + 4 * DAY, T0 + 9 * DAY]),
        (Repeat.HOURLY, "6", [T0 + k * 6 * HOUR for k in range(57)]),
    ],
)
def test_repeating_action_runs_on_each_occurrence(tmp_path: Path, repeat: Repeat, days: str,
                                                   expected: list[int]) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        sa = h.action(1, time=T0, repeat=repeat, days=days)
        engine = await h.start()
        await h.until(T0 + 14 * DAY + 11)
        assert [e.started for e in h.executions] == expected
        assert [e.scheduled for e in h.executions] == expected
        assert set(engine.stats.lateness or []) == {0.0}
        after = h.sched(sa.id)
        assert after.time > expected[-1] and after.done == expected[-1] + 10

    simulate(tmp_path, body)


@pytest.mark.parametrize("times", [0, 1, 3])
def test_end_times_n_gives_n_plus_one_runs(tmp_path: Path, times: int) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        sa = h.action(1, time=T0, repeat=Repeat.WEEKLY, days=EVERY_DAY, end_type=EndType.TIMES, end_value=times)
        await h.start()
        await h.until(T0 + 30 * DAY)
        assert [e.started for e in h.executions] == [T0 + d * DAY for d in range(times + 1)]
        assert not is_pending(h.sched(sa.id))  # finished

    simulate(tmp_path, body)


# -- one action at a time per VM ---------------------------------------------------------------------


def test_one_action_at_a_time_per_vm(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        h.action(1, time=T0)
        h.action(1, "reboot", time=T0 + 5)
        h.action(1, "snapshot-create", args="s1", time=T0 + 5)
        engine = await h.start()
        await h.until(T0 + 1)
        assert engine.waiting_reason(1) is None
        await h.until(T0 + 6)
        assert engine.waiting_reason(1) == "waiting: another action of VM 1 is running"
        await h.until(T0 + HOUR)
        assert [(e.action, e.started) for e in h.executions] == [
            ("backup", T0), ("reboot", T0 + 10), ("snapshot-create", T0 + 20)]

    simulate(tmp_path, body)


def test_backup_waiting_for_a_slot_does_not_block_the_vms_other_action(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0, 2: 1})
        h.action(2, time=T0)  # takes the only slot for 100 s
        h.action(1, time=T0 + 1)  # waits for the slot
        h.action(1, "reboot", time=T0 + 2)
        engine = await h.start()
        await h.until(T0 + 3)
        # The reboot runs although the VM's backup, due earlier, waits for MAX_BACKUPS.
        assert engine.waiting_reason(1) == "waiting: another action of VM 1 is running"
        assert [(e.vm_id, e.action, e.started) for e in h.executions] == [(2, "backup", T0), (1, "reboot", T0 + 2)]
        await h.until(T0 + 13)
        assert engine.waiting_reason(1) == "waiting: MAX_BACKUPS=1 reached"
        await h.until(T0 + HOUR)
        assert [(e.vm_id, e.action, e.started) for e in h.executions][2:] == [(1, "backup", T0 + 100)]

    simulate(tmp_path, body, settings(max_backups=1), Script(durations={2: 100}))


# -- limits ------------------------------------------------------------------------------------------

# Six VMs on three hosts (two each), backing up to two datastores (VMs 1, 3, 5 -> 100; 2, 4, 6 -> 101),
# all due at once, each backup 100 s.
PLACEMENT = {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2}


@pytest.mark.parametrize(
    ("limits", "total", "per_host", "per_datastore", "makespan"),
    [
        ((0, 0, 0), 6, 2, 3, 100),
        ((2, 0, 0), 2, 2, 1, 300),  # VMs 1 and 2 (host 0) first, then 3 and 4, then 5 and 6
        ((5, 2, 0), 5, 2, 3, 200),
        ((0, 1, 0), 3, 1, 3, 200),  # one per host: VMs 1, 3, 5 (datastore 100), then 2, 4, 6
        ((0, 0, 1), 2, 2, 1, 300),  # one per datastore: VMs 1 and 2 (both on host 0) first
        ((4, 1, 2), 3, 1, 2, 200),  # VM 5 is held by datastore 100, VM 6 goes in its place
    ],
)
def test_limits_are_respected_and_used_to_the_full(tmp_path: Path, limits: tuple[int, int, int], total: int,
                                                   per_host: int, per_datastore: int, makespan: int) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, PLACEMENT, datastores=(100, 101))
        for vm in PLACEMENT:
            h.action(vm, time=T0, args=f"{100 + (vm + 1) % 2},0")
        engine = await h.start()
        await h.until(T0 + DAY)
        assert len(h.executions) == 6
        assert max(peak(h.executions).values()) == total
        assert max(peak(h.executions, lambda e: e.host_id).values()) == per_host
        assert max(peak(h.executions, lambda e: e.datastore_id).values()) == per_datastore
        stats = engine.stats
        assert (stats.max_running, stats.max_running_host, stats.max_running_datastore) == (
            total, per_host, per_datastore)
        assert stats.limit_violations == 0
        assert max(e.finished or 0 for e in h.executions) - T0 == makespan
        assert engine.counts.total == 0 and not engine.counts.per_host and not engine.counts.per_datastore

    simulate(tmp_path, body, settings(*limits), Script(duration=100))


def test_saturated_host_does_not_block_a_backup_on_a_free_host(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0, 2: 0, 3: 0, 4: 1})
        h.action(1, time=T0)
        h.action(2, time=T0 + 1)
        h.action(3, time=T0 + 2)
        h.action(4, time=T0 + 3)  # due last, on a free host
        engine = await h.start()
        await h.until(T0 + 4)
        assert [(e.vm_id, e.started) for e in h.executions] == [(1, T0), (4, T0 + 3)]
        assert engine.waiting_reason(2) == "waiting: MAX_BACKUPS_HOST=1 reached on host kvm0"
        assert engine.waiting_reason(3) == "waiting: MAX_BACKUPS_HOST=1 reached on host kvm0"
        await h.until(T0 + HOUR)
        assert [(e.vm_id, e.started) for e in h.executions][2:] == [(2, T0 + 100), (3, T0 + 200)]

    simulate(tmp_path, body, settings(max_backups=5, max_backups_host=1), Script(duration=100))


def test_earliest_due_first_and_each_waiting_backup_names_its_limit(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}, datastores=(100, 101))
        h.action(1, time=T0)  # runs first, on datastore 100
        h.action(2, time=T0 + 30)
        h.action(3, time=T0 + 10)
        h.action(4, time=T0 + 20)
        h.action(5, time=T0 + 5, args="101,0")
        engine = await h.start()
        await h.until(T0 + 31)
        assert [(e.vm_id, e.started) for e in h.executions] == [(1, T0), (5, T0 + 5)]
        for vm in (2, 3, 4):
            assert engine.waiting_reason(vm) == "waiting: MAX_BACKUPS_DATASTORE=1 reached on datastore 100 (backups100)"
        assert engine.waiting_reason(5) is None
        await h.until(T0 + DAY)
        assert [e.vm_id for e in h.executions] == [1, 5, 3, 4, 2]
        assert [e.started for e in h.executions][2:] == [T0 + 100, T0 + 200, T0 + 300]

    simulate(tmp_path, body, settings(max_backups=3, max_backups_datastore=1), Script(duration=100))


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        ((1, 0, 0), "waiting: MAX_BACKUPS=1 reached"),
        ((0, 1, 0), "waiting: MAX_BACKUPS_HOST=1 reached on host kvm0"),
        ((0, 0, 1), "waiting: MAX_BACKUPS_DATASTORE=1 reached on datastore 100 (backups100)"),
    ],
)
def test_waiting_reason_is_shown_and_counted_in_metrics(tmp_path: Path, limits: tuple[int, int, int],
                                                         reason: str) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0, 2: 0})
        h.action(1, time=T0)
        h.action(2, time=T0)
        engine = await h.start()
        await h.until(T0 + 1)
        assert engine.waiting_reason(2) == reason
        assert engine.waiting_reason(1) is None
        label = {"MAX_BACKUPS=": "global", "MAX_BACKUPS_HOST": "host", "MAX_BACKUPS_DATASTORE": "datastore"}
        kind = next(v for k, v in label.items() if k in reason)
        page = render(engine)
        assert f'vmsched_backups_waiting{{limit="{kind}"}} 1' in page
        assert "vmsched_runs_running 1" in page and "vmsched_runs_queued 1" in page
        assert 'vmsched_backups_running_host{host="kvm0"} 1' in page

    simulate(tmp_path, body, settings(*limits), Script(duration=100))


def test_disabled_host_holds_its_backups_with_the_reason(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0, 2: 1})
        h.host(0, HostState.DISABLED)
        h.action(1, time=T0)
        h.action(2, time=T0)
        engine = await h.start()
        await h.until(T0 + 1)
        assert [e.vm_id for e in h.executions] == [2]
        assert engine.waiting_reason(1) == "waiting: host kvm0 is DISABLED"
        h.host(0, HostState.MONITORED)
        await h.settle()
        assert [(e.vm_id, e.started) for e in h.executions] == [(2, T0), (1, T0 + 1)]

    simulate(tmp_path, body, settings(max_backups=5, max_backups_host=2))


def test_host_in_error_holds_its_other_actions_too(tmp_path: Path) -> None:
    """A reboot of a VM whose host is in ERROR waits with the reason and runs once the host is back."""

    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0, 2: 1})
        h.host(0, HostState.ERROR)
        h.action(1, "reboot", time=T0)
        h.action(2, "reboot", time=T0)
        engine = await h.start()
        await h.until(T0 + 1)
        assert [e.vm_id for e in h.executions] == [2]
        assert engine.waiting_reason(1) == "waiting: host kvm0 is in ERROR"
        assert list(engine.waiting_reasons().values()) == ["waiting: host kvm0 is in ERROR"]
        h.host(0, HostState.MONITORED)
        await h.settle()
        assert [(e.vm_id, e.started) for e in h.executions] == [(2, T0), (1, T0 + 1)]
        assert engine.waiting_reason(1) is None

    simulate(tmp_path, body, settings(), Script(duration=0))


def test_cancel_stops_a_running_backup_and_drops_a_queued_one(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0, 2: 0})
        running = h.action(1, time=T0, repeat=Repeat.WEEKLY, days=EVERY_DAY)
        queued = h.action(2, time=T0)
        engine = await h.start()
        await h.until(T0 + 10)
        assert [e.vm_id for e in h.executions] == [1]  # MAX_BACKUPS_HOST=1: VM 2 waits
        assert engine.cancel_backup(2) is not None and engine.cancel_backup(1) is not None
        await h.settle()
        assert engine.cancel_backup(1) is None  # nothing left to cancel
        await h.until(T0 + 3600)
        assert [e.vm_id for e in h.executions] == [1]  # the queued one never ran, nothing retried
        assert {r[1]: r[4] for r in await h.runs()} == {running.id: "cancelled", queued.id: "cancelled"}
        assert h.sched(running.id).message.endswith("cancelled by an operator")
        assert h.sched(running.id).time == T0 + DAY  # the action moved on to its next occurrence
        assert engine.counts.total == 0 and not engine.running

    simulate(tmp_path, body, settings(max_backups_host=1, retry_max=3), Script(duration=100))


# -- failures and retries ----------------------------------------------------------------------------


def test_failed_backup_is_retried_with_backoff_then_given_up(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        sa = h.action(1, time=T0, repeat=Repeat.WEEKLY, days=EVERY_DAY)
        engine = await h.start()
        await h.until(T0 + 11)  # attempt 1 failed at T0 + 10; retry at + 60
        assert h.sched(sa.id).message == f"{stamp(T0 + 10)} : disk full"
        assert h.sched(sa.id).time == T0  # still this occurrence
        assert engine.waiting_reason(1) == "waiting: retry 2 of backup at 2026-01-01 02:01:10 UTC"
        await h.until(T0 + HOUR)
        # attempts at T0, +10+60, +80+120, +210+240: backoff 60 s doubling, RETRY MAX = 3
        assert [(e.started, e.attempt) for e in h.executions] == [
            (T0, 1), (T0 + 70, 2), (T0 + 200, 3), (T0 + 450, 4)]
        after = h.sched(sa.id)
        assert after.time == T0 + DAY and after.done == -1
        assert after.message == f"{stamp(T0 + 460)} : disk full"  # kept after giving up
        rows = await h.runs()
        assert [(r[4], r[5], r[8]) for r in rows] == [("given_up", 4, "disk full")]
        assert (engine.stats.failures["backup"], engine.stats.given_up["backup"]) == (4, 1)
        assert engine.waiting_reason(1) is None

    simulate(tmp_path, body, settings(retry_max=3, retry_backoff=60), Script(failing={1: 99}))


def test_succeeding_retry_clears_the_message(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        sa = h.action(1, time=T0, repeat=Repeat.WEEKLY, days=EVERY_DAY)
        await h.start()
        await h.until(T0 + 11)
        assert h.sched(sa.id).message.endswith(" : disk full")
        await h.until(T0 + HOUR)
        assert [(e.started, e.ok) for e in h.executions] == [(T0, False), (T0 + 40, True)]
        after = h.sched(sa.id)
        assert (after.message, after.done, after.time) == ("", T0 + 50, T0 + DAY)
        assert [(r[4], r[5]) for r in await h.runs()] == [("done", 2)]

    simulate(tmp_path, body, settings(retry_max=3, retry_backoff=30), Script(failing={1: 1}))


async def outcome_columns(h: EngineHarness) -> list[tuple[str, int, str, str, str]]:
    await h.state.durable()
    return [tuple(row) for row in await h.store.query(
        "SELECT state, attempt, outcome, error_class, message FROM runs ORDER BY id")]


def test_a_non_retryable_error_fails_at_once_with_its_message(tmp_path: Path) -> None:
    """A DriverError with ``retryable`` False (a host key mismatch, say) is final at the first attempt."""
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        sa = h.action(1, time=T0, repeat=Repeat.WEEKLY, days=EVERY_DAY)
        engine = await h.start()
        await h.until(T0 + HOUR)
        assert [e.attempt for e in h.executions] == [1]
        assert h.sched(sa.id).message == f"{stamp(T0 + 10)} : host key mismatch"
        assert await outcome_columns(h) == [
            ("given_up", 1, "permanent", "scheduler.errors.DriverError", "host key mismatch")]
        assert (engine.stats.failures["backup"], engine.stats.given_up["backup"]) == (1, 1)

    simulate(tmp_path, body, settings(retry_max=3, retry_backoff=60),
             Script(failing={1: 99}, error="host key mismatch", retryable=False))


def test_a_retryable_error_is_recorded_with_its_class_while_retried(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        h.action(1, time=T0, repeat=Repeat.WEEKLY, days=EVERY_DAY)
        await h.start()
        await h.until(T0 + 11)
        assert await outcome_columns(h) == [
            ("queued", 1, "retryable", "scheduler.errors.DriverError", "disk full")]
        await h.until(T0 + HOUR)
        assert [e.attempt for e in h.executions] == [1, 2]
        assert await outcome_columns(h) == [("done", 2, "done", "", "simulated")]

    simulate(tmp_path, body, settings(retry_max=3, retry_backoff=60), Script(failing={1: 1}))


def test_a_programming_error_is_internal_logged_with_its_traceback_and_not_retried(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        sa = h.action(1, time=T0, repeat=Repeat.WEEKLY, days=EVERY_DAY)
        await h.start()
        await h.until(T0 + HOUR)
        assert [e.attempt for e in h.executions] == [1]
        message = "internal error (TypeError: unsupported operand); see the daemon's log"
        assert await outcome_columns(h) == [("given_up", 1, "internal", "TypeError", message)]
        assert h.sched(sa.id).message == f"{stamp(T0 + 10)} : {message}"

    with caplog.at_level("ERROR", logger="scheduler.engine.loop"):
        simulate(tmp_path, body, settings(retry_max=3, retry_backoff=60),
                 Script(failing={1: 99}, error="unsupported operand", raises=TypeError))
    [record] = [r for r in caplog.records if "hit an internal error" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is TypeError
    assert "Traceback" in caplog.text


@pytest.mark.parametrize("action, args", [("reboot", ""), ("snapshot-create", "nightly")])
def test_failed_non_backup_action_is_not_retried(tmp_path: Path, action: str, args: str) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        sa = h.action(1, action, args=args, time=T0, repeat=Repeat.WEEKLY, days=EVERY_DAY)
        await h.start()
        await h.until(T0 + DAY - 1)
        assert len(h.executions) == 1
        assert h.sched(sa.id).message == f"{stamp(T0 + 10)} : disk full"
        assert h.sched(sa.id).time == T0 + DAY  # on to the next occurrence
        assert [(r[4], r[5]) for r in await h.runs()] == [("failed", 1)]

    simulate(tmp_path, body, settings(retry_max=5, retry_backoff=1), Script(failing={1: 99}))


# -- missed runs after downtime ----------------------------------------------------------------------

# The daemon starts at START (Thursday 00:00); the daily action's TIME is ten days earlier at 02:00.
MISSED_FROM = START - 10 * DAY + 2 * HOUR
LATEST_MISSED = START - DAY + 2 * HOUR


@pytest.mark.parametrize(
    ("policy", "end", "scheduled"),
    [
        ("ONCE", (EndType.NEVER, -1), [LATEST_MISSED]),
        ("SKIP", (EndType.NEVER, -1), []),
        ("ALL", (EndType.NEVER, -1), [MISSED_FROM + d * DAY for d in range(10)]),
        ("ALL", (EndType.TIMES, 3), [MISSED_FROM + d * DAY for d in range(4)]),  # bounded by END_VALUE + 1
    ],
)
def test_missed_runs_after_downtime(tmp_path: Path, policy: str, end: tuple[EndType, int],
                                    scheduled: list[int]) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        sa = h.action(1, time=MISSED_FROM, repeat=Repeat.WEEKLY, days=EVERY_DAY, end_type=end[0], end_value=end[1])
        await h.start()
        await h.until(START + HOUR)  # before today's 02:00 occurrence
        assert [e.scheduled for e in h.executions] == scheduled
        assert [e.started for e in h.executions] == [START + 10 * k for k in range(len(scheduled))]
        after = h.sched(sa.id)
        if end[0] == EndType.TIMES:
            assert not is_pending(after)
        else:
            assert after.time == START + 2 * HOUR  # the next occurrence in the future
            await h.until(START + 3 * HOUR)
            assert h.executions[-1].scheduled == START + 2 * HOUR

    simulate(tmp_path, body, settings(missed_runs=policy))


# -- reload ------------------------------------------------------------------------------------------


def test_lowering_max_backups_never_cancels_running_backups(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {vm: vm for vm in range(1, 6)})
        for vm in range(1, 6):
            h.action(vm, time=T0)
        engine = await h.start()
        await h.until(T0 + 10)
        assert len(h.executions) == 3
        engine.reconfigure(settings(max_backups=1))
        await h.until(T0 + HOUR)
        assert [(e.vm_id, e.started, e.ok) for e in h.executions] == [
            (1, T0, True), (2, T0, True), (3, T0, True), (4, T0 + 100, True), (5, T0 + 200, True)]
        assert max(peak(h.executions[3:]).values()) == 1
        assert engine.stats.limit_violations == 0

    simulate(tmp_path, body, settings(max_backups=3), Script(duration=100))


def test_raising_max_backups_starts_waiting_backups_at_once(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {vm: vm for vm in range(1, 5)})
        for vm in range(1, 5):
            h.action(vm, time=T0)
        engine = await h.start()
        await h.until(T0 + 10)
        assert len(h.executions) == 1
        engine.reconfigure(settings(max_backups=3))
        await h.settle()
        assert [(e.vm_id, e.started) for e in h.executions] == [(1, T0), (2, T0 + 10), (3, T0 + 10)]
        assert engine.waiting_reason(4) == "waiting: MAX_BACKUPS=3 reached"

    simulate(tmp_path, body, settings(max_backups=1), Script(duration=100))


# -- restart recovery --------------------------------------------------------------------------------


def test_restart_recovers_running_and_queued_runs(tmp_path: Path) -> None:
    recovered: list[Run] = []

    async def recoverer(run: Run) -> None:
        recovered.append(run)

    async def scenario() -> None:
        first = await EngineHarness(tmp_path / "a.db", settings(max_backups=1, retry_max=2, retry_backoff=60),
                                    Script(duration=100)).open()
        fleet(first, {1: 0, 2: 1, 3: 2})
        backup = first.action(1, time=T0)  # running at the crash
        queued = first.action(2, time=T0)  # waiting for MAX_BACKUPS at the crash
        reboot = first.action(3, "reboot", time=T0)  # running at the crash
        await first.start()
        await first.until(T0 + 50)
        assert sorted((e.vm_id, e.action) for e in first.executions) == [(1, "backup"), (3, "reboot")]
        crashed = await first.crash_copy(tmp_path / "b.db")
        await first.close()

        second = EngineHarness(crashed, settings(max_backups=1, retry_max=2, retry_backoff=60),
                               Script(duration=100), recoverer)
        await second.open()
        engine = await second.start()
        await second.settle()
        # The backup was cleaned up and waits for its retry; the queued one runs; the reboot is closed.
        assert [(r.vm_id, r.action, r.attempt) for r in recovered] == [(1, "backup", 1)]
        assert [(e.vm_id, e.attempt) for e in second.executions] == [(2, 1)]
        assert engine.counts.total == 1 and dict(engine.counts.per_host) == {1: 1}
        assert len(engine.running) == 1
        assert second.sched(reboot.id).message.endswith("interrupted by a daemon restart; not run again")
        await second.until(T0 + DAY)
        assert [(e.vm_id, e.attempt, e.started) for e in second.executions] == [
            (2, 1, T0 + 50), (1, 2, T0 + 150)]
        rows = {r[1]: r for r in await second.runs()}
        assert (rows[backup.id][4], rows[backup.id][5]) == ("done", 2)
        assert (rows[queued.id][4], rows[queued.id][5]) == ("done", 1)
        assert rows[reboot.id][4] == "interrupted"
        assert engine.counts.total == 0 and not engine.running and len(engine.queues) == 0
        assert "vmsched_runs_running 0" in render(engine)
        for sa in (backup, queued):
            assert second.sched(sa.id).done != -1
        await second.close()

    run_virtual(scenario)


def test_a_result_recorded_with_stage_success_is_never_redone_after_a_crash(tmp_path: Path) -> None:
    """The action commits its result and the run's success in one transaction; a crash right after that
    commit (before the engine's own bookkeeping) must not run the occurrence again."""
    crashed: list[Path] = []

    async def record_result(h: EngineHarness, run: Run) -> None:
        assert h.engine is not None
        async with h.state.mutation() as m:
            m.put("datastore", Datastore(id=500 + run.id, name=f"result-{run.id}", type=DatastoreType.BACKUP_DS,
                                         ds_mad="fs"))
            h.engine.stage_success(run, m)
        crashed.append(await h.crash_copy(tmp_path / "b.db"))

    async def scenario() -> None:
        first = await EngineHarness(tmp_path / "a.db", settings(retry_max=3), Script(duration=10)).open()
        first.on_success = record_result
        fleet(first, {1: 0})
        sa = first.action(1, time=T0, repeat=Repeat.WEEKLY, days=EVERY_DAY)
        await first.start()
        await first.until(T0 + 20)  # the run succeeded at T0 + 10
        assert len(crashed) == 1
        await first.close()

        second = await EngineHarness(crashed[0], settings(retry_max=3), Script(duration=10)).open()
        assert second.state.find("datastore", 501) is not None  # the result is there
        action = second.sched(sa.id)
        assert action.done == T0 + 10 and action.time == T0 + DAY  # and the action moved on with it
        await second.start()
        await second.until(T0 + 3600)
        assert second.executions == []  # nothing redone, nothing retried
        rows = await second.runs()
        assert [(r[1], r[4]) for r in rows if r[3] == T0] == [(sa.id, "done")]  # one run for that occurrence
        await second.close()

    run_virtual(scenario)


def test_a_backup_is_not_started_over_what_a_failed_clean_up_left(tmp_path: Path) -> None:
    """After a crash, if the recoverer cannot clean up (host unreachable...), the retry does not run
    the action over the leftovers: it fails with the reason and is tried again later, then given up."""
    calls: list[int] = []

    async def stuck_recoverer(run: Run) -> None:
        calls.append(run.id)  # leaves run.steps as they are: nothing could be undone

    async def scenario() -> None:
        first = await EngineHarness(tmp_path / "a.db", settings(retry_max=1, retry_backoff=60),
                                    Script(duration=100)).open()
        fleet(first, {1: 0})
        sa = first.action(1, time=T0)
        engine = await first.start()
        await first.until(T0 + 10)
        [(run, _)] = engine.running.values()
        run.steps.append({"tm": "qcow2", "step": "overlay", "run": str(run.id), "path": "/x.overlay"})
        first.journal.save(run)
        crashed = await first.crash_copy(tmp_path / "b.db")
        await first.close()

        second = EngineHarness(crashed, settings(retry_max=1, retry_backoff=60), Script(duration=100),
                               stuck_recoverer)
        await second.open()
        await second.start()
        await second.until(T0 + 3600)
        assert second.executions == []  # never run over the leftovers
        assert len(calls) >= 2  # at start-up, and again before the retry
        assert "could not be cleaned up" in second.sched(sa.id).message
        rows = await second.runs()
        assert [r[4] for r in rows] == ["given_up"]
        await second.close()

    run_virtual(scenario)


def test_backup_interrupted_more_often_than_retry_max_is_given_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        first = await EngineHarness(tmp_path / "a.db", settings(retry_max=0), Script(duration=100)).open()
        fleet(first, {1: 0})
        sa = first.action(1, time=T0, repeat=Repeat.WEEKLY, days=EVERY_DAY)
        await first.start()
        await first.until(T0 + 50)
        crashed = await first.crash_copy(tmp_path / "b.db")
        await first.close()
        second = await EngineHarness(crashed, settings(retry_max=0), Script(duration=100)).open()
        await second.start()
        await second.settle()
        assert second.executions == []
        assert [r[4] for r in await second.runs()] == ["given_up"]
        after = second.sched(sa.id)
        assert after.time == T0 + DAY and after.message.endswith(" : interrupted by a daemon restart")
        await second.until(T0 + DAY + 1)
        assert [e.scheduled for e in second.executions] == [T0 + DAY]
        await second.close()

    run_virtual(scenario)


# -- deleting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("deleted", ["schedaction", "vm"])
def test_deleting_an_action_or_its_vm_cancels_its_queued_runs(tmp_path: Path, deleted: str) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0, 2: 1, 3: 2})
        h.action(1, time=T0)
        doomed = h.action(2, time=T0 + 1)  # queued behind MAX_BACKUPS
        retrying = h.action(3, time=T0 - 200)  # failed once, waiting for its retry
        engine = await h.start()
        await h.until(T0 + 5)
        assert engine.waiting_reason(2) == "waiting: MAX_BACKUPS=1 reached"
        assert (engine.waiting_reason(3) or "").startswith("waiting: retry 2 of backup")
        for sa in (doomed, retrying):
            h.delete(deleted, sa.id if deleted == "schedaction" else sa.parent_id)
        await h.settle()
        assert engine.waiting_reason(2) is None and engine.waiting_reason(3) is None
        await h.until(T0 + DAY)
        assert [(e.vm_id, e.attempt) for e in h.executions] == [(3, 1), (1, 1)]
        rows = {r[2]: (r[4], r[8]) for r in await h.runs()}
        why = "its scheduled action was deleted" if deleted == "schedaction" else "its VM was deleted"
        assert rows == {1: ("done", "simulated"), 2: ("cancelled", why), 3: ("cancelled", why)}
        assert len(engine.queues) == 0

    simulate(tmp_path, body, settings(max_backups=1, retry_max=3, retry_backoff=600),
             Script(durations={1: 100, 3: 5}, failing={3: 1}))


# -- property: random small workloads ----------------------------------------------------------------

workloads = st.fixed_dictionaries({
    "limits": st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 2)),
    "vms": st.lists(
        st.tuples(
            st.integers(0, 3),  # host
            st.sampled_from([100, 101]),  # datastore
            st.sampled_from(["backup", "backup", "reboot"]),
            st.integers(0, 120),  # due offset
            st.integers(0, 90),  # duration
            st.integers(0, 3),  # failing attempts
            st.booleans(),  # a second action on the same VM
        ),
        min_size=1, max_size=8,
    ),
    "retry_max": st.integers(0, 2),
})


@hypothesis_settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workload=workloads)
def test_random_workloads_keep_every_invariant(tmp_path_factory: pytest.TempPathFactory, workload: dict) -> None:
    vms = dict(enumerate(workload["vms"], start=1))
    script = Script(durations={vm: spec[4] for vm, spec in vms.items()},
                    failing={vm: spec[5] for vm, spec in vms.items()})

    async def body(h: EngineHarness) -> None:
        fleet(h, {vm: spec[0] for vm, spec in vms.items()}, datastores=(100, 101))
        for vm, (_, ds, action, due, _, _, twice) in vms.items():
            args = f"{ds},0" if action == "backup" else ""
            h.action(vm, action, time=T0 + due, args=args, repeat=Repeat.HOURLY, days="1",
                     end_type=EndType.TIMES, end_value=1)
            if twice:
                h.action(vm, "backup", time=T0 + due // 2, args=f"{ds},0")
        engine = await h.start()
        await h.until(T0 + DAY)
        assert engine.stats.limit_violations == 0
        assert overlapping_per_vm(h.executions) == []
        limits = engine.settings.limits
        backups = [e for e in h.executions if e.action == "backup"]
        for limit, key in ((limits.max_backups, lambda e: None), (limits.max_backups_host, lambda e: e.host_id),
                           (limits.max_backups_datastore, lambda e: e.datastore_id)):
            if limit:
                assert max(peak(backups, key).values(), default=0) <= limit
        successes = Counter((e.action_id, e.scheduled) for e in h.executions if e.ok)
        assert max(successes.values(), default=0) <= 1
        assert not engine.running and len(engine.queues) == 0 and engine.counts.total == 0
        assert [r for r in await h.runs() if r[4] in ("queued", "running")] == []

    simulate(tmp_path_factory.mktemp("workload"), body,
             settings(*workload["limits"], retry_max=workload["retry_max"], retry_backoff=30), script)


# -- /metrics values ---------------------------------------------------------------------------------


def test_metrics_keep_every_digit_of_timestamps_and_counters(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        h.action(1, time=T0)
        engine = await h.start()
        await h.until(T0 + 11)
        engine.stats.started["backup"] = 1_234_567
        page = render(engine).splitlines()
        assert f'vmsched_last_success_timestamp_seconds{{vm="1"}} {T0 + 10}' in page
        assert 'vmsched_runs_started_total{action="backup"} 1234567' in page

    simulate(tmp_path, body)


def test_metrics_count_the_chains_that_restarted_by_vm_and_cause(tmp_path: Path) -> None:
    async def body(h: EngineHarness) -> None:
        fleet(h, {1: 0})
        for image_id, vm_id, cause in [(1, 1, "checkpoint"), (2, 1, "checkpoint"), (3, 2, "resized"), (4, 2, "")]:
            template = Template()
            if cause:
                template.set(NEW_CHAIN_CAUSE, cause)
            h.state.update_soon("image", Image(id=image_id, name=f"img{image_id}", type=ImageType.BACKUP, vms=[vm_id],
                                               template=template))
        engine = await h.start()
        page = render(engine).splitlines()
        assert [line for line in page if line.startswith("vmsched_backup_chains_restarted{")] == [
            'vmsched_backup_chains_restarted{vm="1",cause="checkpoint"} 2',
            'vmsched_backup_chains_restarted{vm="2",cause="resized"} 1']

    simulate(tmp_path, body)
