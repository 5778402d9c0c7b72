"""20 live backups queued at once on 4 hosts under MAX_BACKUPS=4, MAX_BACKUPS_HOST=1, against the best
wall time those limits allow.

Run: .venv/bin/python -m benchmarks.bench_fleet [--hosts 4] [--per-host 5] [--min-mib 64] [--max-mib 320]
     [--seed 1] [--max-backups 4] [--max-backups-host 1] [--no-solo] [--realenv-dir DIR] [--log FILE]
     [--json]

A real environment with ``--hosts`` hosts is brought up in its own directory (default
``/tmp/vmsched-bench-fleet``, so the test suite's environment is not touched) and taken down again at the
end if this run brought it up. Each host gets ``--per-host`` TCG domains with no OS whose ``vda`` qcow2
holds a few hundred MiB of random bytes (sizes drawn, in 64 MiB steps, between ``--min-mib`` and
``--max-mib`` with ``--seed``). One daemon with the limits in its sched.conf knows every host and backs
up into an ``rsync`` datastore on the backup server.

1. Solo (skipped with ``--no-solo``): each VM is backed up alone, one after the other, to learn how long
   its backup takes without competition.
2. Fleet: ``one.vm.backup`` is sent for every VM in a row; the wall time runs from the first request until
   the last of the new images is recorded (image pool polled every 100 ms).

Each run's own duration (started -> finished) and its host come from the daemon's run journal, read after
it stops. The best wall time possible under the limits is bounded below by
``max(sum of durations / MAX_BACKUPS, max over hosts of that host's sum / MAX_BACKUPS_HOST, longest run)``.
Two such bounds are printed: with the durations the runs had in the fleet (scheduling alone judged), and
with each VM's solo duration (the slowdown of running backups side by side also counted against the
result). The peak number of backups running at once, overall and per host, is taken from the journal's
start and finish times and every moment above a limit is listed. Everything made here is removed at the
end (domains and their disks, staging and backup files, the daemon).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import libvirt
from lxml import etree

from benchmarks.bench_backup import EXTENT_MIB, image_mb, make_vda, rsync_datastore, vmsched_backup
from tests.conftest import start_daemon
from tests.realenv import model
from tests.realenv import realenv as realenv_cli
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.test_import_real import Api

COMMAND = ".venv/bin/python -m benchmarks.bench_fleet"
DEFAULT_DIR = Path("/tmp/vmsched-bench-fleet")
DISK_GIB = 1.0  # virtual size of each vda
POLL = 0.1  # seconds between two looks at the image pool during the fleet
FLEET_WAIT = 300.0  # seconds: a fleet not recorded by then is a failure


# ---- pure: sizes, bounds, concurrency -----------------------------------------------------------------


def data_sizes(hosts: int, per_host: int, min_mib: int, max_mib: int, seed: int) -> list[list[int]]:
    """MiB of random data for each VM of each host: multiples of 64 MiB in [min_mib, max_mib] (pure)."""
    steps = list(range(-(-min_mib // EXTENT_MIB) * EXTENT_MIB, max_mib + 1, EXTENT_MIB))
    if not steps:
        raise ValueError(f"no multiple of {EXTENT_MIB} MiB between {min_mib} and {max_mib}")
    rng = random.Random(seed)
    return [[rng.choice(steps) for _ in range(per_host)] for _ in range(hosts)]


def lower_bound(durations: Mapping[str, Sequence[float]], max_total: int, max_host: int) -> float:
    """The shortest wall time in which runs of these durations (by host) can all finish when at most
    ``max_total`` run at once and at most ``max_host`` on one host (0: no limit) (pure)."""
    every = [d for runs in durations.values() for d in runs]
    if not every:
        return 0.0
    bound = max(every)
    if max_total:
        bound = max(bound, sum(every) / max_total)
    if max_host:
        bound = max(bound, *(sum(runs) / max_host for runs in durations.values()))
    return bound


@dataclass(frozen=True)
class Span:
    """One backup run as the journal tells it: its VM, host, and start and finish (epoch seconds)."""

    vm_id: int
    host: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def _events(spans: Sequence[Span]) -> list[tuple[float, int, Span]]:
    """Starts (+1) and finishes (-1) in time order; at one instant a finish comes before a start."""
    return sorted([(s.start, 1, s) for s in spans] + [(s.end, -1, s) for s in spans],
                  key=lambda e: (e[0], e[1]))


def peak_concurrency(spans: Sequence[Span]) -> tuple[int, dict[str, int]]:
    """The most runs open at once, overall and on each host (pure)."""
    total, peak = 0, 0
    per_host: dict[str, int] = defaultdict(int)
    host_peak: dict[str, int] = defaultdict(int)
    for _, step, span in _events(spans):
        total += step
        per_host[span.host] += step
        peak = max(peak, total)
        host_peak[span.host] = max(host_peak[span.host], per_host[span.host])
    return peak, dict(host_peak)


def violations(spans: Sequence[Span], max_total: int, max_host: int) -> list[str]:
    """Each start that made more runs open than a limit allows, with how long the excess lasted (pure)."""
    found: list[str] = []
    open_runs: list[Span] = []
    for when, step, span in _events(spans):
        if step < 0:
            open_runs.remove(span)
            continue
        open_runs.append(span)
        same_host = [s for s in open_runs if s.host == span.host]
        for limit, name, group in ((max_total, "MAX_BACKUPS", open_runs),
                                   (max_host, f"MAX_BACKUPS_HOST on {span.host}", same_host)):
            if limit and len(group) > limit:
                excess = min(s.end for s in group) - when
                found.append(f"VM {span.vm_id} started with {len(group)} open (> {name}={limit}) "
                             f"for {excess:.3f} s")
    return found


# ---- the environment -----------------------------------------------------------------------------------


def environment(directory: Path, hosts: int) -> tuple[RealEnv, str | None]:
    """The real environment in ``directory`` with at least ``hosts`` hosts, and how to undo what was done
    here: None when it was already running, else "down", or "purge" when the directory did not exist."""
    previous = model.load(directory)
    undo: str | None = "purge" if not directory.exists() else "down"
    if previous is not None and realenv_cli.status_lines(previous)[1]:
        undo = None
    env = realenv_cli.up(directory, hosts=max(hosts, len(previous.hosts) if previous else 0))
    return env, undo


Domains = dict[str, list[tuple[TinyDomain, int]]]  # by host name: each domain and the MiB of data in its disk


@dataclass(frozen=True)
class Vm:
    vm_id: int
    host: str
    domain: TinyDomain
    data_mib: int


def make_domains(env: RealEnv, work: Path, sizes: list[list[int]], domains: Domains) -> None:
    """Define, fill and start the domains, recorded in ``domains`` as each is defined (for the cleanup);
    the disks' data is written two at a time."""
    for host, host_sizes in zip(env.hosts, sizes, strict=False):
        hypervisor = Hypervisor(host)
        try:
            for mib in host_sizes:
                domains.setdefault(host.name, []).append((hypervisor.define(work / host.name), mib))
        finally:
            hypervisor.close()
    every = [(dom, mib) for doms in domains.values() for dom, mib in doms]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for done in [pool.submit(make_vda, dom.vda, mib / 1024, DISK_GIB) for dom, mib in every]:
            done.result()
    for host_name, doms in domains.items():
        hypervisor = Hypervisor(env.host(host_name))
        try:
            for dom, _ in doms:
                hypervisor.start(dom)
        finally:
            hypervisor.close()


