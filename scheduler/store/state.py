"""The daemon's objects, in memory, written through to the store.

Reads come from memory. There are two ways to change objects:

* ``async with state.mutation() as m`` (the API): the handler reads the current objects, puts
  changed copies (never mutating what it read), and on leaving the block the whole change commits
  in one SQLite transaction and only then becomes visible in memory. Mutations are serialised, so a
  handler never works from a stale copy; a failure leaves memory and disk as they were. Once the
  commit has started it finishes, even if the caller is cancelled.
* ``await state.update(kind, obj)`` (the engine's hot path): the object replaces the current one in
  memory at once and is written by the next group commit; the call returns when that commit is
  durable. Many updates share one transaction, so thousands of dispatches a second cost a few fsyncs.
  A flush writes the *current* object of every changed id, so the latest version always wins.

Ids are handed out from memory (the store's sequences are read at start-up and moved by every
commit), so ids of committed objects are never reused.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from scheduler.errors import NotFound
from scheduler.model.objects.datastore import Datastore
from scheduler.model.objects.host import Host
from scheduler.model.objects.image import Image
from scheduler.model.objects.user import User
from scheduler.model.objects.vm import Vm
from scheduler.model.objects.vmtemplate import VmTemplate
from scheduler.model.schedule import SchedAction
from scheduler.store.sqlite import Row, Store, delete_sql, put_sql, row_params, run_to_completion

log = logging.getLogger(__name__)

FLUSH_RETRY = 1.0  # seconds before a failed group commit is tried again


@dataclass(frozen=True)
class Codec:
    """How one kind of object becomes a store row and back."""

    what: str  # "virtual machine", "host" ... for messages
    encode: Callable[[Any], Row]
    decode: Callable[[Row], Any]


@dataclass
class Mutation:
    state: State
    puts: dict[tuple[str, int], Any] = field(default_factory=dict)
    deletes: set[tuple[str, int]] = field(default_factory=set)
    # Rows of other tables (the run journal) written in the same transaction, and what to do once
    # the transaction is committed.
    statements: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    after_commit: list[Callable[[], None]] = field(default_factory=list)

    async def new_id(self, kind: str) -> int:
        return self.state.allocate_id(kind)

    def put(self, kind: str, obj: Any) -> None:
        self.deletes.discard((kind, obj.id))
        self.puts[(kind, obj.id)] = obj

    def delete(self, kind: str, obj_id: int) -> None:
        self.puts.pop((kind, obj_id), None)
        self.deletes.add((kind, obj_id))


# Extra writers joining every group commit (the run journal): each returns the statements to write
# and a callback told whether they were committed.
Ops = list[tuple[str, list[tuple[Any, ...]]]]
FlushHook = Callable[[], tuple[Ops, Callable[[bool], None]]]


T = TypeVar("T")


class Pool(Generic[T]):
    """The objects of one kind, typed: ``state.vms.get(7)`` is a ``Vm`` (or NotFound)."""

    __slots__ = ("_state", "kind")

    def __init__(self, state: State, kind: str) -> None:
        self._state = state
        self.kind = kind

    def get(self, obj_id: int) -> T:
        return cast(T, self._state.get(self.kind, obj_id))

    def find(self, obj_id: int) -> T | None:
        return cast("T | None", self._state.pools[self.kind].get(obj_id))

    def all(self) -> list[T]:
        return cast("list[T]", self._state.all(self.kind))

    def editable(self, obj_id: int) -> T:
        """A private copy to change and put back."""
        return cast(T, self._state.editable(self.kind, obj_id))

    def __len__(self) -> int:
        return len(self._state.pools[self.kind])


class State:
    def __init__(self, store: Store, codecs: dict[str, Codec]) -> None:
        self.store = store
        self.codecs = codecs
        self.pools: dict[str, dict[int, Any]] = {kind: {} for kind in codecs}
        self.users: Pool[User] = Pool(self, "user")
        self.hosts: Pool[Host] = Pool(self, "host")
        self.datastores: Pool[Datastore] = Pool(self, "datastore")
        self.images: Pool[Image] = Pool(self, "image")
        self.templates: Pool[VmTemplate] = Pool(self, "template")
        self.vms: Pool[Vm] = Pool(self, "vm")
        self.schedactions: Pool[SchedAction] = Pool(self, "schedaction")
        self.lock = asyncio.Lock()
        self.listeners: list[Callable[[str, int, Any | None], None]] = []
        self.flush_hooks: list[FlushHook] = []
        self._next_ids: dict[str, int] = {}
        self._dirty: set[tuple[str, int]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._flush_wanted = asyncio.Event()
        self._committing = False
        self._waiters: list[asyncio.Future[None]] = []
        # Seconds a group commit waits for more changes before it starts: fewer, larger transactions
        # under load, at the price of that much latency.
        self.commit_window = 0.001
        self._last_flush = float("-inf")

    async def load(self) -> None:
        for kind, codec in self.codecs.items():
            self.pools[kind] = {row.id: codec.decode(row) for row in await self.store.load(kind)}
        self._next_ids = await self.store.sequences()

    # -- reading ---------------------------------------------------------------------------------
    def get(self, kind: str, obj_id: int) -> Any:
        try:
            return self.pools[kind][obj_id]
        except KeyError:
            raise NotFound(f"Error getting {self.codecs[kind].what} [{obj_id}].") from None

    def find(self, kind: str, obj_id: int) -> Any | None:
        return self.pools[kind].get(obj_id)

    def all(self, kind: str) -> list[Any]:
        pool = self.pools[kind]
        return [pool[i] for i in sorted(pool)]

    def editable(self, kind: str, obj_id: int) -> Any:
        """A private copy of an object to change and put back."""
        return copy.deepcopy(self.get(kind, obj_id))

    def allocate_id(self, kind: str) -> int:
        next_id = self._next_ids.get(kind, 0)
        self._next_ids[kind] = next_id + 1
        return next_id

    # -- API mutations ---------------------------------------------------------------------------
    @asynccontextmanager
    async def mutation(self) -> AsyncIterator[Mutation]:
        async with self.lock:
            change = Mutation(self)
            yield change
            if change.puts or change.deletes or change.statements:
                await run_to_completion(self._commit(change))

    async def _commit(self, change: Mutation) -> None:
        async with self.store.transaction() as txn:
            for (kind, _), obj in change.puts.items():
                await txn.put(kind, self.codecs[kind].encode(obj))
            for kind, obj_id in change.deletes:
                await txn.delete(kind, obj_id)
            for sql, params in change.statements:
                await txn.execute_many(sql, [params])
        for (kind, obj_id), obj in change.puts.items():
            self._apply(kind, obj_id, obj)
        for kind, obj_id in change.deletes:
            self._apply(kind, obj_id, None)
        for callback in change.after_commit:
            callback()

    # -- engine updates (group commit) -----------------------------------------------------------
    async def update(self, kind: str, obj: Any) -> None:
        """Replace ``obj`` in memory now (after any API mutation in progress); return once durable."""
        async with self.lock:
            self.update_soon(kind, obj)
        await self.durable()

    def update_soon(self, kind: str, obj: Any | None, obj_id: int | None = None) -> None:
        """Replace (or with ``None`` remove) an object in memory and mark it for the next flush.

        The caller holds ``state.lock`` or knows no API mutation can be touching the object.
        """
        key_id = obj.id if obj is not None else obj_id
        assert key_id is not None
        self._apply(kind, key_id, obj)
        self._dirty.add((kind, key_id))

    def mark_dirty(self) -> None:
        """Something outside the pools (a flush hook) has changes to write."""
        self._dirty.add(("", -1))

    def flush_soon(self) -> None:
        """Start committing what is dirty now, without waiting for it."""
        if self._dirty:
            self._wake_flusher()

    async def durable(self) -> None:
        """Wait until every change made so far is committed."""
        if not self._dirty and not self._committing:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake_flusher()
        await waiter

    def _wake_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_forever())
        self._flush_wanted.set()

    async def _flush_forever(self) -> None:
        """One long-lived task commits whatever is dirty, in order, one transaction at a time."""
        loop = asyncio.get_running_loop()
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            while self._dirty or self._waiters:
                if not self._dirty:  # waiters registered while nothing was dirty any more
                    self._release(self._waiters, None)
                    self._waiters = []
                    break
                if self.commit_window and loop.time() - self._last_flush < self.commit_window:
                    # in a burst: let changes gather for a moment into one transaction
                    await asyncio.sleep(self.commit_window)
                self._last_flush = loop.time()
                dirty, self._dirty = self._dirty, set()
                waiters, self._waiters = self._waiters, []
                self._committing = True
                try:
                    await self._flush(dirty)
                except Exception as exc:  # noqa: BLE001 - every waiter learns of the failed write, whatever it was
                    self._dirty |= dirty  # written again with the next commit
                    self._release(waiters, exc)
                    log.error("group commit failed, retrying in %ss: %s", FLUSH_RETRY, exc)
                    await asyncio.sleep(FLUSH_RETRY)
                    continue
                finally:
                    self._committing = False
                self._release(waiters, None)

    @staticmethod
    def _release(waiters: list[asyncio.Future[None]], error: Exception | None) -> None:
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    async def close(self) -> None:
        """Commit what is pending, stop the flusher."""
        if self._dirty:
            await self.durable()
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None

    async def _flush(self, dirty: set[tuple[str, int]]) -> None:
        async with self.lock:  # never interleave with an API mutation's read-modify-write
            puts: dict[str, list[tuple[Any, ...]]] = {}
            deletes: dict[str, list[tuple[Any, ...]]] = {}
            for kind, obj_id in dirty:
                if not kind:
                    continue
                obj = self.pools[kind].get(obj_id)
                if obj is None:
                    deletes.setdefault(kind, []).append((obj_id,))
                else:
                    puts.setdefault(kind, []).append(row_params(self.codecs[kind].encode(obj)))
            ops: Ops = [(put_sql(kind), rows) for kind, rows in puts.items()]
            ops += [(delete_sql(kind), ids) for kind, ids in deletes.items()]
            callbacks = []
            for hook in self.flush_hooks:
                hook_ops, done = hook()
                ops += hook_ops
                callbacks.append(done)
            try:
                if ops:
                    await self.store.write_batch(ops)
            except BaseException:
                for done in callbacks:
                    done(False)
                raise
            for done in callbacks:
                done(True)

    # -- notifications ---------------------------------------------------------------------------
    def _apply(self, kind: str, obj_id: int, obj: Any | None) -> None:
        if obj is None:
            self.pools[kind].pop(obj_id, None)
        else:
            self.pools[kind][obj_id] = obj
        for listener in self.listeners:
            listener(kind, obj_id, obj)

