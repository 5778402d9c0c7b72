"""Admission of backups under MAX_BACKUPS / MAX_BACKUPS_HOST / MAX_BACKUPS_DATASTORE."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.engine.admission import Candidate, Limits, Running, admit, blocking_limit


def cand(run_id: int, due: float, host: int, ds: int = 100, priority: int = 0, blocked: str = "") -> Candidate:
    return Candidate(run_id, due, host, f"kvm{host}", ds, "backups", priority, blocked)


@pytest.mark.parametrize(
    ("limits", "running", "candidates", "admitted", "reasons"),
    [
        # Everything fits.
        (Limits(5, 2, 0), Running(), [cand(1, 10, 1), cand(2, 11, 2)], [1, 2], {}),
        # The global limit: earliest due first.
        (Limits(1, 0, 0), Running(), [cand(2, 11, 2), cand(1, 10, 1)], [1], {2: "waiting: MAX_BACKUPS=1 reached"}),
        # A saturated host does not block a later backup on another host (no head-of-line blocking).
        (Limits(5, 1, 0), Running(1, Counter({1: 1}), Counter({100: 1})), [cand(1, 10, 1), cand(2, 20, 2)], [2],
         {1: "waiting: MAX_BACKUPS_HOST=1 reached on host kvm1"}),
        # Two on the same host: the second waits for the host, the third (other host) goes.
        (Limits(5, 1, 0), Running(), [cand(1, 10, 1), cand(2, 11, 1), cand(3, 12, 2)], [1, 3],
         {2: "waiting: MAX_BACKUPS_HOST=1 reached on host kvm1"}),
        # The datastore limit, with the datastore named.
        (Limits(0, 0, 1), Running(), [cand(1, 10, 1, 100), cand(2, 11, 2, 100), cand(3, 12, 3, 101)], [1, 3],
         {2: "waiting: MAX_BACKUPS_DATASTORE=1 reached on datastore 100 (backups)"}),
        # 0 means unlimited everywhere.
        (Limits(0, 0, 0), Running(50, Counter({1: 50}), Counter({100: 50})), [cand(1, 10, 1)], [1], {}),
        # Priority breaks ties at equal due time.
        (Limits(1, 0, 0), Running(), [cand(1, 10, 1, priority=0), cand(2, 10, 2, priority=9)], [2],
         {1: "waiting: MAX_BACKUPS=1 reached"}),
        # A host in ERROR or DISABLED holds its backups with the reason.
        (Limits(5, 2, 0), Running(), [cand(1, 10, 1, blocked="host kvm1 is DISABLED"), cand(2, 11, 2)], [2],
         {1: "waiting: host kvm1 is DISABLED"}),
    ],
)
def test_admission_table(limits, running, candidates, admitted, reasons) -> None:
    decision = admit(candidates, running, limits)
    assert [c.run_id for c in decision.admitted] == admitted
    assert decision.waiting == reasons


def test_admit_does_not_change_running() -> None:
    running = Running()
    admit([cand(1, 10, 1)], running, Limits())
    assert running.total == 0 and not running.per_host


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("waiting: MAX_BACKUPS=1 reached", "global"),
        ("waiting: MAX_BACKUPS_HOST=2 reached on host kvm1", "host"),
        ("waiting: MAX_BACKUPS_DATASTORE=1 reached on datastore 3", "datastore"),
        ("waiting: host kvm1 is in ERROR", "host_state"),
    ],
)
def test_blocking_limit_labels(reason: str, label: str) -> None:
    assert blocking_limit(reason) == label


@settings(max_examples=300)
@given(
    limits=st.builds(Limits, st.integers(0, 6), st.integers(0, 3), st.integers(0, 3)),
    jobs=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 4), st.integers(0, 2)), max_size=40),
    busy=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2)), max_size=6),
)
def test_limits_hold_and_nothing_waits_without_cause(limits: Limits, jobs, busy) -> None:
    running = Running()
    for host, ds in busy:
        running.add(host, ds)
    candidates = [cand(i, due, host, ds) for i, (due, host, ds) in enumerate(jobs)]
    decision = admit(candidates, running, limits)
    after = running.copy()
    for c in decision.admitted:
        after.add(c.host_id, c.datastore_id)
    started_now = Running()
    for c in decision.admitted:
        started_now.add(c.host_id, c.datastore_id)
    # Never start something that breaks a limit which had room before it.
    if limits.max_backups:
        assert started_now.total == 0 or after.total <= max(limits.max_backups, running.total)
    for host, _count in started_now.per_host.items():
        if limits.max_backups_host:
            assert after.per_host[host] <= max(limits.max_backups_host, running.per_host[host])
    for ds, _count in started_now.per_datastore.items():
        if limits.max_backups_datastore:
            assert after.per_datastore[ds] <= max(limits.max_backups_datastore, running.per_datastore[ds])
    # Every waiting candidate is blocked by a limit that is full once everything admitted is running.
    for c in candidates:
        if c.run_id in decision.waiting:
            full = (
                (limits.max_backups and after.total >= limits.max_backups)
                or (limits.max_backups_host and after.per_host[c.host_id] >= limits.max_backups_host)
                or (limits.max_backups_datastore and after.per_datastore[c.datastore_id] >= limits.max_backups_datastore)
            )
            assert full, f"run {c.run_id} waits without cause: {decision.waiting[c.run_id]}"
    assert len(decision.admitted) + len(decision.waiting) == len(candidates)
