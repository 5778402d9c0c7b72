"""The pure parts of benchmarks/bench_fleet.py: data sizes, the lower bound, concurrency and limit checks."""

from __future__ import annotations

import pytest

from benchmarks.bench_fleet import Span, data_sizes, longest_gaps, lower_bound, peak_concurrency, violations


@pytest.mark.parametrize(
    ("durations", "max_total", "max_host", "expected"),
    [
        ({"h1": [3, 4, 5], "h2": [1, 1], "h3": [2], "h4": [2]}, 4, 1, 12.0),  # host1's sum dominates
        ({"h1": [3, 3], "h2": [3, 3], "h3": [3, 3], "h4": [3, 3]}, 2, 1, 12.0),  # the global slots dominate
        ({"h1": [10], "h2": [1, 1]}, 4, 2, 10.0),  # the longest run dominates
        ({"h1": [4, 4, 4], "h2": [2]}, 0, 2, 6.0),  # no global limit: the host's two slots
        ({"h1": [4, 4, 4], "h2": [2]}, 3, 0, 14 / 3),  # no host limit
        ({"h1": [4, 4], "h2": [2]}, 0, 0, 4.0),  # no limit at all: the longest run
        ({}, 4, 1, 0.0),
    ],
)
def test_lower_bound(durations: dict[str, list[float]], max_total: int, max_host: int, expected: float) -> None:
    assert lower_bound(durations, max_total, max_host) == pytest.approx(expected)


def spans(*rows: tuple[str, float, float]) -> list[Span]:
    return [Span(vm_id, host, start, end) for vm_id, (host, start, end) in enumerate(rows)]


@pytest.mark.parametrize(
    ("rows", "peak", "peak_host", "found"),
    [
        # back to back on one host: a finish and a start at the same instant do not overlap
        ([("h1", 0, 2), ("h1", 2, 5), ("h2", 0, 5)], 2, {"h1": 1, "h2": 1}, []),
        # two on h1 at once for 0.5 s
        ([("h1", 0, 2), ("h1", 1.5, 5), ("h2", 0, 5)], 3, {"h1": 2, "h2": 1},
         ["VM 1 started with 2 open (> MAX_BACKUPS_HOST on h1=1) for 0.500 s"]),
        # a fifth run overall while four are open, each on its own host
        ([("h1", 0, 4), ("h2", 0, 4), ("h3", 0, 4), ("h4", 0, 3), ("h5", 1, 2)], 5,
         {"h1": 1, "h2": 1, "h3": 1, "h4": 1, "h5": 1},
         ["VM 4 started with 5 open (> MAX_BACKUPS=4) for 1.000 s"]),
    ],
)
def test_peak_concurrency_and_violations(rows: list[tuple[str, float, float]], peak: int,
                                         peak_host: dict[str, int], found: list[str]) -> None:
    given = spans(*rows)
    assert peak_concurrency(given) == (peak, peak_host)
    assert violations(given, 4, 1) == found


def test_longest_gaps_per_host() -> None:
    given = spans(("h1", 0, 2), ("h1", 2.25, 3), ("h1", 3.5, 4), ("h2", 0, 9))
    assert longest_gaps(given) == {"h1": 0.5, "h2": 0.0}


def test_data_sizes_are_steps_of_64_mib_in_range_and_reproducible() -> None:
    sizes = data_sizes(4, 5, 64, 320, seed=1)
    assert [len(row) for row in sizes] == [5, 5, 5, 5]
    every = [mib for row in sizes for mib in row]
    assert all(mib % 64 == 0 and 64 <= mib <= 320 for mib in every)
    assert len(set(every)) > 1 and len({sum(row) for row in sizes}) > 1  # not trivial: hosts differ
    assert sizes == data_sizes(4, 5, 64, 320, seed=1)
    assert {mib for row in data_sizes(3, 10, 100, 200, seed=2) for mib in row} == {128, 192}  # rounded inwards


def test_data_sizes_without_a_step_in_range() -> None:
    with pytest.raises(ValueError, match="no multiple of 64"):
        data_sizes(1, 1, 65, 127, seed=0)
