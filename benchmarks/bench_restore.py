"""Restore of a 4 GiB qcow2 disk holding 1 GiB from an rsync datastore: vmsched against the same copy by hand.

Run: .venv/bin/python -m benchmarks.bench_restore [--data-gib 1] [--disk-gib 4] [--rounds 3]

One live backup of a tiny TCG domain on host1 (its vda made as in bench_backup) goes into an rsync
datastore on the backup server. Then, in each round (the order rotated, medians reported):

* vmsched: ``one.image.restore(backup, image datastore on host1, DISK_ID=0)``, request -> image READY
  (the copy from the backup server straight to host1, verified against the recorded sha256 and by
  ``qemu-img check``);
* by hand, copy: ``rsync -aS -W`` over AES-GCM run on host1, pulling the same file (the real tools,
  independently of vmsched's code);
* by hand, copy + verify: the same, then ``openssl dgst -sha256`` of the copy;
* by hand, cat + verify: ``ssh <server> cat <file> > <copy>`` then ``openssl dgst -sha256`` of the copy: the
  same two commands vmsched runs, so the difference to vmsched is its own overhead (API, records, qemu-img
  check, rename).
"""

from __future__ import annotations

import argparse
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lxml import etree

from benchmarks.bench_backup import (
    GCM,
    Timed,
    daemon,
    make_vda,
    median_run,
    rotated,
    rsync_datastore,
    run_timed,
    vmsched_backup,
)
from tests.realenv import realenv as realenv_cli
from tests.realenv.domains import Hypervisor
from tests.realenv.model import RealEnv
from tests.test_import_real import Api

COMMAND = ".venv/bin/python -m benchmarks.bench_restore"
RUNS = ("vmsched", "copy", "copy+verify", "cat+verify")


def backup_file(api: Api, vm_id: int, remote: Path) -> tuple[int, Path]:
    [image_id] = [int(i.text or "") for i in api.vm(vm_id).iterfind("BACKUPS/BACKUP_IDS/ID")]
    source = etree.fromstring(str(api.call("one.image.info", image_id)).encode()).findtext("SOURCE")
    return image_id, remote / "vmsched" / str(vm_id) / str(source) / "disk.0.0"


def vmsched_restore(api: Api, backup: int, ds_id: int) -> Timed:
    timed = Timed()
    start = time.monotonic()
    reply = str(api.call("one.image.restore", backup, ds_id, "DISK_ID = 0"))
    timed.total = time.monotonic() - start
    _, image_id = map(int, reply.split())
    api.call("one.image.delete", image_id, False)  # the next round restores again
    return timed


def hand_copy(env: RealEnv, source: Path, target: str, how: str) -> Timed:
    timed, q = Timed(), shlex.quote
    shell = shlex.join([str(env.ssh.wrapper), "-c", GCM])
    script = f"rsync -aS -W -e {q(shell)} {q(f'{env.backup.name}:{source}')} {q(target)}"
    if how == "cat+verify":
        script = f"{shell} {q(env.backup.name)} cat -- {q(q(str(source)))} > {q(target)}"
    if how != "copy":
        script += f" && openssl dgst -sha256 {q(target)}"
    start = time.monotonic()
    run_timed(env.ssh_argv("host1", ["sh", "-c", script]), timed, "copy")
    timed.total = time.monotonic() - start
    run_timed(env.ssh_argv("host1", ["rm", "-f", "--", target]), Timed(), "rm")
    return timed


def measure(data_gib: float, disk_gib: float, rounds: int) -> dict[str, object]:
    env = realenv_cli.up()
    marker = f"vmsched-benchrestore-{secrets.token_hex(4)}"
    staging, remote, images = f"/var/tmp/{marker}", env.backup.data_dir / marker, f"/var/tmp/{marker}-images"
    work = Path(tempfile.mkdtemp(prefix=f"{marker}-"))
    host1 = Hypervisor(env.host("host1"))
    dom = host1.define(work / "domains")
    try:
        print(f"writing {data_gib:g} GiB of random extents into a {disk_gib:g} GiB qcow2 ...", file=sys.stderr)
        make_vda(dom.vda, data_gib, disk_gib)
        host1.start(dom)
        with daemon(env, work / "state", staging) as api:
            vm_id = api.import_one("host1", dom.name)
            vmsched_backup(api, vm_id, rsync_datastore(api, env, remote / "vmsched"))
            backup, source = backup_file(api, vm_id, remote)
            image_ds = int(api.call("one.datastore.allocate",  # type: ignore[call-overload]
                                    f'NAME = "benchimgs"\nTYPE = "IMAGE_DS"\nDS_MAD = "fs"\n'
                                    f'BRIDGE_LIST = "host1"\nBASE_PATH = "{images}"', -1))
            runs: dict[str, list[Timed]] = {name: [] for name in RUNS}
            for round_no in range(rounds):
                for name in rotated(RUNS, round_no):
                    print(f"round {round_no + 1}: {name} ...", file=sys.stderr)
                    if name == "vmsched":
                        runs[name].append(vmsched_restore(api, backup, image_ds))
                    else:
                        runs[name].append(hand_copy(env, source, f"{images}/by-hand.qcow2", name))
    finally:
        host1.remove(dom)
        host1.close()
        for target, path in (("host1", staging), ("host1", images), ("backup", str(remote))):
            subprocess.run(env.ssh_argv(target, ["rm", "-rf", "--", path]), timeout=60, check=False)
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: round(median_run(done).total, 2) for name, done in runs.items()}
    return {"data_gib": data_gib, "disk_gib": disk_gib, "medians": medians,
            "rounds": [{name: round(runs[name][r].total, 2) for name in RUNS} for r in range(rounds)],
            "ratio_vmsched_copy": round(medians["vmsched"] / medians["copy"], 2),
            "ratio_vmsched_copy_verify": round(medians["vmsched"] / medians["copy+verify"], 2),
            "ratio_vmsched_cat_verify": round(medians["vmsched"] / medians["cat+verify"], 2),
            "command": f"{COMMAND} --data-gib {data_gib:g} --disk-gib {disk_gib:g} --rounds {rounds}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--data-gib", type=float, default=1.0)
    parser.add_argument("--disk-gib", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    f = measure(args.data_gib, args.disk_gib, max(1, args.rounds))
    medians = f["medians"]
    assert isinstance(medians, dict)
    print(f"restore of disk 0 (a {args.disk_gib:g} GiB qcow2 holding {args.data_gib:g} GiB) from an rsync datastore "
          f"to host1; medians of {args.rounds} rotated rounds:")
    print(f"  vmsched one.image.restore (copy, sha256, qemu-img check)  {medians['vmsched']:6.2f} s")
    print(f"  by hand: rsync -W over AES-GCM                             {medians['copy']:6.2f} s")
    print(f"  by hand: rsync, then openssl dgst -sha256                  {medians['copy+verify']:6.2f} s")
    print(f"  by hand: ssh cat > file, then openssl dgst -sha256        {medians['cat+verify']:6.2f} s")
    print(f"  vmsched / copy {f['ratio_vmsched_copy']}, vmsched / copy+verify {f['ratio_vmsched_copy_verify']}, "
          f"vmsched / cat+verify {f['ratio_vmsched_cat_verify']}")
    for i, r in enumerate(f["rounds"]):  # type: ignore[arg-type]
        print(f"  round {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r.items()))
    print(f"reproduce: {f['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
