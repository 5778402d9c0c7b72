"""A live increment through vmsched against the full backup before it and the same increment run by hand.

Run: .venv/bin/python -m benchmarks.bench_increment [--data-gib 1] [--disk-gib 4] [--dirty-mib 40] [--rounds 3]
     [--json]

The real environment is brought up (idempotent). On host1 a TCG domain with no OS gets a ``vda`` qcow2 of
``--disk-gib`` GiB holding ``--data-gib`` GiB of random bytes (as bench_backup) and a small qcow2 ``vdb``; a
daemon backs it up in MODE=INCREMENT into an ``rsync`` datastore on the backup server. Then, in one run:

* the full base (request -> image recorded), timed;
* a checkpoint of the benchmark's own (``bench-hand-0``), then ``--dirty-mib`` MiB written inside the guest
  in 4 MiB writes scattered over the disk (a byte pattern through QEMU's own block layer, as the guest would
  write; nothing on the way compresses it);
* vmsched's increment 1, timed the same way, and its bytes on the backup server (the disk files' allocated
  size) against the bytes dirtied;
* the same increment by hand: ``virsh backup-begin`` (push mode, incremental since ``bench-hand-0``, into a
  qcow2 on host1) until the job ends, then ``rsync -aS`` of the files to the backup server, timed;
* the chain grown to 7 links (a 4 MiB write before each) and disk 0 restored at its last increment through
  ``one.image.restore``, against a restore of one full backup of the same final state (MODE=FULL): the two
  restores alternate for ``--rounds`` rounds (the first round's order is chain first, the next full first,
  and so on) and the medians are compared, since one restore of a GiB on a 2-core machine varies by 30 %.

Everything made here is removed at the end (domain, checkpoints, files, staging and backup dirs, the daemon).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import libvirt
from lxml import etree

from benchmarks.bench_backup import GCM, Timed, daemon, make_vda, rotated, rsync_datastore, run_timed, vmsched_backup
from tests.realenv import realenv as realenv_cli
from tests.realenv.domains import Hypervisor, TinyDomain
from tests.realenv.model import RealEnv
from tests.test_import_real import Api

COMMAND = ".venv/bin/python -m benchmarks.bench_increment"
WRITE_MIB = 4
CHAIN = 7  # links of the chain restored
MiB = 1 << 20
JOB_POLL = 0.05


@dataclass
class Figures:
    data_gib: float
    disk_gib: float
    dirty_mib: int
    full_seconds: float
    increment_seconds: float
    increment_ratio: float  # increment / full
    uploaded_bytes: int  # the increment's disk files, allocated, on the backup server
    dirtied_bytes: int
    uploaded_ratio: float
    hand_seconds: float  # virsh backup-begin + rsync
    hand_steps: dict[str, float]
    increment_vs_hand: float
    chain_restore_seconds: float  # median over the rounds
    full_restore_seconds: float
    chain_restores: list[float]
    full_restores: list[float]
    restore_ratio: float
    command: str


def image(api: Api, image_id: int) -> etree._Element:
    return etree.fromstring(str(api.call("one.image.info", image_id)).encode())


def chain_sources(api: Api, vm_id: int) -> tuple[int, list[str]]:
    ids = [int(i.text or "") for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    found = image(api, ids[-1])
    return ids[-1], [i.findtext("SOURCE") or "" for i in found.iterfind("BACKUP_INCREMENTS/INCREMENT")]


def scattered_offsets(dirty_mib: int, disk_gib: float) -> list[int]:
    """Offsets of the 4 MiB writes that dirty ``dirty_mib``, spread evenly, off the 64 MiB data extents' starts
    (pure)."""
    count = max(1, dirty_mib // WRITE_MIB)
    stride = int(disk_gib * 1024) // count
    return [(i * stride + 8) * MiB for i in range(count)]


def write_pattern(hv: Hypervisor, dom: TinyDomain, offset: int, length: int, pattern: int) -> None:
    """``length`` bytes of ``pattern`` at ``offset`` of vda, written by qemu-io inside QEMU, then flushed."""
    hv.qemu_io(dom, "vda", f"write -P {pattern & 0xFF:#x} {offset} {length}")
    hv.qemu_io(dom, "vda", "flush")


def restore_seconds(api: Api, image_id: int, image_ds: int, name: str) -> float:
    start = time.monotonic()
    reply = str(api.call("one.image.restore", image_id, image_ds, f'DISK_ID = "0"\nNAME = "{name}"'))
    seconds = time.monotonic() - start
    api.call("one.image.delete", int(reply.split()[1]), False)
    return seconds


def hand_increment(env: RealEnv, dom: TinyDomain, staging: str, remote: Path, timed: Timed) -> None:
    """``virsh backup-begin`` of vda and vdb since ``bench-hand-0`` into qcow2 files on host1, wait, rsync."""
    q = shlex.quote
    targets = {d: f"{staging}/hand.{d}.qcow2" for d in ("vda", "vdb")}
    disks = "".join(f"<disk name='{d}' backup='yes' type='file'><target file='{t}'/><driver type='qcow2'/></disk>"
                    for d, t in targets.items())
    backup_xml = f"<domainbackup mode='push'><incremental>bench-hand-0</incremental><disks>{disks}</disks></domainbackup>"
    on = env.ssh_argv
    run_timed(on("host1", ["sh", "-c", f"mkdir -p {q(staging)} && printf %s {q(backup_xml)} > {q(staging)}/b.xml"]),
              Timed(), "mkdir")
    script = (f"virsh -q backup-begin {q(dom.name)} --backupxml {q(staging)}/b.xml && "
              f"while virsh -q domjobinfo {q(dom.name)} | grep -q 'Job type: *Unbounded'; do sleep {JOB_POLL}; done")
    run_timed(on("host1", ["sh", "-c", script]), timed, "backup-begin")
    shell = shlex.join([str(env.ssh.wrapper), "-c", GCM])
    run_timed(on("backup", ["mkdir", "-p", str(remote / "hand")]), Timed(), "mkdir")
    files = " ".join(q(t) for t in targets.values())
    run_timed(on("host1", ["sh", "-c", f"rsync -aS -W -e {q(shell)} {files} {q(f'{env.backup.name}:{remote}/hand/')}"]),
              timed, "rsync")
    timed.total = sum(timed.steps.values())


def restore_rounds(api: Api, images: dict[str, int], image_ds: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of each restore of each of ``images`` (name -> image id), alternating, the order turned each
    round."""
    seconds: dict[str, list[float]] = {name: [] for name in images}
    for n in range(rounds):
        for name in rotated(list(images), n):
            seconds[name].append(restore_seconds(api, images[name], image_ds, f"{name}{n}"))
    return seconds