def remove_domains(env: RealEnv, domains: Domains) -> None:
    for host_name, doms in domains.items():
        hypervisor = Hypervisor(env.host(host_name))
        try:
            for dom, _ in doms:
                hypervisor.remove(dom)
        finally:
            hypervisor.close()


# ---- the daemon ----------------------------------------------------------------------------------------


def sched_conf(env: RealEnv, staging: str, max_backups: int, max_backups_host: int) -> str:
    return (f'LISTEN = [ ADDRESS = "127.0.0.1", PORT = "0" ]\nBACKUP_BASE_PATH = "{staging}"\n'
            f"MAX_BACKUPS = {max_backups}\nMAX_BACKUPS_HOST = {max_backups_host}\n"
            'RETRY = [ MAX = "0", BACKOFF = "60" ]\n'  # a failure ends the benchmark, not a 60 s wait
            f'SSH = [ KNOWN_HOSTS = "{env.ssh.known_hosts}", KEY = "{env.ssh.client_key}" ]\n')


@contextlib.contextmanager
def daemon(env: RealEnv, state: Path, conf: str) -> Iterator[Api]:
    """A daemon knowing every host of ``env``; stopped (and its exit checked) on leaving."""
    state.mkdir(parents=True)
    (state / "sched.conf").write_text(conf)
    running = start_daemon(state)
    api = Api(running, {})
    try:
        for host in env.hosts:
            host_id = int(api.call("one.host.allocate", host.name, "kvm", "kvm", -1))  # type: ignore[call-overload]
            api.call("one.host.update", host_id, f'SSH_HOST = "{host.address}"\nSSH_PORT = "{host.ssh_port}"\n'
                     f'SSH_USER = "{host.user}"', 1)
            api.hosts[host.name] = host_id
        yield api
    finally:
        code = running.stop()
        if code != 0 or "Traceback" in running.log():
            print(f"the daemon exited with {code}; its log ends:\n{running.log()[-4000:]}", file=sys.stderr)


