"""A live full backup through vmsched against the same steps run by hand with the real tools.

Run: .venv/bin/python -m benchmarks.bench_backup [--data-gib 1] [--disk-gib 4] [--order vmsched,naive,tuned] [--rounds 3]
     [--json]

The real environment is brought up (idempotent). On host1 a TCG domain with no OS gets a ``vda`` qcow2 of
``--disk-gib`` GiB holding ``--data-gib`` GiB of random bytes in 64 MiB extents spread over the disk (written
before the domain starts, so compression or deduplication cannot shorten anything), plus the tiny raw
``vdb`` every realenv domain has. Then, in one run:

* vmsched: a daemon backs the domain up into an ``rsync`` datastore on the backup server; the wall time runs
  from the ``one.vm.backup`` request to the image being recorded in the VM (API polled every 50 ms), and the
  daemon's own run time (started -> finished) is read from its journal afterwards;
* by hand, naive: ``virsh snapshot-create-as --disk-only --atomic --no-metadata``, ``qemu-img convert -O
  qcow2``, coreutils ``sha256sum``, ``rsync -aS`` over ssh with its default cipher, ``virsh blockcommit
  --active --pivot --shallow``;
* by hand, tuned: the same with ``openssl dgst -sha256`` running while ``rsync -aS -W`` sends the files over
  ssh with ``-c aes128-gcm@openssh.com``.

The hand-run commands run on host1 through the realenv ssh wrapper and upload from host1 to the backup
server, as the daemon's upload does; both disks are handled in each run. Each hand step is one new ssh
connection (about 0.2 s here, counted in its time); the daemon reuses pooled connections. The report also
lists the daemon's slow commands over ssh with their start and length, from its log, to show where its time
goes (its libvirt calls, snapshot and blockcommit, are the gaps). Everything made here is removed at
the end (domain, files, staging and backup directories, the daemon).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import libvirt
from lxml import etree

from tests.realenv import realenv as realenv_cli
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.test_import_real import Api, real_daemon

COMMAND = ".venv/bin/python -m benchmarks.bench_backup"
EXTENT_MIB = 64
POLL = 0.05  # seconds between two looks at the daemon's backup status
BACKUP_WAIT = 150.0  # seconds: a backup not finished by then is a failure
STEP_TIMEOUT = 120.0
FINISHED = ("done", "given_up", "failed", "cancelled", "interrupted")
SLOW_COMMAND = 0.15  # seconds: the daemon's commands listed one by one in the report
GCM = "aes128-gcm@openssh.com"
DISKS = ("vda", "vdb")
RUNS = ("vmsched", "naive", "tuned")


@dataclass
class Timed:
    """Wall time of a whole sequence and of each of its steps (seconds)."""

    total: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)


@dataclass
class Figures:
    data_gib: float
    disk_gib: float
    order: list[str]  # the three sequences, in the order they ran
    vmsched: Timed
    daemon_run: float | None
    daemon_commands: list[tuple[float, float, str]]  # (start, seconds, command) of its commands over ssh
    naive: Timed
    tuned: Timed
    ratio_vmsched_tuned: float
    command: str
    rounds: list[dict[str, float]] = field(default_factory=list)  # each round's totals


# ---- the disk ------------------------------------------------------------------------------------------


def extent_offsets(data_gib: float, disk_gib: float) -> list[int]:
    """Byte offsets of the 64 MiB extents: ``data_gib`` of data spread evenly over ``disk_gib`` (pure)."""
    count = max(1, round(data_gib * 1024 / EXTENT_MIB))
    stride = int(disk_gib * 1024 // count) // EXTENT_MIB * EXTENT_MIB
    if stride < EXTENT_MIB:
        raise SystemExit(f"{data_gib} GiB of data does not fit in a {disk_gib} GiB disk")
    return [i * stride << 20 for i in range(count)]


def make_vda(path: Path, data_gib: float, disk_gib: float) -> None:
    """A qcow2 of ``disk_gib`` holding random extents: written into a sparse raw file, then converted."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(int(disk_gib * (1 << 30)))
        for offset in extent_offsets(data_gib, disk_gib):
            f.seek(offset)
            f.write(os.urandom(EXTENT_MIB << 20))
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True,
                   timeout=STEP_TIMEOUT)
    raw.unlink()


# ---- running things ------------------------------------------------------------------------------------


