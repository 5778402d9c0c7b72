"""Backups into a restic datastore through vmsched against restic run by hand: full, second full, restore.

Run: .venv/bin/python -m benchmarks.bench_restic [--data-gib 1] [--disk-gib 4] [--rounds 3]

bench_backup's disk (``--data-gib`` of random extents in a ``--disk-gib`` qcow2, plus the tiny raw vdb) on a
live TCG domain on host1; two restic repositories on the backup server (SFTP, same password and compression,
initialised once, not timed): the VM's in vmsched's restic datastore and one used by hand. Each round (the
order of the two rotated, medians reported): vmsched ``one.vm.backup`` (request -> done) twice, the second
of the unchanged disk, then ``one.image.restore`` of disk 0 to host1 (request -> READY); by hand on host1:
``virsh snapshot-create-as --disk-only``, ``qemu-img convert -O qcow2`` of both disks, ``restic backup
--force`` over ssh ``-c aes128-gcm@openssh.com`` while ``openssl dgst -sha256`` hashes the copies, ``virsh
blockcommit``, twice; then ``restic dump`` of disk 0 into a file, bare and followed by ``openssl dgst``.
Bytes added: restic's ``data_added`` (deduplicated, before compression: the daemon's log, the ``--json``
summary by hand) and the growth of the repository on the server (``du -sb``). Each round ends by forgetting
and pruning its snapshots (not timed), so that each round's first backup uploads everything again.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from statistics import median_low
from typing import Any

import libvirt
from lxml import etree

from benchmarks import bench_backup as bb
from benchmarks.bench_backup import Timed, backup_ids
from tests.realenv import realenv as realenv_cli
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.test_import_real import Api

COMMAND = ".venv/bin/python -m benchmarks.bench_restic"
RUNS = ("vmsched", "restic")
COMPRESSION = "auto"
READY = "1"
_ADDED = re.compile(r"VM (\d+) backup \S+ is snapshot \w+ \((\d+) bytes processed, (\d+) added\)")


def summary_of(stdout: str) -> dict[str, Any]:
    """The summary message of ``restic backup --json`` (pure)."""
    for line in reversed(stdout.splitlines()):
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("message_type") == "summary":
            return message
    raise RuntimeError(f"restic backup printed no summary: {stdout[-300:]!r}")


def logged_added(log: str, vm_id: int) -> list[int]:
    """``data_added`` of each of the VM's restic snapshots, oldest first, as the daemon logs them (pure)."""
    return [int(m.group(3)) for m in _ADDED.finditer(log) if int(m.group(1)) == vm_id]


def on(env: RealEnv, target: str, script: str, timed: Timed | None = None, name: str = "", stdin: str = "") -> str:
    """``sh -c script`` on ``target``; with ``timed``, its wall time goes into ``timed.steps[name]``."""
    argv = env.ssh_argv(target, ["sh", "-c", script])
    if stdin:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{script}: exited with {done.returncode}: {done.stderr.strip()}")
        return done.stdout
    return bb.run_timed(argv, timed if timed is not None else Timed(), name or "untimed")


def du(env: RealEnv, path: str) -> int:
    return int(on(env, "backup", f"du -sb -- {shlex.quote(path)}").split()[0])


