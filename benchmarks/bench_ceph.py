"""Backups of a Ceph RBD disk through vmsched against the same steps run by hand, in one run.

Run: .venv/bin/python -m benchmarks.bench_ceph [--data-mib 1024] [--dirty-mib 16] [--write-kib 64] [--json]

The real environment and its single-node Ceph are brought up (idempotent). On host1 a TCG domain with no OS gets
an RBD ``vdc`` of twice ``--data-mib``, ``--data-mib`` of it written inside the guest (64 MiB writes of distinct
byte patterns through QEMU's own block layer); a daemon backs it up in MODE=INCREMENT into an ``rsync`` datastore
on the backup server. Then:

* vmsched's full base (request -> image recorded; the VM's two small qcow2 disks are in it too), timed;
* the full by hand on host1, the issue's way: ``rbd snap create``, ``rbd export`` of the snapshot to a file,
  ``qemu-img convert`` of it to qcow2, ``rsync -aS`` to the backup server (the same cipher vmsched's uploads use);
  and the direct way vmsched takes (``qemu-img convert rbd:…@snap`` then rsync);
* ``--dirty-mib`` MiB written in the guest in ``--write-kib`` KiB writes scattered over the data, between two
  snapshots of the benchmark's own taken with the guest idle, so that ``rbd export-diff`` between them is exactly
  what vmsched's increment 1 must hold;
* vmsched's increment 1, timed, and the bytes its RBD link takes on the backup server against the size of that
  ``rbd export-diff``; the same increment by hand (``rbd export-diff`` + rsync), timed.

Everything made here is removed at the end (domain, image and snapshots, files, staging and backup dirs, daemon).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import libvirt

from benchmarks.bench_backup import GCM, Timed, daemon, rsync_datastore, run_timed, vmsched_backup
from benchmarks.bench_increment import chain_sources
from tests.realenv import ceph as ceph_env
from tests.realenv import realenv as realenv_cli
from tests.realenv.ceph import CephCluster, guest_write
from tests.realenv.domains import Hypervisor
from tests.realenv.model import RealEnv

COMMAND = ".venv/bin/python -m benchmarks.bench_ceph"
MiB = 1 << 20
FILL_MIB = 64


@dataclass
class Figures:
    data_mib: int
    dirty_mib: int
    write_kib: int
    full_seconds: float
    hand_full_seconds: float  # snap create + rbd export + qemu-img convert + rsync
    hand_full_steps: dict[str, float]
    hand_direct_seconds: float  # snap create + qemu-img convert rbd: + rsync
    full_vs_hand: float
    full_vs_direct: float
    increment_seconds: float
    hand_increment_seconds: float  # rbd export-diff + rsync
    increment_vs_hand: float
    link_bytes: int  # the RBD disk's link on the backup server, allocated
    diff_bytes: int  # rbd export-diff between the same two states
    link_vs_diff: float
    command: str


def scattered(data_mib: int, dirty_mib: int, write_kib: int) -> list[int]:
    """Offsets of the writes that dirty ``dirty_mib`` in ``write_kib`` KiB pieces, spread evenly over the data,
    aligned to the write size (pure)."""
    count = max(1, dirty_mib * 1024 // write_kib)
    stride = (data_mib * MiB // count) // (write_kib * 1024) * (write_kib * 1024)
    return [i * stride for i in range(count)]


def hand_full(env: RealEnv, ceph: CephCluster, spec: str, staging: str, remote: Path, *, direct: bool) -> Timed:
    """The full by hand on host1: a snapshot, the copy to qcow2 (by ``rbd export`` + convert, or ``direct``ly),
    ``rsync -aS`` to the backup server; the snapshot removed after (untimed)."""
    q, timed = shlex.quote, Timed()
    rbd = shlex.join(ceph.argv("rbd"))
    snap = f"{spec}@hand"
    run_timed(env.ssh_argv("host1", ["sh", "-c", f"mkdir -p {q(staging)}"]), Timed(), "mkdir")
    run_timed(env.ssh_argv("host1", ["sh", "-c", f"{rbd} snap create --no-progress {q(snap)}"]), timed, "snap create")
    out = f"{staging}/hand.qcow2"
    if direct:
        name = f"rbd:{snap}:id={ceph.client}:conf={ceph.conf}"
        run_timed(env.ssh_argv("host1", ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", name, out]), timed,
                  "convert rbd:")
    else:
        raw = f"{staging}/hand.raw"
        run_timed(env.ssh_argv("host1", ["sh", "-c", f"{rbd} export --no-progress {q(snap)} {q(raw)}"]), timed,
                  "rbd export")
        run_timed(env.ssh_argv("host1", ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out]), timed,
                  "convert")
    upload(env, out, remote, timed)
    run_timed(env.ssh_argv("host1", ["sh", "-c", f"{rbd} snap rm --no-progress {q(snap)}; rm -f {q(staging)}/hand.*"]),
              Timed(), "cleanup")
    timed.total = sum(timed.steps.values())
    return timed


def upload(env: RealEnv, path: str, remote: Path, timed: Timed) -> None:
    q = shlex.quote
    shell = shlex.join([str(env.ssh.wrapper), "-c", GCM])
    run_timed(env.ssh_argv("backup", ["mkdir", "-p", str(remote / "hand")]), Timed(), "mkdir")
    run_timed(env.ssh_argv("host1", ["sh", "-c", f"rsync -aS -W -e {q(shell)} {q(path)} "
                                                 f"{q(f'{env.backup.name}:{remote}/hand/')}"]), timed, "rsync")


def measure(data_mib: int, dirty_mib: int, write_kib: int, log: bool) -> Figures:
    def say(text: str) -> None:
        if log:
            print(text, file=sys.stderr, flush=True)

    libvirt.registerErrorHandler(lambda *_: None, None)
    env = realenv_cli.up()
    ceph = ceph_env.up(env.dir / realenv_cli.CEPH_DIR)
    marker = f"vmsched-benchceph-{secrets.token_hex(4)}"
    staging, remote = f"/var/tmp/{marker}", env.backup.data_dir / marker
    work = Path(tempfile.mkdtemp(prefix=f"{marker}-"))
    host1 = Hypervisor(env.host("host1"))
    q = shlex.quote
    rbd = shlex.join(ceph.argv("rbd"))
    try:
        with ceph_env.rbd_domain(ceph, host1, work / "d", size=f"{2 * data_mib}M") as d:
            spec = f"{ceph.pool}/{d.image}"
            say(f"writing {data_mib} MiB into the RBD disk ...")
            for n in range(data_mib // FILL_MIB):
                guest_write(d.dom, "vdc", 0x10 + n, f"{n * FILL_MIB}M", f"{FILL_MIB}M")
            with daemon(env, work / "state", staging) as api:
                api.call("one.host.update", api.hosts["host1"], f'CEPH_CONF = "{ceph.conf}"', 1)
                vm_id = api.import_one("host1", d.name)
                api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ MODE = "INCREMENT" ]', 1)
                ds_id = rsync_datastore(api, env, remote / "vmsched")
                say("vmsched full base ...")
                full = vmsched_backup(api, vm_id, ds_id)
                say("the full by hand (rbd export + convert, and direct) ...")
                hand = hand_full(env, ceph, spec, staging, remote, direct=False)
                direct = hand_full(env, ceph, spec, staging, remote, direct=True)
                ceph.run("rbd", "snap", "create", "--no-progress", f"{spec}@bench-a")
                say(f"dirtying {dirty_mib} MiB in {write_kib} KiB writes ...")
                for n, offset in enumerate(scattered(data_mib, dirty_mib, write_kib)):
                    guest_write(d.dom, "vdc", 0x80 + n % 64, str(offset), f"{write_kib}k")
                ceph.run("rbd", "snap", "create", "--no-progress", f"{spec}@bench-b")
                say("vmsched increment 1 ...")
                increment = vmsched_backup(api, vm_id, ds_id)
                _, sources = chain_sources(api, vm_id)
                link = remote / "vmsched" / str(vm_id) / sources[-1] / "disk.2.1"
                link_bytes = link.stat().st_blocks * 512
                say("the same increment by hand (rbd export-diff + rsync) ...")
                hand_increment = Timed()
                diff = f"{staging}/hand.diff"
                run_timed(env.ssh_argv("host1", ["sh", "-c", f"{rbd} export-diff --no-progress --from-snap bench-a "
                                                             f"{q(spec + '@bench-b')} {q(diff)}"]), hand_increment,
                          "export-diff")
                upload(env, diff, remote, hand_increment)
                hand_increment.total = sum(hand_increment.steps.values())
                diff_bytes = (remote / "hand" / "hand.diff").stat().st_size
    finally:
        host1.close()
        for target, path in (("host1", staging), ("backup", str(remote))):
            subprocess.run(env.ssh_argv(target, ["rm", "-rf", "--", path]), timeout=60, check=False)
        shutil.rmtree(work, ignore_errors=True)
    return Figures(data_mib, dirty_mib, write_kib, round(full.total, 2), round(hand.total, 2),
                   {k: round(v, 2) for k, v in hand.steps.items()}, round(direct.total, 2),
                   round(full.total / hand.total, 2), round(full.total / direct.total, 2),
                   round(increment.total, 2), round(hand_increment.total, 2),
                   round(increment.total / hand_increment.total, 2), link_bytes, diff_bytes,
                   round(link_bytes / diff_bytes, 3),
                   f"{COMMAND} --data-mib {data_mib} --dirty-mib {dirty_mib} --write-kib {write_kib}")


def report(f: Figures) -> str:
    return "\n".join([
        f"an RBD disk holding {f.data_mib} MiB (plus two small qcow2 disks), host1 -> rsync datastore:",
        f"  vmsched full (request -> recorded)          {f.full_seconds:7.2f} s",
        f"  by hand: snap + export + convert + rsync     {f.hand_full_seconds:7.2f} s   "
        f"({', '.join(f'{k} {v:.2f}' for k, v in f.hand_full_steps.items())}); vmsched / hand {f.full_vs_hand:.2f}",
        f"  by hand: snap + convert rbd: + rsync         {f.hand_direct_seconds:7.2f} s   vmsched / hand {f.full_vs_direct:.2f}",
        f"  vmsched increment 1 ({f.dirty_mib} MiB in {f.write_kib} KiB writes) {f.increment_seconds:7.2f} s",
        f"  by hand: rbd export-diff + rsync             {f.hand_increment_seconds:7.2f} s   vmsched / hand "
        f"{f.increment_vs_hand:.2f}",
        f"  RBD link stored / export-diff size           {f.link_bytes / MiB:7.2f} MiB / {f.diff_bytes / MiB:.2f} MiB"
        f" = {f.link_vs_diff:.3f}",
        f"reproduce: {f.command}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--data-mib", type=int, default=1024, help="data written into the RBD disk (MiB)")
    parser.add_argument("--dirty-mib", type=int, default=16, help="data dirtied before the increment (MiB)")
    parser.add_argument("--write-kib", type=int, default=64, help="size of each dirtying write (KiB)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    figures = measure(args.data_mib, args.dirty_mib, args.write_kib, log=not args.json)
    print(json.dumps(asdict(figures)) if args.json else report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
