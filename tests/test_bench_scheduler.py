"""`vmsched bench scheduler` end to end (small, virtual clock): the report and its invariants."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

REQUIRED = {
    "vms", "hosts", "makespan_s", "lower_bound_s", "max_running", "max_running_per_host",
    "max_running_per_datastore", "limit_violations", "dispatch_lateness_p50_ms", "dispatch_lateness_p99_ms",
    "dispatch_lateness_max_ms", "wall_s", "cpu_s", "peak_rss_mb", "setup_cpu_s", "dispatch_cpu_s",
}


def bench(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "scheduler", "bench", "scheduler", *args, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    ("args", "limits"),
    [
        (["--vms", "200", "--hosts", "8", "--max-backups", "4", "--max-backups-host", "1",
          "--duration-dist", "lognormal:4,0.6", "--host-skew", "zipf:1.2", "--seed", "7"], (4, 1, 0)),
        (["--vms", "150", "--hosts", "3", "--max-backups", "0", "--max-backups-host", "2", "--datastores", "3",
          "--max-backups-datastore", "1", "--duration-dist", "uniform:10,100", "--seed", "3"], (0, 2, 1)),
    ],
)
def test_report_keeps_the_limits_and_is_near_the_bound(args: list[str], limits: tuple[int, int, int]) -> None:
    report = bench(*args)
    assert REQUIRED <= report.keys()
    assert report["limit_violations"] == 0
    g, p, d = limits
    if g:
        assert report["max_running"] == g  # the limit is reached, never passed
    assert report["max_running_per_host"] <= p
    if d:
        assert report["max_running_per_datastore"] <= d
    assert report["lower_bound_s"] <= report["makespan_s"] <= 1.1 * report["lower_bound_s"]
    assert report["runs"] == report["vms"]


def test_daily_actions_for_several_days_use_scheduled_actions() -> None:
    report = bench("--vms", "50", "--hosts", "5", "--max-backups", "10", "--max-backups-host", "2",
                   "--duration-dist", "const:30", "--days", "3", "--spread", "600")
    assert report["runs"] == 150 and report["limit_violations"] == 0
    assert report["makespan_s"] >= 2 * 86400  # three daily occurrences


def test_same_seed_same_result() -> None:
    args = ["--vms", "80", "--hosts", "4", "--duration-dist", "lognormal:3,1", "--seed", "11"]
    first, second = bench(*args), bench(*args)
    assert first["makespan_s"] == second["makespan_s"] and first["lower_bound_s"] == second["lower_bound_s"]


def test_bad_arguments_exit_2_with_the_reason() -> None:
    done = subprocess.run([sys.executable, "-m", "scheduler", "bench", "scheduler", "--duration-dist", "zzz"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "bad --duration-dist 'zzz'" in done.stderr