def measure(data_gib: float, disk_gib: float, dirty_mib: int, rounds: int, log: bool) -> Figures:
    def say(text: str) -> None:
        if log:
            print(text, file=sys.stderr, flush=True)

    libvirt.registerErrorHandler(lambda *_: None, None)
    env = realenv_cli.up()
    marker = f"vmsched-benchinc-{secrets.token_hex(4)}"
    staging, remote = f"/var/tmp/{marker}", env.backup.data_dir / marker
    work = Path(tempfile.mkdtemp(prefix=f"{marker}-"))
    host1 = Hypervisor(env.host("host1"))
    dom: TinyDomain | None = None
    try:
        dom = host1.define(work / "domains", vdb_format="qcow2")
        say(f"writing {data_gib:g} GiB of random extents into a {disk_gib:g} GiB qcow2 ...")
        make_vda(dom.vda, data_gib, disk_gib)
        host1.start(dom)
        with daemon(env, work / "state", staging) as api:
            vm_id = api.import_one("host1", dom.name)
            api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ MODE = "INCREMENT" ]', 1)
            ds_id = rsync_datastore(api, env, remote / "vmsched")
            say("full base ...")
            full = vmsched_backup(api, vm_id, ds_id)
            host1.lookup(dom).checkpointCreateXML(
                "<domaincheckpoint><name>bench-hand-0</name><disks><disk name='vda' checkpoint='bitmap'/>"
                "<disk name='vdb' checkpoint='bitmap'/></disks></domaincheckpoint>", 0)
            offsets = scattered_offsets(dirty_mib, disk_gib)
            for n, offset in enumerate(offsets):
                write_pattern(host1, dom, offset, WRITE_MIB * MiB, n + 1)
            say("increment 1 ...")
            increment = vmsched_backup(api, vm_id, ds_id)
            image_id, sources = chain_sources(api, vm_id)
            link = remote / "vmsched" / str(vm_id) / sources[-1]
            uploaded = sum(p.stat().st_blocks * 512 for p in link.iterdir() if p.name.startswith("disk."))
            say("the same increment by hand ...")
            hand = Timed()
            hand_increment(env, dom, staging, remote, hand)
            say(f"growing the chain to {CHAIN} links ...")
            for n in range(len(sources), CHAIN):
                write_pattern(host1, dom, offsets[n % len(offsets)] + 2 * MiB, 2 * MiB, 0x80 + n)
                vmsched_backup(api, vm_id, ds_id)
            image_ds = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                                    f'NAME = "benchimgs"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\nBASE_PATH = "{work}/imgs"', -1))
            api.call("one.vm.updateconf", vm_id, 'BACKUP_CONFIG = [ MODE = "FULL" ]', 1)
            vmsched_backup(api, vm_id, ds_id)
            full_id = int([i.text for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")][-1] or "")
            say(f"restores, {rounds} round(s) ...")
            restores = restore_rounds(api, {"chain": image_id, "full": full_id}, image_ds, rounds)
    finally:
        if dom is not None:
            host1.remove(dom)
        host1.close()
        for target, path in (("host1", staging), ("backup", str(remote))):
            subprocess.run(env.ssh_argv(target, ["rm", "-rf", "--", path]), timeout=60, check=False)
        shutil.rmtree(work, ignore_errors=True)
    dirtied = len(offsets) * WRITE_MIB * MiB
    chain_restore, full_restore = (statistics.median(restores[name]) for name in ("chain", "full"))
    return Figures(data_gib, disk_gib, dirty_mib, round(full.total, 2), round(increment.total, 2),
                   round(increment.total / full.total, 3), uploaded, dirtied, round(uploaded / dirtied, 3),
                   round(hand.total, 2), {k: round(v, 2) for k, v in hand.steps.items()},
                   round(increment.total / hand.total, 2), round(chain_restore, 2), round(full_restore, 2),
                   [round(t, 2) for t in restores["chain"]], [round(t, 2) for t in restores["full"]],
                   round(chain_restore / full_restore, 2),
                   f"{COMMAND} --data-gib {data_gib:g} --disk-gib {disk_gib:g} --dirty-mib {dirty_mib} --rounds {rounds}")


def report(f: Figures) -> str:
    return "\n".join([
        f"live increment of a {f.disk_gib:g} GiB qcow2 holding {f.data_gib:g} GiB, {f.dirty_mib} MiB dirtied in "
        f"{WRITE_MIB} MiB writes, host1 -> rsync datastore on the backup server:",
        f"  full base (request -> recorded)          {f.full_seconds:7.2f} s",
        f"  increment 1 (request -> recorded)        {f.increment_seconds:7.2f} s   ({f.increment_ratio:.1%} of the full)",
        f"  bytes stored / bytes dirtied             {f.uploaded_bytes / MiB:7.1f} MiB / {f.dirtied_bytes / MiB:.1f} MiB"
        f" = {f.uploaded_ratio:.3f}",
        f"  by hand: backup-begin + rsync            {f.hand_seconds:7.2f} s   "
        f"({', '.join(f'{k} {v:.2f}' for k, v in f.hand_steps.items())})",
        f"  increment / by hand                      {f.increment_vs_hand:7.2f}",
        f"  restore at link {CHAIN - 1} of a {CHAIN}-link chain    {f.chain_restore_seconds:7.2f} s   (median of "
        f"{', '.join(f'{t:.2f}' for t in f.chain_restores)})",
        f"  restore of one full, same final state    {f.full_restore_seconds:7.2f} s   (median of "
        f"{', '.join(f'{t:.2f}' for t in f.full_restores)}; chain / full {f.restore_ratio:.2f})",
        f"reproduce: {f.command}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--data-gib", type=float, default=1.0, help="data written into the disk (GiB)")
    parser.add_argument("--disk-gib", type=float, default=4.0, help="virtual size of the disk (GiB)")
    parser.add_argument("--dirty-mib", type=int, default=40, help="data dirtied before the increment (MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="restores of each kind, alternating")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    figures = measure(args.data_gib, args.disk_gib, args.dirty_mib, args.rounds, log=not args.json)
    print(json.dumps(asdict(figures)) if args.json else report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
