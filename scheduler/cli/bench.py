"""`vmsched bench scheduler`: the engine, admission and store under a simulated load (no daemon)."""

from __future__ import annotations

import argparse
import shlex
import sys

from scheduler.cli.client import UsageError
from scheduler.cli.context import Context


def bench_scheduler(ctx: Context, args: argparse.Namespace) -> int:
    from scheduler.engine.simulation import BenchArgs, print_report, run_benchmark  # start-up: +35 ms (-X importtime)

    try:
        report = run_benchmark(
            BenchArgs(
                vms=args.vms, hosts=args.hosts, max_backups=args.max_backups,
                max_backups_host=args.max_backups_host, datastores=args.datastores,
                max_backups_datastore=args.max_backups_datastore, duration_dist=args.duration_dist,
                host_skew=args.host_skew, spread=args.spread, clock=args.clock, seed=args.seed, days=args.days,
                state_dir=args.state_dir,
            )  # fmt: skip
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print_report(report, ctx.output == "json", "vmsched " + shlex.join(sys.argv[1:]))
    return 0


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
    return value


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("bench", help="benchmarks that need no daemon", parents=[common])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("scheduler", parents=[common],
                       help="run the real engine with simulated backups and report makespan, lateness, CPU")
    p.add_argument("--vms", type=_count, default=1000)
    p.add_argument("--hosts", type=_count, default=10)
    p.add_argument("--max-backups", type=_count, default=5, help="0 = unlimited")
    p.add_argument("--max-backups-host", type=_count, default=2, help="0 = unlimited")
    p.add_argument("--datastores", type=_count, default=1)
    p.add_argument("--max-backups-datastore", type=_count, default=0, help="0 = unlimited")
    p.add_argument("--duration-dist", default="const:60", help="const:S | uniform:A,B | lognormal:MU,SIGMA")
    p.add_argument("--host-skew", default="uniform", help="uniform | zipf:S")
    p.add_argument("--spread", type=float, default=0.0, help="due times spread uniformly over this many seconds")
    p.add_argument("--days", type=_count, default=0,
                   help="0: one-shot runs; N: a daily backup SCHED_ACTION per VM, for N days")
    p.add_argument("--clock", choices=("virtual", "real"), default="virtual")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--state-dir", default=None,
                   help="where the simulation's state file lives (default: a temporary directory in /dev/shm "
                        "when it exists, so the figure measures the engine rather than the disk)")
    p.set_defaults(handler=bench_scheduler)