class Hand:
    """restic by hand: backups and dumps run on host1 against the SFTP server, upkeep on the server."""

    def __init__(self, env: RealEnv, dom: TinyDomain, staging: str, repo: str, password: str) -> None:
        q = shlex.quote
        self.env, self.dom, self.staging, self.repo = env, dom, f"{staging}/hand", repo
        self.pw_host1, self.pw_server = f"{staging}/hand.pw", f"{Path(repo).parent}/hand.pw"
        on(env, "host1", f"umask 077 && mkdir -p {q(self.staging)} && cat > {q(self.pw_host1)}", stdin=password)
        on(env, "backup", f"umask 077 && mkdir -p {q(str(Path(repo).parent))} && cat > {q(self.pw_server)}",
           stdin=password)
        ssh = f"{env.ssh.wrapper} -c {bb.GCM} {env.backup.name} -s sftp"
        self.restic = (f"RESTIC_PASSWORD_FILE={q(self.pw_host1)} restic -r "
                       f"{q(f'sftp:{env.backup.user}@{env.backup.address}:{repo}')} -o {q(f'sftp.command={ssh}')} "
                       f"--compression {COMPRESSION}")
        self.digest = ""  # sha256 of disk 0 as the last backup hashed it

    def server(self, repo: str, args: str) -> str:
        return on(self.env, "backup", f"RESTIC_PASSWORD_FILE={shlex.quote(self.pw_server)} restic -q -r "
                                      f"{shlex.quote(repo)} {args}")

    def backup(self) -> tuple[Timed, dict[str, Any]]:
        timed, dom, q = Timed(), self.dom, shlex.quote
        overlays = {d: f"{dom.directory}/{d}.hand-overlay.qcow2" for d in bb.DISKS}
        bases = {"vda": str(dom.vda), "vdb": str(dom.vdb)}
        copies = [f"{self.staging}/disk.{i}.0" for i in range(len(bb.DISKS))]
        files, sums = " ".join(q(c) for c in copies), q(f"{self.staging}/sums")
        start = time.monotonic()
        specs = " ".join(f"--diskspec {d},file={q(o)}" for d, o in overlays.items())
        on(self.env, "host1", f"virsh -q snapshot-create-as {q(dom.name)} --disk-only --atomic --no-metadata "
                              f"{specs}", timed, "snapshot")
        on(self.env, "host1", " && ".join(f"qemu-img convert -U -O qcow2 {q(bases[d])} {q(c)}"
                                          for d, c in zip(bb.DISKS, copies, strict=True)), timed, "convert")
        out = on(self.env, "host1", f"openssl dgst -sha256 -r {files} > {sums} & {self.restic} backup --json "
                                    f"--force -- {files}; r=$?; wait $! && exit $r", timed, "restic+openssl")
        on(self.env, "host1", " && ".join(f"virsh -q blockcommit {q(dom.name)} {d} --active --pivot --shallow"
                                          for d in bb.DISKS), timed, "blockcommit")
        timed.total = time.monotonic() - start
        self.digest = on(self.env, "host1", f"cat {sums}").split()[0]
        on(self.env, "host1", f"rm -f -- {files} {sums} " + " ".join(q(o) for o in overlays.values()))
        return timed, summary_of(out)

    def dump(self, snapshot: str, target: str, verify: bool) -> Timed:
        timed, q = Timed(), shlex.quote
        script = f"{self.restic} dump --no-lock {q(snapshot)} {q(f'{self.staging}/disk.0.0')} > {q(target)}"
        start = time.monotonic()
        out = on(self.env, "host1", script + (f" && openssl dgst -sha256 -r {q(target)}" if verify else ""),
                 timed, "dump")
        timed.total = time.monotonic() - start
        if verify and out.split()[0] != self.digest:
            raise RuntimeError(f"restic dump wrote {out.split()[0]}, the backup hashed {self.digest}")
        on(self.env, "host1", f"rm -f -- {q(target)}")
        return timed


def vmsched_round(api: Api, env: RealEnv, vm_id: int, ds_id: int, image_ds: int, repo: str,
                  times: dict[str, list[Timed]], sizes: dict[str, list[int]]) -> None:
    for kind in ("full", "second"):
        before, count, logged = du(env, repo), len(backup_ids(api, vm_id)), len(logged_added(api.daemon.log(), vm_id))
        times[f"vmsched {kind}"].append(bb.vmsched_backup(api, vm_id, ds_id))
        if len(backup_ids(api, vm_id)) != count + 1:
            raise RuntimeError(f"the {kind} backup recorded no new image")
        sizes[f"vmsched {kind} du"].append(du(env, repo) - before)
        added = logged_added(api.daemon.log(), vm_id)[logged:]  # -1: the daemon logged no figure
        sizes[f"vmsched {kind} data_added"].append(added[0] if len(added) == 1 else -1)
    timed, start = Timed(), time.monotonic()
    _, image_id = map(int, str(api.call("one.image.restore", int(backup_ids(api, vm_id)[-1]), image_ds,
                                        "DISK_ID = 0")).split())
    while (state := etree.fromstring(str(api.call("one.image.info", image_id)).encode()).findtext("STATE")) != READY:
        if time.monotonic() - start > 300:
            raise RuntimeError(f"restored image {image_id} still in state {state}")
        time.sleep(0.05)
    timed.total = time.monotonic() - start
    times["vmsched restore"].append(timed)
    for image in [image_id, *(int(i) for i in backup_ids(api, vm_id))]:  # the backups: forget --prune
        api.call("one.image.delete", image, False)


