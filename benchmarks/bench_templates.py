"""Parse and render 10,000 typical VM templates (about 2 KB each) and report the throughput.

Run: .venv/bin/python -m benchmarks.bench_templates [--count N] [--json]
Target: parse + render of 10,000 templates in 2 s or less on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from scheduler.model.template import Template

COMMAND = ".venv/bin/python -m benchmarks.bench_templates"
TARGET_SECONDS = 2.0


def vm_template(rng: random.Random, vm_id: int) -> str:
    """A VM template as admins write them: comments, spacing, several disks and NICs, schedules."""
    disks = "\n".join(
        f'DISK = [ IMAGE_ID = "{rng.randrange(1000)}", DEV_PREFIX = "vd", TARGET = "vd{chr(97 + i)}",\n'
        f'  CACHE = "none", DRIVER = "qcow2", SIZE = "{rng.randrange(1, 200) * 1024}", FORMAT = "qcow2",\n'
        f'  DATASTORE_ID = "{rng.randrange(100, 110)}", IO = "native" ]'
        for i in range(rng.randint(2, 4))
    )
    nics = "\n".join(
        f'NIC = [ NETWORK = "net-{rng.randrange(20)}", NETWORK_UNAME = "oneadmin", MODEL = "virtio",\n'
        f"  SECURITY_GROUPS = \"0,{rng.randrange(1, 9)}\", IP = \"10.{i}.{rng.randrange(256)}.{rng.randrange(1, 255)}\" ]"
        for i in range(rng.randint(1, 3))
    )
    actions = "\n".join(
        f'SCHED_ACTION = [ ACTION = "backup", TIME = "{1_700_000_000 + rng.randrange(10**7)}", REPEAT = "{k}",\n'
        f'  DAYS = "{rng.randrange(7)}", END_TYPE = "0", ARGS = "{rng.randrange(100, 110)}", ID = "{k}" ]'
        for k in range(rng.randint(1, 3))
    )
    return f"""# VM {vm_id}: generated for the template benchmark
NAME = "vm-{vm_id}"
CPU = "{rng.choice(["0.5", "1", "2", "4"])}"
VCPU = {rng.choice([1, 2, 4, 8])}
MEMORY = {rng.choice([512, 1024, 2048, 8192])}
HYPERVISOR = kvm
DESCRIPTION = "Web server {vm_id}, owned by team \\"ops\\"
second line of the description"
{disks}
{nics}
OS = [ ARCH = "x86_64", BOOT = "disk0", FIRMWARE = "UEFI", MACHINE = "q35" ]
FEATURES = [ ACPI = "yes", APIC = "yes", GUEST_AGENT = "yes" ]
GRAPHICS = [ LISTEN = "0.0.0.0", TYPE = "VNC", KEYMAP = "en-us" ]
CONTEXT = [ NETWORK = "YES", SSH_PUBLIC_KEY = "$USER[SSH_PUBLIC_KEY]",
  SET_HOSTNAME = "vm-{vm_id}", START_SCRIPT_BASE64 = "{rng.randbytes(96).hex()}",
  USERNAME = "root", TOKEN = "YES" ]
BACKUP_CONFIG = [ BACKUP_VOLATILE = "NO", FS_FREEZE = "AGENT", KEEP_LAST = "{rng.randrange(1, 15)}",
  MODE = "{rng.choice(["FULL", "INCREMENT"])}" ]
{actions}
LABELS = "prod,web"
SCHED_REQUIREMENTS = "ID != {rng.randrange(50)}"
LOGO = images/logos/linux.png
"""


def run(count: int, seed: int = 42) -> dict[str, float | int]:
    rng = random.Random(seed)
    texts = [vm_template(rng, i) for i in range(count)]
    size = sum(len(t.encode()) for t in texts)
    sample = Template.parse(texts[0])
    if Template.parse(sample.render()) != sample or len(sample.vectors("DISK")) < 2:
        raise SystemExit("the benchmark templates do not round-trip: fix the parser first")
    started = time.perf_counter()
    for text in texts:
        Template.parse(text).render()
    elapsed = time.perf_counter() - started
    return {
        "templates": count,
        "bytes": size,
        "seconds": round(elapsed, 3),
        "mb_per_s": round(size / elapsed / 1e6, 2),
        "target_seconds": TARGET_SECONDS if count == 10_000 else round(TARGET_SECONDS * count / 10_000, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="number of templates (default 10000)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    result = run(args.count, args.seed)
    if args.json:
        print(json.dumps({**result, "command": COMMAND}))
        return
    verdict = "within" if result["seconds"] <= result["target_seconds"] else "OVER"
    print(f"parse + render of {result['templates']} templates ({result['bytes'] / 1e6:.1f} MB): "
          f"{result['seconds']:.3f} s, {result['mb_per_s']:.1f} MB/s ({verdict} the {result['target_seconds']} s target)")
    print(f"reproduce: {COMMAND}")


if __name__ == "__main__":
    main()
