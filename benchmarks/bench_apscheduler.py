"""The same load through APScheduler 3.11, for comparison with `vmsched bench scheduler --clock real`.

    .venv/bin/python -m benchmarks.bench_apscheduler [--jobs 100000] [--spread 10] [--json]

100,000 one-shot jobs (AsyncIOScheduler, in-memory job store: no persistence) due uniformly over
--spread seconds after set-up, each doing nothing. Reports dispatch lateness (run start minus due time),
CPU seconds for set-up (adding the jobs) and dispatch, and peak RSS, exactly like vmsched's report.
Then runs `vmsched bench scheduler` on the same load in a child process (every dispatch persisted), so
both figures come from the same run on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

COMMAND = ".venv/bin/python -m benchmarks.bench_apscheduler"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _apscheduler(jobs: int, spread: float, seed: int) -> dict:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    cpu0 = time.process_time()
    rng = random.Random(seed)
    lateness: list[float] = []
    finished = asyncio.Event()

    def job(due: float) -> None:
        lateness.append(max(0.0, time.time() - due))
        if len(lateness) >= jobs:
            finished.set()

    scheduler = AsyncIOScheduler(job_defaults={"misfire_grace_time": None, "coalesce": False})
    scheduler.start()
    start = time.time() + 1.0 + jobs / 20_000  # due only after adding them has finished
    for _ in range(jobs):
        due = start + rng.uniform(0, spread)
        scheduler.add_job(job, "date", run_date=datetime.fromtimestamp(due, UTC), args=[due])
    gc.collect()
    setup_cpu = time.process_time() - cpu0
    if time.time() > start:
        raise RuntimeError("set-up took longer than the margin before the first job")
    await asyncio.wait_for(finished.wait(), timeout=spread + 120)
    scheduler.shutdown(wait=False)
    cpu = time.process_time() - cpu0
    return {
        "jobs": jobs,
        "dispatch_lateness_p50_ms": round(statistics.median(lateness) * 1000, 3),
        "dispatch_lateness_p99_ms": round(_percentile(lateness, 0.99) * 1000, 3),
        "dispatch_lateness_max_ms": round(max(lateness) * 1000, 3),
        "cpu_s": round(cpu, 3),
        "setup_cpu_s": round(setup_cpu, 3),
        "dispatch_cpu_s": round(cpu - setup_cpu, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "persistence": "none (MemoryJobStore)",
    }


def _vmsched(jobs: int, spread: float, seed: int, state_dir: str | None) -> dict:
    argv = [sys.executable, "-m", "scheduler", "bench", "scheduler", "--clock", "real", "--vms", str(jobs),
            "--spread", str(spread), "--duration-dist", "const:0", "--max-backups", "0", "--max-backups-host",
            "0", "--hosts", "50", "--seed", str(seed), "--json"]
    if state_dir:
        argv += ["--state-dir", state_dir]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=spread + 300)
    report = json.loads(done.stdout)
    keep = ("dispatch_lateness_p50_ms", "dispatch_lateness_p99_ms", "dispatch_lateness_max_ms", "cpu_s",
            "setup_cpu_s", "dispatch_cpu_s", "peak_rss_mb", "state_file_dir")
    return {"jobs": jobs, **{k: report[k] for k in keep}, "persistence": "every dispatch journaled (SQLite, WAL)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--spread", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--state-dir", default=None, help="vmsched's state file directory (default: /dev/shm)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {
        "command": f"{COMMAND} --jobs {args.jobs} --spread {args.spread}",
        "apscheduler_3_11": asyncio.run(_apscheduler(args.jobs, args.spread, args.seed)),
        "vmsched": _vmsched(args.jobs, args.spread, args.seed, args.state_dir),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("apscheduler_3_11", "vmsched"):
            r = result[name]
            print(f"{name:17} p99 lateness {r['dispatch_lateness_p99_ms']:8.2f} ms  cpu {r['cpu_s']:6.2f} s "
                  f"(set-up {r['setup_cpu_s']:.2f}, dispatch {r['dispatch_cpu_s']:.2f})  rss {r['peak_rss_mb']} MB"
                  f"  [{r['persistence']}]")
        print(f"reproduce: {result['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