def run_timed(argv: list[str], timed: Timed, name: str) -> str:
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    timed.steps[name] = timed.steps.get(name, 0.0) + time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"{name}: {shlex.join(argv)} exited with {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Hand:
    """The steps run by hand on host1 (``sh -c`` scripts through the realenv ssh wrapper)."""

    env: RealEnv
    dom: TinyDomain
    staging: str  # on host1
    remote: Path  # on the backup server
    min_bytes: int  # the copy of vda holds at least the data written

    def on(self, target: str, script: str, timed: Timed, name: str) -> str:
        return run_timed(self.env.ssh_argv(target, ["sh", "-c", script]), timed, name)

    def rsync_shell(self, cipher: str | None) -> str:
        words = [str(self.env.ssh.wrapper)] + (["-c", cipher] if cipher else [])
        return shlex.join(words)

    def run(self, kind: str) -> Timed:
        timed, dom, q = Timed(), self.dom, shlex.quote
        staging, remote = f"{self.staging}/{kind}", self.remote / kind
        overlays = {d: f"{dom.directory}/{d}.{kind}-overlay.qcow2" for d in DISKS}
        bases = {"vda": str(dom.vda), "vdb": str(dom.vdb)}
        copies = [f"{staging}/disk.{i}.0" for i in range(len(DISKS))]
        self.on("host1", f"mkdir -p {q(staging)}", Timed(), "mkdir")
        self.on("backup", f"mkdir -p {q(str(remote))}", Timed(), "mkdir")
        start = time.monotonic()
        specs = " ".join(f"--diskspec {d},file={q(o)}" for d, o in overlays.items())
        self.on("host1", f"virsh -q snapshot-create-as {q(dom.name)} --disk-only --atomic --no-metadata {specs}",
                timed, "snapshot")
        self.on("host1", " && ".join(f"qemu-img convert -U -O qcow2 {q(bases[d])} {q(c)}"
                                     for d, c in zip(DISKS, copies, strict=True)), timed, "convert")
        files = " ".join(q(c) for c in copies)
        target = q(f"{self.env.backup.name}:{remote}/")
        if kind == "naive":
            self.on("host1", f"sha256sum {files} > {q(staging)}/sums", timed, "sha256sum")
            self.on("host1", f"rsync -aS -e {q(self.rsync_shell(None))} {files} {target}", timed, "rsync")
        else:
            self.on("host1", f"openssl dgst -sha256 {files} > {q(staging)}/sums & "
                             f"rsync -aS -W -e {q(self.rsync_shell(GCM))} {files} {target}; r=$?; "
                             "wait $! && exit $r", timed, "openssl+rsync")
        self.on("host1", " && ".join(f"virsh -q blockcommit {q(dom.name)} {d} --active --pivot --shallow"
                                     for d in DISKS), timed, "blockcommit")
        timed.total = time.monotonic() - start
        sizes = "stat -c '%s' -- "
        sent = self.on("host1", sizes + files, Timed(), "stat").split()
        landed = self.on("backup", sizes + " ".join(q(f"{remote}/{Path(c).name}") for c in copies), Timed(),
                         "stat").split()
        if sent != landed or int(sent[0]) < self.min_bytes:
            raise RuntimeError(f"{kind}: sent {sent} bytes, the backup server holds {landed}")
        self.on("host1", f"rm -rf -- {q(staging)} " + " ".join(q(o) for o in overlays.values()), Timed(), "rm")
        return timed


# ---- vmsched -------------------------------------------------------------------------------------------


def backup_ids(api: Api, vm_id: int) -> list[str]:
    return [i.text or "" for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]


def vmsched_backup(api: Api, vm_id: int, ds_id: int) -> Timed:
    timed = Timed()
    start = time.monotonic()
    api.call("one.vm.backup", vm_id, ds_id, False)
    deadline = start + BACKUP_WAIT
    while True:
        status = api.call("vmsched.vm.backupstatus", vm_id)
        assert isinstance(status, dict)
        if status["STATE"] in FINISHED:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"backup still {status['STATE']} after {BACKUP_WAIT} s")
        time.sleep(POLL)
    if status["STATE"] != "done" or not backup_ids(api, vm_id):
        raise RuntimeError(f"backup ended {status['STATE']}: {status.get('MESSAGE')}\n{api.daemon.log()[-3000:]}")
    timed.total = time.monotonic() - start
    return timed


def image_mb(api: Api, vm_id: int) -> int:
    image = etree.fromstring(str(api.call("one.image.info", int(backup_ids(api, vm_id)[-1]))).encode())
    return int(image.findtext("SIZE") or "0")


