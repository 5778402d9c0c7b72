"""/metrics in the Prometheus text format: what the engine is doing and how late it dispatches."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from scheduler.engine.admission import blocking_limit
from scheduler.engine.progress import BackupProgress
from scheduler.model.objects.image import NEW_CHAIN_CAUSE

LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENESS_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENESS_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    """Every digit: timestamps and large counters must not be rounded."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {_number(value)}" for labels, value in samples]
    return lines


def progress_lines(board: Iterable[BackupProgress]) -> list[str]:
    """Bytes done and to do of each running backup's current phase, per disk and overall (disk="all")."""
    done: list[tuple[str, float]] = []
    total: list[tuple[str, float]] = []
    for p in sorted(board, key=lambda p: p.run_id):
        base = f'vm="{p.vm_id}",run="{p.run_id}",phase="{_escape(p.phase)}"'
        for disk, b in [("all", None), *sorted(p.disks.items())]:
            labels = f'{{{base},disk="{disk}"}}'
            done.append((labels, p.done if b is None else b.done))
            total.append((labels, p.total if b is None else b.total))
    return (_family("vmsched_backup_done_bytes", "gauge", "bytes done in the running backup's phase", done)
            + _family("vmsched_backup_total_bytes", "gauge", "bytes to do in the running backup's phase", total))


def render(engine: object, board: Iterable[BackupProgress] = ()) -> str:
    """The text page for an Engine (duck-typed to keep this module free of the engine's imports) and the
    progress of the backups running now."""
    stats = engine.stats  # type: ignore[attr-defined]
    state = engine.state  # type: ignore[attr-defined]
    waiting: Counter[str] = Counter()
    for reason in engine.waiting_reasons().values():  # type: ignore[attr-defined]
        waiting["vm" if "another action of VM" in reason else blocking_limit(reason)] += 1
    hosts = {h.id: h.name for h in state.pools.get("host", {}).values()}
    counts = engine.counts  # type: ignore[attr-defined]
    lines: list[str] = []
    lines += _family("vmsched_runs_running", "gauge", "actions running now", [("", len(engine.running))])  # type: ignore[attr-defined]
    lines += _family("vmsched_runs_queued", "gauge", "runs journaled and not started", [("", len(engine.queues))])  # type: ignore[attr-defined]
    lines += _family("vmsched_backups_waiting", "gauge", "queued backups by what holds them",
                     [(f'{{limit="{k}"}}', v) for k, v in sorted(waiting.items())])
    lines += _family("vmsched_backups_running_host", "gauge", "backups running per host",
                     [(f'{{host="{_escape(hosts.get(h, h))}"}}', v) for h, v in sorted(counts.per_host.items())])
    lines += _family("vmsched_backups_running_datastore", "gauge", "backups running per backup datastore",
                     [(f'{{datastore="{d}"}}', v) for d, v in sorted(counts.per_datastore.items())])
    lines += _family("vmsched_runs_started_total", "counter", "runs started, by action",
                     [(f'{{action="{_escape(a)}"}}', v) for a, v in sorted(stats.started.items())])
    lines += _family("vmsched_run_failures_total", "counter", "failed attempts, by action",
                     [(f'{{action="{_escape(a)}"}}', v) for a, v in sorted(stats.failures.items())])
    lines += _family("vmsched_runs_given_up_total", "counter", "runs whose last attempt failed, by action",
                     [(f'{{action="{_escape(a)}"}}', v) for a, v in sorted(stats.given_up.items())])
    lines += _family("vmsched_last_success_timestamp_seconds", "gauge", "last successful run per VM",
                     [(f'{{vm="{vm}"}}', t) for vm, t in sorted(stats.last_success.items())])
    causes: Counter[tuple[str, str]] = Counter()
    for image in state.pools.get("image", {}).values():
        cause = image.template.get(NEW_CHAIN_CAUSE)
        if cause and image.vms:
            causes[str(image.vms[0]), cause] += 1
    lines += _family("vmsched_backup_chains_restarted", "gauge",
                     "chain images kept whose chain started because the one before could not go on, by VM and cause",
                     [(f'{{vm="{vm}",cause="{_escape(c)}"}}', n) for (vm, c), n in sorted(causes.items())])
    lines += ["# HELP vmsched_dispatch_lateness_seconds start of a first attempt minus its due time",
              "# TYPE vmsched_dispatch_lateness_seconds histogram"]
    lines += stats.lateness_histogram.lines("vmsched_dispatch_lateness_seconds")
    lines += progress_lines(board)
    return "\n".join(lines) + "\n"
