"""The in-memory state over the store: mutations, group commits, ids."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from scheduler.store.sqlite import Row, Store
from scheduler.store.state import Codec, State


@dataclass(frozen=True)
class Thing:
    id: int
    name: str


CODECS = {"host": Codec("thing", lambda t: Row(t.id, t.name, 0, 0, t.name), lambda r: Thing(r.id, r.body))}


async def open_state(path: Path) -> State:
    state = State(await Store.open(path), CODECS)
    await state.load()
    return state


async def test_mutation_is_visible_only_after_commit_and_survives_reopen(tmp_path: Path) -> None:
    state = await open_state(tmp_path / "s.db")
    async with state.mutation() as m:
        thing = Thing(await m.new_id("host"), "a")
        m.put("host", thing)
        assert state.find("host", thing.id) is None  # not before the commit
    assert state.get("host", thing.id).name == "a"
    await state.store.close()
    again = await open_state(tmp_path / "s.db")
    assert again.get("host", thing.id).name == "a"
    assert again.allocate_id("host") == thing.id + 1
    await again.store.close()


async def test_failed_mutation_changes_nothing(tmp_path: Path) -> None:
    state = await open_state(tmp_path / "s.db")
    with pytest.raises(RuntimeError):
        async with state.mutation() as m:
            m.put("host", Thing(await m.new_id("host"), "x"))
            raise RuntimeError("boom")
    assert state.all("host") == []
    await state.store.close()
    again = await open_state(tmp_path / "s.db")
    assert again.all("host") == []
    await again.store.close()


async def test_cancelled_caller_still_commits_what_it_started(tmp_path: Path) -> None:
    state = await open_state(tmp_path / "s.db")
    started = asyncio.Event()
    original = state.store.transaction

    def slow_transaction():  # the commit begins, then the caller is cancelled
        started.set()
        return original()

    state.store.transaction = slow_transaction  # type: ignore[method-assign]

    async def writer() -> None:
        async with state.mutation() as m:
            m.put("host", Thing(0, "kept"))

    task = asyncio.create_task(writer())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state.get("host", 0).name == "kept"
    await state.store.close()
    again = await open_state(tmp_path / "s.db")
    assert again.get("host", 0).name == "kept"
    await again.store.close()


async def test_group_commit_shares_transactions_and_latest_version_wins(tmp_path: Path) -> None:
    state = await open_state(tmp_path / "s.db")
    commits = 0
    original = state.store.write_batch

    async def counting(ops):
        nonlocal commits
        commits += 1
        await original(ops)

    state.store.write_batch = counting  # type: ignore[method-assign]
    await asyncio.gather(*(state.update("host", Thing(i, f"v{i}")) for i in range(200)))
    assert 1 <= commits < 20  # 200 updates, a handful of transactions
    await asyncio.gather(state.update("host", Thing(5, "old")), state.update("host", Thing(5, "new")))
    state.update_soon("host", None, 7)
    await state.durable()
    state.store.write_batch = original  # type: ignore[method-assign]
    await state.store.close()
    again = await open_state(tmp_path / "s.db")
    assert again.get("host", 5).name == "new"
    assert again.find("host", 7) is None
    assert len(again.all("host")) == 199
    await again.store.close()
