"""The daemon's objects, in memory, written through to the store.

Reads come from memory. A change happens inside ``async with state.mutation() as m``: the handler
reads the current objects, puts changed copies (never mutating what it read), and on leaving the block
the whole change commits in one SQLite transaction and only then becomes visible in memory. Mutations
are serialised, so a handler never works from a stale copy; a failure leaves memory and disk as they
were.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from scheduler.errors import NotFound
from scheduler.store import Row, Store


@dataclass(frozen=True)
class Codec:
    """How one kind of object becomes a store row and back."""

    what: str  # "virtual machine", "host" ... for messages
    encode: Callable[[Any], Row]
    decode: Callable[[Row], Any]


@dataclass
class Mutation:
    store_txn: Any
    puts: dict[tuple[str, int], Any] = field(default_factory=dict)
    deletes: set[tuple[str, int]] = field(default_factory=set)

    async def new_id(self, kind: str) -> int:
        return int(await self.store_txn.new_id(kind))

    def put(self, kind: str, obj: Any) -> None:
        self.deletes.discard((kind, obj.id))
        self.puts[(kind, obj.id)] = obj

    def delete(self, kind: str, obj_id: int) -> None:
        self.puts.pop((kind, obj_id), None)
        self.deletes.add((kind, obj_id))


class State:
    def __init__(self, store: Store, codecs: dict[str, Codec]) -> None:
        self.store = store
        self.codecs = codecs
        self.pools: dict[str, dict[int, Any]] = {kind: {} for kind in codecs}
        self._lock = asyncio.Lock()
        self.listeners: list[Callable[[str, int, Any | None], None]] = []

    async def load(self) -> None:
        for kind, codec in self.codecs.items():
            self.pools[kind] = {row.id: codec.decode(row) for row in await self.store.load(kind)}

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

    @asynccontextmanager
    async def mutation(self) -> AsyncIterator[Mutation]:
        async with self._lock:
            async with self.store.transaction() as txn:
                change = Mutation(txn)
                yield change
                for (kind, _), obj in change.puts.items():
                    await txn.put(kind, self.codecs[kind].encode(obj))
                for kind, obj_id in change.deletes:
                    await txn.delete(kind, obj_id)
            for (kind, obj_id), obj in change.puts.items():
                self.pools[kind][obj_id] = obj
                self._notify(kind, obj_id, obj)
            for kind, obj_id in change.deletes:
                self.pools[kind].pop(obj_id, None)
                self._notify(kind, obj_id, None)

    def _notify(self, kind: str, obj_id: int, obj: Any | None) -> None:
        for listener in self.listeners:
            listener(kind, obj_id, obj)