def import_vms(api: Api, domains: Domains) -> list[Vm]:
    """The imported VMs in request order: the first VM of every host, then the second of every host..."""
    per_host = []
    for host_name, doms in domains.items():
        results = api.import_domains(host_name, [dom.name for dom, _ in doms])
        vms = []
        for (dom, mib), result in zip(doms, results, strict=True):
            if result["STATUS"] not in ("created", "updated"):
                raise RuntimeError(f"import of {dom.name} on {host_name}: {result}")
            vms.append(Vm(int(result["ID"]), host_name, dom, mib))
        per_host.append(vms)
    return [vm for row in zip(*per_host, strict=True) for vm in row]


def image_ids(api: Api) -> set[int]:
    pool = etree.fromstring(str(api.call("one.imagepool.info", -2, -1, -1)).encode())
    return {int(i.text or "") for i in pool.iterfind("IMAGE/ID")}


def fleet(api: Api, vms: Sequence[Vm], ds_id: int) -> float:
    """Queue a backup of every VM at once; seconds from the first request to the last image recorded."""
    before = image_ids(api)
    log = api.daemon.log_file
    assert log is not None
    with open(log, "rb") as lines:
        lines.seek(0, 2)  # only what the daemon logs from now on is looked at
        start = time.monotonic()
        for vm in vms:
            api.call("one.vm.backup", vm.vm_id, ds_id, False)
        while len(image_ids(api) - before) < len(vms):
            if time.monotonic() - start > FLEET_WAIT:
                raise RuntimeError(f"{len(image_ids(api) - before)} of {len(vms)} images after {FLEET_WAIT} s")
            if b"failed, given up" in lines.read():
                raise RuntimeError(f"a backup failed:\n{api.daemon.log()[-4000:]}")
            time.sleep(POLL)
        return time.monotonic() - start


@dataclass(frozen=True)
class JournalRun:
    run_id: int
    vm_id: int
    host_id: int
    state: str
    queued: float
    start: float
    end: float


def journal_runs(db: Path) -> list[JournalRun]:
    """Every backup run in the daemon's journal, oldest first (read once the daemon has stopped)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT id, vm_id, host_id, state, queued_at, started_at, finished_at FROM runs "
                            "WHERE action = 'backup' ORDER BY id").fetchall()
    return [JournalRun(r[0], r[1], r[2], r[3], float(r[4]), float(r[5] or 0), float(r[6] or 0)) for r in rows]


# ---- the benchmark -------------------------------------------------------------------------------------


@dataclass
class Figures:
    hosts: int
    per_host: int
    max_backups: int
    max_backups_host: int
    data_mib: dict[str, list[int]]  # by host, in request order
    wall: float  # first request -> last image seen in the pool
    journal_wall: float  # first queued -> last finished, from the journal
    bound_fleet: float  # from the durations the runs had in the fleet
    bound_solo: float | None  # from each VM's duration alone
    fleet_seconds: dict[str, list[float]]  # by host, in request order
    solo_seconds: dict[str, list[float]] | None
    host_gaps: dict[str, float]  # longest wait between one run finishing and the next starting, by host
    peak: int
    peak_host: dict[str, int]
    violations: list[str]
    load: dict[str, float]  # 1-minute load average of this machine (2 cores here) as each phase began, and at the end
    command: str


def spans_by_vm(runs: Sequence[JournalRun], vms: Sequence[Vm], host_names: Mapping[int, str]) -> list[Span]:
    wanted = {vm.vm_id for vm in vms}
    bad = [r for r in runs if r.vm_id in wanted and r.state != "done"]
    if bad:
        raise RuntimeError(f"backup runs not done: {bad}")
    return [Span(r.vm_id, host_names[r.host_id], r.start, r.end) for r in runs if r.vm_id in wanted]


def by_host(vms: Sequence[Vm], seconds: Mapping[int, float]) -> dict[str, list[float]]:
    found: dict[str, list[float]] = defaultdict(list)
    for vm in vms:
        found[vm.host].append(round(seconds[vm.vm_id], 3))
    return dict(found)


def longest_gaps(spans: Sequence[Span]) -> dict[str, float]:
    """By host: the longest time between a run finishing and the host's next run starting (pure)."""
    gaps: dict[str, float] = {}
    for host in sorted({s.host for s in spans}):
        mine = sorted((s for s in spans if s.host == host), key=lambda s: s.start)
        gaps[host] = round(max((b.start - a.end for a, b in zip(mine, mine[1:], strict=False)), default=0.0), 3)
    return gaps


