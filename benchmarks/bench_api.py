"""API speed: one.vmpool.info over 10,000 VMs, and one.vm.info requests per second.

    .venv/bin/python -m benchmarks.bench_api [--vms 10000] [--seconds 5] [--json]

The VMs are written into a fresh state database through the daemon's own store and object code, then a
real `vmsched serve` answers. one.vmpool.info is timed with pyone (as scripts call it) and with a raw
HTTP client; one.vm.info is driven by one keep-alive aiohttp client, first one request at a time, then
with 8 requests in flight on the same client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path

import aiohttp
import pyone

from scheduler.model.objects.common import Ownership
from scheduler.model.objects.states import LcmState, VmState
from scheduler.model.objects.vm import History, Vm
from scheduler.model.template import Template, Vector
from scheduler.store.codecs import build_codecs
from scheduler.store.sqlite import Store
from scheduler.store.state import State
from tests.conftest import start_daemon

COMMAND = ".venv/bin/python -m benchmarks.bench_api"


def typical_vm(vm_id: int) -> Vm:
    template = Template()
    template.add("CPU", "1")
    template.add("MEMORY", "2048")
    template.add("VCPU", "2")
    for disk_id, (target, fmt) in enumerate((("vda", "qcow2"), ("vdb", "raw"))):
        template.add("DISK", Vector({"DISK_ID": str(disk_id), "TARGET": target, "FORMAT": fmt, "TYPE": "FILE",
                                     "SOURCE": f"/var/lib/vms/{vm_id}/disk.{disk_id}", "SIZE": "10240",
                                     "TM_MAD": "qcow2"}))
    template.add("NIC", Vector({"NIC_ID": "0", "MAC": f"02:00:0a:00:{vm_id // 256 % 256:02x}:{vm_id % 256:02x}",
                                "BRIDGE": "br0", "MODEL": "virtio"}))
    template.add("OS", Vector({"UUID": f"00000000-0000-4000-8000-{vm_id:012d}", "ARCH": "x86_64"}))
    vm = Vm(id=vm_id, name=f"vm-{vm_id}", ownership=Ownership(), state=VmState.ACTIVE, lcm_state=LcmState.RUNNING, stime=1_700_000_000,
            template=template, deploy_id=f"vm-{vm_id}")
    vm.backup_config = Vector({"BACKUP_VOLATILE": "NO", "FS_FREEZE": "AGENT", "KEEP_LAST": "4", "MODE": "FULL"})
    vm.history.append(History(seq=0, hostname=f"kvm{vm_id % 50}", hid=vm_id % 50, stime=1_700_000_000))
    return vm


async def populate(state_dir: Path, count: int) -> None:
    store = await Store.open(state_dir / "vmsched.db")
    state = State(store, build_codecs())
    await state.load()
    from scheduler.daemon.bootstrap import ensure_admin
    from scheduler.engine.clock import SystemClock

    await ensure_admin(state, state_dir, SystemClock())
    batch = 1000
    for first in range(0, count, batch):
        async with state.mutation() as m:
            for _ in range(first, min(first + batch, count)):
                m.put("vm", typical_vm(await m.new_id("vm")))
    await store.close()


async def drive_vm_info(endpoint: str, session: str, vm_ids: list[int], seconds: float, in_flight: int) -> dict:
    bodies = [xmlrpc.client.dumps((session, vm_id), "one.vm.info").encode() for vm_id in vm_ids]
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=in_flight, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as client:
        deadline = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with client.post(endpoint, data=bodies[i % len(bodies)],
                                       headers={"Content-Type": "text/xml"}) as response:
                    reply = await response.read()
                latencies.append(time.perf_counter() - started)
                if b"<boolean>1</boolean>" not in reply:
                    errors += 1
                i += in_flight

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(in_flight)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "in_flight": in_flight,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


async def http_times(endpoint: str, session: str, runs: int) -> list[float]:
    """Request to last byte of the reply: the server's answer, without parsing it on the client."""
    body = xmlrpc.client.dumps((session, -2, -1, -1, -1), "one.vmpool.info").encode()
    times = []
    async with aiohttp.ClientSession() as client:
        for _ in range(runs):
            started = time.perf_counter()
            async with client.post(endpoint, data=body, headers={"Content-Type": "text/xml"}) as response:
                await response.read()
            times.append(time.perf_counter() - started)
    return times


def time_pool(endpoint: str, session: str, runs: int = 5) -> dict:
    one = pyone.OneServer(endpoint, session=session, timeout=60)
    proxy = xmlrpc.client.ServerProxy(endpoint)
    answer = asyncio.run(http_times(endpoint, session, runs + 1))
    pyone_times, raw_times, size = [], [], 0
    for _ in range(runs):
        started = time.perf_counter()
        pool = one.vmpool.info(-2, -1, -1, -1)
        pyone_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        reply = proxy.one.vmpool.info(session, -2, -1, -1, -1)
        raw_times.append(time.perf_counter() - started)
        size = len(reply[1])
    return {
        "vms_returned": len(pool.VM),
        "answer_first_s": round(answer[0], 3),
        "answer_best_s": round(min(answer[1:]), 3),
        "answer_median_s": round(statistics.median(answer[1:]), 3),
        "reply_mb": round(size / 1e6, 1),
        "raw_client_best_s": round(min(raw_times), 3),
        "raw_client_median_s": round(statistics.median(raw_times), 3),
        "pyone_best_s": round(min(pyone_times), 3),
        "pyone_note": "pyone's time includes parsing the reply into Python objects on the client",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmsched-bench-") as tmp:
        state_dir = Path(tmp) / "state"
        started = time.perf_counter()
        state_dir.mkdir(parents=True)
        asyncio.run(populate(state_dir, args.vms))
        populate_s = time.perf_counter() - started
        daemon = start_daemon(state_dir, timeout=120)
        try:
            pool = time_pool(daemon.endpoint, daemon.session)
            ids = list(range(0, args.vms, max(1, args.vms // 500)))
            sequential = asyncio.run(drive_vm_info(daemon.endpoint, daemon.session, ids, args.seconds, 1))
            parallel = asyncio.run(drive_vm_info(daemon.endpoint, daemon.session, ids, args.seconds, 8))
        finally:
            daemon.stop()
    result = {"command": f"{COMMAND} --vms {args.vms} --seconds {args.seconds}", "vms": args.vms,
              "populate_s": round(populate_s, 2), "vmpool_info": pool,
              "vm_info_one_at_a_time": sequential, "vm_info_8_in_flight": parallel}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"one.vmpool.info, {args.vms} VMs ({pool['reply_mb']} MB): answered in {pool['answer_median_s']} s "
              f"median ({pool['answer_first_s']} s first call after start); with the client's XML-RPC parse "
              f"{pool['raw_client_median_s']} s; pyone with its object binding {pool['pyone_best_s']} s")
        print(f"one.vm.info, one keep-alive client: {sequential['requests_per_s']} req/s one at a time "
              f"(p99 {sequential['p99_ms']} ms), {parallel['requests_per_s']} req/s with 8 in flight")
        print(f"reproduce: {result['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