def hand_round(hand: Hand, target: str, times: dict[str, list[Timed]], sizes: dict[str, list[int]]) -> None:
    snapshots = []
    for kind in ("full", "second"):
        before = du(hand.env, hand.repo)
        timed, summary = hand.backup()
        times[f"restic {kind}"].append(timed)
        sizes[f"restic {kind} du"].append(du(hand.env, hand.repo) - before)
        sizes[f"restic {kind} data_added"].append(int(summary.get("data_added") or 0))
        snapshots.append(str(summary["snapshot_id"]))
    times["restic restore"].append(hand.dump(snapshots[-1], target, verify=False))
    times["restic restore+verify"].append(hand.dump(snapshots[-1], target, verify=True))
    hand.server(hand.repo, f"forget --prune --max-unused 0 {' '.join(snapshots)}")


def measure(data_gib: float, disk_gib: float, rounds: int) -> tuple[dict[str, list[Timed]], dict[str, list[int]]]:
    libvirt.registerErrorHandler(lambda *_: None, None)
    env = realenv_cli.up()
    marker = f"vmsched-benchrestic-{secrets.token_hex(4)}"
    staging, remote, images = f"/var/tmp/{marker}", str(env.backup.data_dir / marker), f"/var/tmp/{marker}-images"
    password = secrets.token_hex(16)
    work = Path(tempfile.mkdtemp(prefix=f"{marker}-"))
    host1 = Hypervisor(env.host("host1"))
    dom = host1.define(work / "domains")
    times: dict[str, list[Timed]] = defaultdict(list)
    sizes: dict[str, list[int]] = defaultdict(list)
    caches: list[str] = []
    try:
        print(f"writing {data_gib:g} GiB of random extents into a {disk_gib:g} GiB qcow2 ...", file=sys.stderr)
        bb.make_vda(dom.vda, data_gib, disk_gib)
        host1.start(dom)
        with bb.daemon(env, work / "state", staging) as api:
            vm_id = api.import_one("host1", dom.name)
            b = env.backup
            ds_id = int(api.call(  # type: ignore[call-overload]
                "one.datastore.allocate",
                f'NAME = "benchrestic"\nTYPE = "BACKUP_DS"\nDS_MAD = "restic"\nBASE_PATH = "{remote}/vmsched"\n'
                f'RESTIC_SFTP_SERVER = "{b.address}"\nRESTIC_SFTP_USER = "{b.user}"\n'
                f'RESTIC_SFTP_PORT = "{b.ssh_port}"\nRESTIC_PASSWORD = "{password}"\n'
                f'RESTIC_COMPRESSION = "{COMPRESSION}"', -1))
            image_ds = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                                    f'NAME = "benchimgs"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\n'
                                    f'BRIDGE_LIST = "host1"\nBASE_PATH = "{images}"', -1))
            hand = Hand(env, dom, staging, f"{remote}/hand", password)
            ours = f"{remote}/vmsched/{vm_id}"
            for repo in (hand.repo, ours):
                hand.server(repo, "init")
                caches.append(json.loads(hand.server(repo, "cat config"))["id"])  # restic's cache on host1
            on(env, "host1", f"mkdir -p -- {shlex.quote(images)}")
            for round_no in range(rounds):
                for name in bb.rotated(RUNS, round_no):
                    print(f"round {round_no + 1}: {name} ...", file=sys.stderr, flush=True)
                    if name == "vmsched":
                        vmsched_round(api, env, vm_id, ds_id, image_ds, ours, times, sizes)
                    else:
                        hand_round(hand, f"{images}/by-hand.qcow2", times, sizes)
    finally:
        host1.remove(dom)
        host1.close()
        for target, path in (("host1", staging), ("host1", images), ("backup", remote)):
            subprocess.run(env.ssh_argv(target, ["rm", "-rf", "--", path]), timeout=60, check=False)
        for cache in caches:
            subprocess.run(env.ssh_argv("host1", ["sh", "-c", f'rm -rf -- "$HOME/.cache/restic/{cache}"']),
                           timeout=60, check=False)
        shutil.rmtree(work, ignore_errors=True)
    return dict(times), dict(sizes)