@dataclass
class Measured:
    vms: list[Vm]  # in request order
    wall: float
    runs: list[JournalRun]
    host_names: dict[int, str]
    load: dict[str, float]  # this machine's 1-minute load average at the start of each phase and at the end


def run_backups(env: RealEnv, work: Path, staging: str, remote: Path, domains: Domains, args: argparse.Namespace,
                say: Callable[[str], None]) -> Measured:
    state, load = work / "state", {}
    with daemon(env, state, sched_conf(env, staging, args.max_backups, args.max_backups_host)) as api:
        ds_id = rsync_datastore(api, env, remote, "fleetbk")
        vms = import_vms(api, domains)
        if args.solo:
            load["solo start"] = os.getloadavg()[0]
            for number, vm in enumerate(vms, 1):
                say(f"solo {number}/{len(vms)}: VM {vm.vm_id} on {vm.host}, {vm.data_mib} MiB ...")
                vmsched_backup(api, vm.vm_id, ds_id)
        say(f"fleet: {len(vms)} backups queued at once ...")
        load["fleet start"] = os.getloadavg()[0]
        wall = fleet(api, vms, ds_id)
        load["end"] = os.getloadavg()[0]
        small = [vm.vm_id for vm in vms if image_mb(api, vm.vm_id) < vm.data_mib]
        if small:
            raise RuntimeError(f"the newest backup images of VMs {small} hold less than the data written")
        host_names = {host_id: name for name, host_id in api.hosts.items()}
    if args.log is not None:
        shutil.copyfile(state / "daemon.log", args.log)
    return Measured(vms, wall, journal_runs(state / "vmsched.db"), host_names, load)


def figures(args: argparse.Namespace, m: Measured) -> Figures:
    count = len(m.vms)
    solo_runs, fleet_runs = m.runs[:-count] if args.solo else [], m.runs[-count:]
    fleet_spans = spans_by_vm(fleet_runs, m.vms, m.host_names)
    fleet_seconds = by_host(m.vms, {s.vm_id: s.seconds for s in fleet_spans})
    solo_seconds = None
    if args.solo:
        solo_seconds = by_host(m.vms, {s.vm_id: s.seconds for s in spans_by_vm(solo_runs, m.vms, m.host_names)})
    peak, peak_host = peak_concurrency(fleet_spans)
    limits = (args.max_backups, args.max_backups_host)
    data = defaultdict(list)
    for vm in m.vms:
        data[vm.host].append(vm.data_mib)
    return Figures(
        args.hosts, args.per_host, *limits, dict(data), round(m.wall, 3),
        round(max(r.end for r in fleet_runs) - min(r.queued for r in fleet_runs), 3),
        round(lower_bound(fleet_seconds, *limits), 3),
        None if solo_seconds is None else round(lower_bound(solo_seconds, *limits), 3),
        fleet_seconds, solo_seconds, longest_gaps(fleet_spans), peak, peak_host,
        violations(fleet_spans, *limits), m.load, reproduce(args))


def reproduce(args: argparse.Namespace) -> str:
    words = [COMMAND, "--hosts", str(args.hosts), "--per-host", str(args.per_host), "--min-mib", str(args.min_mib),
             "--max-mib", str(args.max_mib), "--seed", str(args.seed), "--max-backups", str(args.max_backups),
             "--max-backups-host", str(args.max_backups_host)]
    return " ".join(words + ([] if args.solo else ["--no-solo"]))