def daemon_run_time(db: Path) -> float | None:
    """started -> finished of the daemon's newest backup run, from its journal."""
    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT started_at, finished_at FROM runs WHERE action = 'backup' "
                           "ORDER BY id DESC LIMIT 1").fetchone()
    if not row or row[0] is None or row[1] is None:
        return None
    return float(row[1]) - float(row[0])


_LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?\[conn=(\d+), chan=(\d+)\]\s+"
                       r"(Command: (?P<command>.*)|Received exit status)")
_QUIET = ("exec setsid -w sh -c 'echo \"$$\"; exec \"$@\"' sh ",)


def daemon_commands(log: str) -> list[tuple[float, float, str]]:
    """(start relative to the first, seconds, command) of each command a run of the daemon ran over ssh, from
    the start and exit lines of its log (pure). Its libvirt calls (snapshot, blockcommit) are not commands:
    they show as gaps."""
    started: dict[tuple[str, str], tuple[float, str]] = {}
    found: list[tuple[float, float, str]] = []
    for match in _LOG_LINE.finditer(log):
        stamp, conn, chan = match.group(1), match.group(2), match.group(3)
        when = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:]) / 1000
        if match.group("command") is not None:
            if " run=" not in match.group(0):
                continue  # not a backup run's command (monitoring, import)
            command = match.group("command")
            for prefix in _QUIET:
                command = command.removeprefix(prefix)
            started[conn, chan] = (when, command)
        elif (conn, chan) in started:
            begin, command = started.pop((conn, chan))
            found.append((begin, when - begin, command))
    first = min((begin for begin, _, _ in found), default=0.0)
    return [(round(begin - first, 3), round(seconds, 3), command) for begin, seconds, command in sorted(found)]


@contextlib.contextmanager
def daemon(env: RealEnv, state: Path, staging: str) -> Iterator[Api]:
    state.mkdir(parents=True)
    (state / "sched.conf").write_text(
        f'LISTEN = [ ADDRESS = "127.0.0.1", PORT = "0" ]\nBACKUP_BASE_PATH = "{staging}"\n'
        f'SSH = [ KNOWN_HOSTS = "{env.ssh.known_hosts}", KEY = "{env.ssh.client_key}" ]\n')
    apis = real_daemon(env, state)
    try:
        yield next(apis)
    finally:
        with contextlib.suppress(StopIteration):
            next(apis)  # stops the daemon (and checks its exit and log)


# ---- the benchmark -------------------------------------------------------------------------------------


def rsync_datastore(api: Api, env: RealEnv, base_path: Path, name: str = "benchbk") -> int:
    """An rsync backup datastore ``name`` with BASE_PATH ``base_path`` on the backup server; its id."""
    return int(api.call(  # type: ignore[call-overload]
        "one.datastore.allocate",
        f'NAME = "{name}"\nTYPE = "BACKUP_DS"\nDS_MAD = "rsync"\nBASE_PATH = "{base_path}"\n'
        f'RSYNC_HOST = "{env.backup.address}"\nRSYNC_USER = "{env.backup.user}"\n'
        f'RSYNC_PORT = "{env.backup.ssh_port}"', -1))


def vmsched_run(env: RealEnv, state: Path, staging: str, remote: Path, dom: TinyDomain, data_gib: float) -> Timed:
    """Import the domain into a fresh daemon and back it up into an rsync datastore; the daemon stops after."""
    with daemon(env, state, staging) as api:
        vm_id = api.import_one("host1", dom.name)
        timed = vmsched_backup(api, vm_id, rsync_datastore(api, env, remote / "vmsched"))
        if image_mb(api, vm_id) < data_gib * 1024:
            raise RuntimeError(f"the backup image holds {image_mb(api, vm_id)} MB, less than the data written")
    return timed


def rotated(order: Sequence[str], by: int) -> list[str]:
    """``order`` started ``by`` places later: each sequence runs first in some round (pure)."""
    return [order[(i + by) % len(order)] for i in range(len(order))]


