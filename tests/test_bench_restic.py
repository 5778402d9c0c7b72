"""The pure parts of benchmarks/bench_restic.py: reading restic's summary and the daemon's log, sizes."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_restic import logged_added, size, summary_of

STATUS = json.dumps({"message_type": "status", "percent_done": 0.5})
SUMMARY = json.dumps({"message_type": "summary", "data_added": 1234, "snapshot_id": "ab" * 32})


@pytest.mark.parametrize(("stdout", "added"), [
    (f"{STATUS}\n{SUMMARY}\n", 1234),
    (f"{SUMMARY}\nnot json\n{STATUS}\n", 1234),  # the summary need not be the last line
])
def test_summary_of_finds_the_summary(stdout: str, added: int) -> None:
    assert summary_of(stdout)["data_added"] == added


def test_summary_of_without_a_summary_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no summary"):
        summary_of(f"{STATUS}\n")


LOG = """\
2026-01-01 10:00:00,000 INFO drivers.datastore.restic: datastore 100: VM 3 backup 1a2b3c4d is snapshot 1a2b3c4d \
(1074790400 bytes processed, 269044615 added)
2026-01-01 10:00:05,000 INFO drivers.datastore.restic: datastore 100: VM 4 backup 5e6f7a8b is snapshot 5e6f7a8b \
(1074790400 bytes processed, 77 added)
2026-01-01 10:00:09,000 INFO drivers.datastore.restic: datastore 100: VM 3 backup 9c0d1e2f is snapshot 9c0d1e2f \
(1074790400 bytes processed, 19349 added)
"""


@pytest.mark.parametrize(("vm_id", "added"), [(3, [269044615, 19349]), (4, [77]), (5, [])])
def test_logged_added_per_vm_oldest_first(vm_id: int, added: list[int]) -> None:
    assert logged_added(LOG, vm_id) == added


@pytest.mark.parametrize(("n", "text"), [(-1, "n/a"), (0, "0.0 KiB"), (19349, "18.9 KiB"),
                                         (1 << 20, "1.00 MiB"), (269044615, "256.58 MiB")])
def test_size(n: int, text: str) -> None:
    assert size(n) == text