def measure(args: argparse.Namespace) -> Figures:
    def say(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr, flush=True)

    libvirt.registerErrorHandler(lambda *_: None, None)
    say(f"real environment in {args.realenv_dir} ...")
    env, undo = environment(args.realenv_dir, args.hosts)
    env = model.RealEnv(env.dir, env.ssh, env.hosts[:args.hosts], env.backup)
    marker = f"vmsched-fleet-{secrets.token_hex(4)}"
    staging, remote = f"/var/tmp/{marker}", env.backup.data_dir / marker
    work = Path(tempfile.mkdtemp(prefix=f"{marker}-"))
    domains: Domains = {}
    try:
        sizes = data_sizes(args.hosts, args.per_host, args.min_mib, args.max_mib, args.seed)
        say(f"writing {sum(map(sum, sizes))} MiB of random data into {args.hosts * args.per_host} disks ...")
        make_domains(env, work / "domains", sizes, domains)
        measured = run_backups(env, work, staging, remote, domains, args, say)
    finally:
        remove_domains(env, domains)
        for target, path in ((env.hosts[0].name, staging), ("backup", str(remote))):
            subprocess.run(env.ssh_argv(target, ["rm", "-rf", "--", path]), timeout=60, check=False)
        shutil.rmtree(work, ignore_errors=True)
        if undo == "purge":
            realenv_cli.purge(args.realenv_dir)
        elif undo == "down":
            realenv_cli.down(args.realenv_dir)
    return figures(args, measured)


def report(f: Figures) -> str:
    def ratio(bound: float | None) -> str:
        return "n/a" if not bound else f"{f.wall / bound:.2f}"

    lines = [
        f"{f.hosts * f.per_host} live backups queued at once, {f.per_host} VMs on each of {f.hosts} hosts, "
        f"MAX_BACKUPS={f.max_backups} MAX_BACKUPS_HOST={f.max_backups_host}, rsync datastore",
        f"  wall time (first request -> last image recorded)     {f.wall:7.2f} s   "
        f"(journal: first queued -> last finished {f.journal_wall:.2f} s)",
        f"  lower bound from the runs' fleet durations            {f.bound_fleet:7.2f} s   "
        f"wall / bound {ratio(f.bound_fleet)}",
    ]
    if f.bound_solo is not None:
        lines.append(f"  lower bound from each VM's duration alone             {f.bound_solo:7.2f} s   "
                     f"wall / bound {ratio(f.bound_solo)}")
    lines.append(f"  peak backups running at once: {f.peak} overall; per host "
                 + ", ".join(f"{h} {n}" for h, n in sorted(f.peak_host.items())))
    lines += [f"  LIMIT VIOLATED: {v}" for v in f.violations] or ["  no limit exceeded"]
    for host in sorted(f.fleet_seconds):
        fleet_sum = sum(f.fleet_seconds[host])
        solo = "" if f.solo_seconds is None else f"; alone {sum(f.solo_seconds[host]):6.2f} s"
        lines.append(f"  {host}: {' '.join(f'{m}' for m in f.data_mib[host])} MiB; fleet runs "
                     f"{fleet_sum:6.2f} s in all{solo}; longest idle gap between its runs {f.host_gaps[host]:.3f} s")
    lines.append("  load average (1 min) of this machine: "
                 + ", ".join(f"{phase} {value:.1f}" for phase, value in f.load.items())
                 + f" ({os.cpu_count()} CPUs)")
    lines.append(f"reproduce: {f.command}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--hosts", type=int, default=4, help="hypervisor hosts (default 4)")
    parser.add_argument("--per-host", type=int, default=5, help="VMs on each host (default 5)")
    parser.add_argument("--min-mib", type=int, default=64, help="least data in a VM's disk (MiB, default 64)")
    parser.add_argument("--max-mib", type=int, default=320, help="most data in a VM's disk (MiB, default 320)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the data sizes (default 1)")
    parser.add_argument("--max-backups", type=int, default=4, help="sched.conf MAX_BACKUPS (default 4)")
    parser.add_argument("--max-backups-host", type=int, default=1, help="sched.conf MAX_BACKUPS_HOST (default 1)")
    parser.add_argument("--no-solo", dest="solo", action="store_false",
                        help="skip backing each VM up alone first (no solo bound)")
    parser.add_argument("--realenv-dir", type=Path, default=DEFAULT_DIR,
                        help=f"directory of the real environment used (default {DEFAULT_DIR})")
    parser.add_argument("--log", type=Path, default=None, help="keep a copy of the daemon's log in this file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    figures_ = measure(args)
    print(json.dumps(asdict(figures_)) if args.json else report(figures_))
    return 0


if __name__ == "__main__":
    sys.exit(main())