def median_run(runs: list[Timed]) -> Timed:
    """The run whose total is the median (the lower middle one for an even count) (pure)."""
    return sorted(runs, key=lambda t: t.total)[(len(runs) - 1) // 2]


def measure(data_gib: float, disk_gib: float, order: Sequence[str], log: bool, rounds: int = 1) -> Figures:
    def say(text: str) -> None:
        if log:
            print(text, file=sys.stderr, flush=True)

    libvirt.registerErrorHandler(lambda *_: None, None)
    env = realenv_cli.up()
    marker = f"vmsched-bench-{secrets.token_hex(4)}"
    staging = f"/var/tmp/{marker}"
    remote = env.backup.data_dir / marker
    work = Path(tempfile.mkdtemp(prefix=f"{marker}-"))
    host1 = Hypervisor(env.host("host1"))
    dom: TinyDomain | None = None
    try:
        dom = host1.define(work / "domains")
        say(f"writing {data_gib:g} GiB of random extents into a {disk_gib:g} GiB qcow2 ...")
        make_vda(dom.vda, data_gib, disk_gib)
        host1.start(dom)
        hand = Hand(env, dom, staging, remote, int(data_gib * (1 << 30)))
        runs: dict[str, list[Timed]] = {name: [] for name in order}
        for round_no in range(rounds):
            for name in rotated(order, round_no):
                say(f"round {round_no + 1}: {name} ...")
                if name == "vmsched":
                    state = work / f"state{round_no}"
                    runs[name].append(vmsched_run(env, state, staging, remote, dom, data_gib))
                    daemon_run = daemon_run_time(state / "vmsched.db")
                    commands = daemon_commands((state / "daemon.log").read_text())
                else:
                    runs[name].append(hand.run(name))
            # what this round stored goes, so that the next round's rsync finds nothing to skip
            subprocess.run(env.ssh_argv("backup", ["rm", "-rf", "--", str(remote)]), timeout=60, check=True)
        timed = {name: median_run(done) for name, done in runs.items()}
    finally:
        if dom is not None:
            host1.remove(dom)
        host1.close()
        for target, path in (("host1", staging), ("backup", str(remote))):
            subprocess.run(env.ssh_argv(target, ["rm", "-rf", "--", path]), timeout=60, check=False)
        shutil.rmtree(work, ignore_errors=True)
    ours, tuned = timed["vmsched"], timed["tuned"]
    totals = [{name: round(runs[name][r].total, 2) for name in order} for r in range(rounds)]
    return Figures(data_gib, disk_gib, list(order), ours, daemon_run, commands, timed["naive"], tuned,
                   round(ours.total / tuned.total, 2),
                   f"{COMMAND} --data-gib {data_gib:g} --disk-gib {disk_gib:g} --order {','.join(order)} "
                   f"--rounds {rounds}", totals)


def report(f: Figures) -> str:
    def steps(t: Timed) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in t.steps.items())

    daemon_run = "n/a" if f.daemon_run is None else f"{f.daemon_run:.2f} s"
    slow = [f"    at {start:5.2f} s  {seconds:5.2f} s  {command[:110]}"
            for start, seconds, command in f.daemon_commands if seconds >= SLOW_COMMAND]
    quick = [seconds for _, seconds, _ in f.daemon_commands if seconds < SLOW_COMMAND]
    return "\n".join([
        f"live full backup of a {f.disk_gib:g} GiB qcow2 holding {f.data_gib:g} GiB (+ a 32 MiB raw vdb), "
        f"host1 -> backup server; {len(f.rounds)} round(s), the order rotated each round; medians:",
        f"  vmsched (request -> image recorded)   {f.vmsched.total:6.2f} s   (daemon run: {daemon_run})",
        f"  by hand, naive                        {f.naive.total:6.2f} s   ({steps(f.naive)})",
        f"  by hand, tuned                        {f.tuned.total:6.2f} s   ({steps(f.tuned)})",
        f"  vmsched / tuned                       {f.ratio_vmsched_tuned:6.2f}",
        *(f"  round {i + 1}: " + ", ".join(f"{name} {total:.2f} s" for name, total in r.items())
          for i, r in enumerate(f.rounds)),
        f"  the daemon's commands over ssh taking {SLOW_COMMAND:g} s or more:",
        *slow,
        f"    and {len(quick)} quicker ones, {sum(quick):.2f} s in all (some concurrent)",
        f"reproduce: {f.command}",
    ])


def run_order(text: str) -> tuple[str, ...]:
    order = tuple(word.strip() for word in text.split(","))
    if sorted(order) != sorted(RUNS):
        raise argparse.ArgumentTypeError(f"an order of {', '.join(RUNS)}, each once, separated by commas")
    return order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--data-gib", type=float, default=1.0, help="data written into the disk (GiB)")
    parser.add_argument("--disk-gib", type=float, default=4.0, help="virtual size of the disk (GiB)")
    parser.add_argument("--order", type=run_order, default=RUNS,
                        help=f"the order of the three sequences (default: {','.join(RUNS)})")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, each starting with another sequence (medians reported; default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    figures = measure(args.data_gib, args.disk_gib, args.order, log=not args.json, rounds=args.rounds)
    print(json.dumps(asdict(figures)) if args.json else report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
