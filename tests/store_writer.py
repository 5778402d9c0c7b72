"""Crash-test writer: commits to a store in a tight loop until killed.

Usage: python tests/store_writer.py STATE_FILE

Each transaction puts one VM row and updates a counter row (host 0) holding the number of VM rows
and the sum of their ids, so a transaction that landed only in part is visible. After each commit
it prints "ACK <id>". Every seventh row is then deleted again in a transaction of its own ("DEL
<id>"), so an allocator that reused the highest free id would hand that id out a second time.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from scheduler.store.sqlite import Row, Store, Txn

COUNTER = ("host", 0)
DELETE_EVERY = 7


def body_for(oid: int) -> str:
    """The full 2 KB body of VM ``oid``; a torn or stale body does not compare equal."""
    return f"<VM><ID>{oid}</ID><PAD>{f'{oid:08d}' * 256}</PAD></VM>"


def parse_counter(body: str) -> tuple[int, int]:
    rows, id_sum = body.split()
    return int(rows), int(id_sum)


async def _bump_counter(txn: Txn, rows: int, id_sum: int) -> None:
    current = await txn.get(*COUNTER)
    old_rows, old_sum = parse_counter(current.body) if current else (0, 0)
    body = f"{old_rows + rows} {old_sum + id_sum}"
    await txn.put(COUNTER[0], Row(COUNTER[1], "counter", 0, 0, body))


async def write_forever(path: Path) -> None:
    store = await Store.open(path)
    while True:
        async with store.transaction() as txn:
            oid = await txn.new_id("vm")
            await txn.put("vm", Row(oid, f"vm-{oid}", 0, 0, body_for(oid)))
            await _bump_counter(txn, 1, oid)
        print(f"ACK {oid}", flush=True)
        if oid % DELETE_EVERY == 0:
            async with store.transaction() as txn:
                await txn.delete("vm", oid)
                await _bump_counter(txn, -1, -oid)
            print(f"DEL {oid}", flush=True)


if __name__ == "__main__":
    asyncio.run(write_forever(Path(sys.argv[1])))
