"""`vmsched bench scheduler`: the real engine, admission and store, with simulated backups.

Each simulated backup only waits for a duration drawn from the chosen distribution; everything else
(journal rows written before the run starts, group commits, admission, per-VM serialisation, the
scheduled actions' next times) is the production code. With ``--clock virtual`` the event loop's
clock jumps from event to event, so a week of backups takes seconds of wall time.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.engine.admission import Limits
from scheduler.engine.clock import Clock, SystemClock
from scheduler.engine.journal import Journal, Run
from scheduler.engine.loop import Engine, EngineSettings
from scheduler.engine.simclock import VirtualClock, VirtualTimeLoop
from scheduler.engine.sink import RunSink
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.host import Host
from scheduler.model.objects.states import DatastoreType, HostState
from scheduler.model.schedule import EndType, Repeat, SchedAction
from scheduler.store.codecs import build_codecs
from scheduler.store.sqlite import Row, Store
from scheduler.store.state import Codec, State

START_EPOCH = 1_767_225_600  # 2026-01-01 00:00 UTC, a Thursday
DAY = 86_400


@dataclass(frozen=True)
class BenchArgs:
    vms: int = 1000
    hosts: int = 10
    max_backups: int = 5
    max_backups_host: int = 2
    datastores: int = 1
    max_backups_datastore: int = 0
    duration_dist: str = "const:60"
    host_skew: str = "uniform"
    spread: float = 0.0
    clock: str = "virtual"
    seed: int = 1
    days: int = 0  # 0: one-shot runs due over --spread; N: a daily backup SCHED_ACTION per VM for N days
    state_dir: str | None = None  # None: a temporary directory, in /dev/shm when it exists


@dataclass
class SimVm:
    """Just what the engine reads of a VM: its id and its host."""

    id: int
    host_id: int
    host_name: str
    name: str = ""

    @property
    def host(self) -> tuple[int, str]:
        return (self.host_id, self.host_name)


def sampler(spec: str, rng: random.Random) -> Callable[[], float]:
    kind, _, params = spec.partition(":")
    try:
        numbers = [float(p) for p in params.split(",")] if params else []
        if kind == "const" and len(numbers) == 1:
            return lambda: numbers[0]
        if kind == "uniform" and len(numbers) == 2:
            return lambda: rng.uniform(numbers[0], numbers[1])
        if kind == "lognormal" and len(numbers) == 2:
            return lambda: rng.lognormvariate(numbers[0], numbers[1])
    except ValueError:
        pass
    raise ValueError(f"bad --duration-dist {spec!r}: use const:S, uniform:A,B or lognormal:MU,SIGMA")


def host_chooser(spec: str, hosts: int, rng: random.Random) -> Callable[[int], int]:
    if spec == "uniform":
        return lambda vm: vm % hosts
    kind, _, exponent = spec.partition(":")
    if kind == "zipf":
        try:
            s = float(exponent)
        except ValueError:
            raise ValueError(f"bad --host-skew {spec!r}: use uniform or zipf:S") from None
        weights = [1 / (k + 1) ** s for k in range(hosts)]
        order = list(range(hosts))
        return lambda vm: rng.choices(order, weights)[0]
    raise ValueError(f"bad --host-skew {spec!r}: use uniform or zipf:S")


@dataclass
class Recorder:
    durations: Callable[[], float]
    expected: int
    starts: dict[int, float] = field(default_factory=dict)
    finishes: dict[int, float] = field(default_factory=dict)
    work: list[tuple[float, float, int, int]] = field(default_factory=list)  # (due, duration, host, datastore)
    finished: asyncio.Event = field(default_factory=asyncio.Event)


def _memory_codecs() -> dict[str, Codec]:
    """VMs, hosts and datastores of the simulation live in memory; actions and runs are stored."""
    codecs = build_codecs()
    keep = {kind: codecs[kind] for kind in ("schedaction",) if kind in codecs}
    never = Codec("object", lambda obj: Row(obj.id, "", 0, 0, ""), lambda row: None)
    return {"vm": never, "host": never, "datastore": never, **keep}


async def _setup(state: State, args: BenchArgs, rng: random.Random) -> dict[int, SimVm]:
    choose = host_chooser(args.host_skew, args.hosts, rng)
    for h in range(args.hosts):
        state.pools["host"][h] = Host(id=h, name=f"kvm{h}", state=HostState.MONITORED)
    for d in range(args.datastores):
        state.pools["datastore"][100 + d] = Datastore(id=100 + d, name=f"backups{d}", type=DatastoreType.BACKUP_DS,
                                                      ds_mad="fs")
    vms = {}
    for vm_id in range(args.vms):
        host = choose(vm_id)
        vms[vm_id] = state.pools["vm"][vm_id] = SimVm(vm_id, host, f"kvm{host}")
    return vms


def _add_daily_actions(state: State, args: BenchArgs, start: float, rng: random.Random) -> None:
    for vm_id in range(args.vms):
        when = int(start + rng.uniform(0, args.spread))
        ds = 100 + vm_id % args.datastores
        action = SchedAction(
            id=vm_id, parent_id=vm_id, type="VM", action="backup", args=f"{ds},0", time=when,
            repeat=Repeat.WEEKLY, days="0,1,2,3,4,5,6", end_type=EndType.TIMES, end_value=args.days - 1,
            done=-1, message="", warning=0,
        )
        state.update_soon("schedaction", action)


async def simulate(args: BenchArgs, clock: Clock, workdir: Path,
                   on_store: Callable[[Store], None] = lambda store: None) -> dict[str, Any]:
    cpu0, wall0, thread0 = time.process_time(), time.perf_counter(), time.thread_time()
    rng = random.Random(args.seed)
    draw = sampler(args.duration_dist, rng)  # bad arguments fail before anything starts
    host_chooser(args.host_skew, max(args.hosts, 1), rng)
    if args.hosts < 1 or args.datastores < 1:
        raise ValueError("--hosts and --datastores must be at least 1")
    store = await Store.open(workdir / "bench.db")
    try:
        return await _simulate(args, clock, store, on_store, rng, draw, (cpu0, wall0, thread0))
    finally:
        await store.close()


async def _simulate(args: BenchArgs, clock: Clock, store: Store, on_store: Callable[[Store], None],
                    rng: random.Random, draw: Callable[[], float], started: tuple[float, float, float]
                    ) -> dict[str, Any]:
    cpu0, wall0, thread0 = started
    on_store(store)
    state = State(store, _memory_codecs())
    journal = Journal(state)
    vms = await _setup(state, args, rng)
    recorder = Recorder(draw, expected=args.vms * max(args.days, 1))
    if args.vms == 0:
        recorder.finished.set()

    async def executor(run: Run, sink: RunSink) -> str:
        recorder.starts[run.id] = clock.now()
        duration = draw()
        recorder.work.append((run.scheduled, duration, run.host_id, run.datastore_id))
        if duration > 0:
            await asyncio.sleep(duration)
        else:
            await asyncio.sleep(0)
        recorder.finishes[run.id] = clock.now()
        if len(recorder.finishes) >= recorder.expected:
            recorder.finished.set()
        return "simulated"

    settings = EngineSettings(
        limits=Limits(args.max_backups, args.max_backups_host, args.max_backups_datastore),
        retry_max=0, missed_runs="ONCE", timezone="UTC", drain_time=0,
    )
    engine = Engine(state, journal, clock, settings, executor, is_backup=lambda action: action == "backup")
    engine.stats.lateness = []
    start = clock.now() + 1.0  # the first action is due only after set-up has finished
    if args.days:
        if "schedaction" not in state.codecs:
            raise RuntimeError("scheduled actions cannot be stored yet: no schedaction codec")
        _add_daily_actions(state, args, start, rng)
        await state.durable()
    task = asyncio.create_task(engine.run())
    await engine.ready.wait()
    if not args.days:
        for vm_id in vms:
            engine.submit_at(start + rng.uniform(0, args.spread), vm_id, "backup", f"{100 + vm_id % args.datastores},0")
    gc.freeze()  # what set-up built lives on: keep it out of every later collection (as the daemon does)
    setup_cpu = time.process_time() - cpu0
    await recorder.finished.wait()
    await engine.stop(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await state.close()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    report = _report(args, engine, recorder, start, setup_cpu, cpu, wall)
    report["event_loop_cpu_s"] = round(time.thread_time() - thread0, 3)
    return report


def lower_bound(work: list[tuple[float, float, int, int]], start: float, limits: Limits) -> float:
    """No schedule can finish earlier: release + duration of each job, and total work per limited resource."""
    if not work:
        return 0.0
    bound = max(due + duration for due, duration, _, _ in work) - start
    if limits.max_backups:
        bound = max(bound, sum(d for _, d, _, _ in work) / limits.max_backups)
    for limit, index in ((limits.max_backups_host, 2), (limits.max_backups_datastore, 3)):
        if limit:
            per: dict[int, float] = defaultdict(float)
            for job in work:
                per[int(job[index])] += job[1]  # a host or datastore id
            bound = max(bound, max(per.values()) / limit)
    return bound


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _report(args: BenchArgs, engine: Engine, recorder: Recorder, start: float, setup_cpu: float, cpu: float,
            wall: float) -> dict[str, Any]:
    stats = engine.stats
    limits = engine.settings.limits
    lateness = stats.lateness or []
    return {
        "vms": args.vms,
        "hosts": args.hosts,
        "datastores": args.datastores,
        "days": args.days,
        "runs": len(recorder.finishes),
        "makespan_s": round(max(recorder.finishes.values()) - start, 3) if recorder.finishes else 0.0,
        "lower_bound_s": round(lower_bound(recorder.work, start, limits), 3),
        "max_running": stats.max_running,
        "max_running_per_host": stats.max_running_host,
        "max_running_per_datastore": stats.max_running_datastore,
        "limit_violations": stats.limit_violations,
        "dispatch_lateness_p50_ms": round(statistics.median(lateness) * 1000, 3) if lateness else 0.0,
        "dispatch_lateness_p99_ms": round(_percentile(lateness, 0.99) * 1000, 3),
        "dispatch_lateness_max_ms": round(max(lateness, default=0.0) * 1000, 3),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "setup_cpu_s": round(setup_cpu, 3),
        "dispatch_cpu_s": round(cpu - setup_cpu, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "clock": args.clock,
        "seed": args.seed,
    }


def run_benchmark(args: BenchArgs) -> dict[str, Any]:
    parent = args.state_dir or ("/dev/shm" if Path("/dev/shm").is_dir() else None)
    with tempfile.TemporaryDirectory(prefix="vmsched-sim-", dir=parent) as tmp:
        if args.clock == "virtual":
            stores: list[Store] = []
            loop = VirtualTimeLoop(busy=lambda: any(store.busy for store in stores))
            try:
                report = loop.run_until_complete(simulate(args, VirtualClock(loop, START_EPOCH), Path(tmp), stores.append))
            finally:
                loop.close()
        elif args.clock == "real":
            report = asyncio.run(simulate(args, SystemClock(), Path(tmp)))
        else:
            raise ValueError(f"bad --clock {args.clock!r}: use virtual or real")
    report["state_file_dir"] = parent or tempfile.gettempdir()
    return report


def print_report(report: dict[str, Any], as_json: bool, command: str) -> None:
    if as_json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key:28} {value}")
    print(f"reproduce: {command}")