def size(n: int) -> str:
    return "n/a" if n < 0 else f"{n / (1 << 20):.2f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def report(data_gib: float, disk_gib: float, rounds: int, times: dict[str, list[Timed]],
           sizes: dict[str, list[int]]) -> str:
    t = {name: bb.median_run(runs) for name, runs in times.items()}
    s = {name: median_low(values) for name, values in sizes.items()}

    def steps(name: str) -> str:
        return f"  ({', '.join(f'{k} {v:.2f}' for k, v in t[name].steps.items())})" if t[name].steps else ""

    def ratio(a: str, b: str) -> str:
        return f"{t[a].total / t[b].total:.2f}"

    lines = [f"restic datastore: a {disk_gib:g} GiB qcow2 holding {data_gib:g} GiB (+ a 32 MiB raw vdb) on host1 -> "
             f"backup server over SFTP, compression {COMPRESSION}; medians of {rounds} rotated round(s):"]
    for kind, title in (("full", "full backup"), ("second", "second full backup, unchanged disk")):
        lines += [f"  {title:35} {run:7} {t[f'{run} {kind}'].total:6.2f} s  data_added "
                  f"{size(s[f'{run} {kind} data_added']):>11}  repo growth (du) {size(s[f'{run} {kind} du']):>11}"
                  f"{steps(f'{run} {kind}')}" for run in RUNS]
    lines += [f"  restore disk 0: vmsched one.image.restore (request -> READY)  {t['vmsched restore'].total:6.2f} s",
              f"  restore disk 0: restic dump > file                           {t['restic restore'].total:6.2f} s",
              f"  restore disk 0: restic dump > file; openssl dgst -sha256     "
              f"{t['restic restore+verify'].total:6.2f} s",
              f"  vmsched / by hand: full {ratio('vmsched full', 'restic full')}, second "
              f"{ratio('vmsched second', 'restic second')}, restore {ratio('vmsched restore', 'restic restore')}, "
              f"restore / restore+verify {ratio('vmsched restore', 'restic restore+verify')}"]
    for r in range(rounds):
        for run in RUNS:
            lines.append(f"  round {r + 1} {run:7}: " + ", ".join(
                f"{kind} {times[f'{run} {kind}'][r].total:.2f} s (+{size(sizes[f'{run} {kind} data_added'][r])}, "
                f"du +{size(sizes[f'{run} {kind} du'][r])})" for kind in ("full", "second"))
                + ", " + ", ".join(f"{name.split()[1]} {runs[r].total:.2f} s" for name, runs in times.items()
                                   if name.startswith(f"{run} restore")))
    lines.append(f"reproduce: {COMMAND} --data-gib {data_gib:g} --disk-gib {disk_gib:g} --rounds {rounds}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--data-gib", type=float, default=1.0, help="data written into the disk (GiB)")
    parser.add_argument("--disk-gib", type=float, default=4.0, help="virtual size of the disk (GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, order rotated, medians reported")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    start = time.monotonic()
    times, sizes = measure(args.data_gib, args.disk_gib, args.rounds)
    print(report(args.data_gib, args.disk_gib, args.rounds, times, sizes))
    print(f"(benchmark wall time {time.monotonic() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
