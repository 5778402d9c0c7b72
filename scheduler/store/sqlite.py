"""The state store: one SQLite file, written only by the daemon (every client goes through its API).

Every object kind has a pool table holding the object's XML body plus the columns the daemon
looks objects up by (name, owner, group, parent). Ids come from a ``sequences`` table so an id
that was ever committed is never handed out again, even after its object is deleted. The schema
evolves through ``MIGRATIONS``, applied in order according to ``PRAGMA user_version``.

The store runs on one aiosqlite connection. Transactions are serialised by an asyncio lock, so a
task never observes another task's uncommitted writes; opening a transaction inside another one
in the same task is a programming error and raises instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from scheduler.errors import StoreError

log = logging.getLogger(__name__)

KINDS = ("user", "group", "host", "datastore", "image", "vm", "template", "schedaction", "backupjob")

# "vmsc": marks the file as a vmsched store for `file(1)` and for the check in `Store.open`.
APPLICATION_ID = 0x766D7363
BUSY_TIMEOUT_MS = 5000


def _pool_tables(*kinds: str) -> tuple[str, ...]:
    """DDL for the pools of ``kinds``: table, lookup indexes, id-sequence trigger.

    Shipped migrations call this, so its output must never change: a different pool layout
    needs a new helper and a new migration.
    """
    statements: list[str] = []
    for kind in kinds:
        table = f"{kind}_pool"
        statements += [
            f"CREATE TABLE {table} (oid INTEGER PRIMARY KEY, name TEXT NOT NULL, uid INTEGER NOT NULL,"
            f" gid INTEGER NOT NULL, parent INTEGER NOT NULL DEFAULT -1, body TEXT NOT NULL)",
            f"CREATE INDEX {table}_name ON {table} (name)",
            f"CREATE INDEX {table}_uid ON {table} (uid)",
            f"CREATE INDEX {table}_parent ON {table} (parent)",
            # An object stored with an explicit id moves its sequence past that id, so new_id can
            # never hand it out again.
            f"CREATE TRIGGER {table}_sequence AFTER INSERT ON {table} BEGIN"
            f" INSERT OR IGNORE INTO sequences (kind, next_id) VALUES ('{kind}', 0);"
            f" UPDATE sequences SET next_id = max(next_id, NEW.oid + 1) WHERE kind = '{kind}'; END",
        ]
    return tuple(statements)


# Migration N (1-based) takes the schema from version N-1 to N, in one transaction. Never edit a
# step that has shipped: append a new one. A new object kind needs both a KINDS entry and a step
# creating its pool (`_pool_tables("newkind")`); the run journal will be a step of its own.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"PRAGMA application_id = {APPLICATION_ID}",
        "CREATE TABLE sequences (kind TEXT PRIMARY KEY, next_id INTEGER NOT NULL) WITHOUT ROWID",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        *_pool_tables("user", "group", "host", "datastore", "image", "vm", "template", "schedaction", "backupjob"),
    ),
    # 2: the run journal (scheduler/engine/journal.py); these statements are frozen here once shipped.
    (
        "CREATE TABLE runs (id INTEGER PRIMARY KEY, action_id INTEGER, vm_id INTEGER NOT NULL, action TEXT NOT NULL,"
        " args TEXT NOT NULL, scheduled INTEGER NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL,"
        " not_before REAL NOT NULL, queued_at REAL NOT NULL, started_at REAL, finished_at REAL,"
        " host_id INTEGER NOT NULL, datastore_id INTEGER NOT NULL, priority INTEGER NOT NULL,"
        " message TEXT NOT NULL, steps TEXT NOT NULL)",
        "CREATE INDEX runs_open ON runs (state) WHERE state IN ('queued', 'running')",
        "CREATE INDEX runs_vm ON runs (vm_id, id)",
    ),
    # 3: how each run ended, as data (scheduler/engine/outcome.py): its kind and the exception's class.
    (
        "ALTER TABLE runs ADD COLUMN outcome TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE runs ADD COLUMN error_class TEXT NOT NULL DEFAULT ''",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Row:
    """One stored object: its indexed columns and its XML body."""

    id: int
    name: str
    uid: int
    gid: int
    body: str
    parent: int = -1


@dataclass(frozen=True)
class _PoolSql:
    load: str
    get: str
    put: str
    delete: str


def _pool_sql(kind: str) -> _PoolSql:
    table = f"{kind}_pool"
    columns = "oid, name, uid, gid, body, parent"
    return _PoolSql(
        load=f"SELECT {columns} FROM {table} ORDER BY oid",
        get=f"SELECT {columns} FROM {table} WHERE oid = ?",
        put=f"INSERT INTO {table} ({columns}) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (oid) DO UPDATE SET"
        " name = excluded.name, uid = excluded.uid, gid = excluded.gid, body = excluded.body,"
        " parent = excluded.parent",
        delete=f"DELETE FROM {table} WHERE oid = ?",
    )


_POOLS = {kind: _pool_sql(kind) for kind in KINDS}

# First id of every kind is 0, as in OpenNebula (oneadmin is user 0, its group is group 0).
_NEW_ID = (
    "INSERT INTO sequences (kind, next_id) VALUES (?, 1)"
    " ON CONFLICT (kind) DO UPDATE SET next_id = next_id + 1 RETURNING next_id - 1"
)


def _pool(kind: str) -> _PoolSql:
    try:
        return _POOLS[kind]
    except KeyError:
        raise ValueError(f"unknown object kind {kind!r}; known kinds: {', '.join(KINDS)}") from None


class Txn:
    """The operations of one open transaction; valid only inside its ``async with`` block."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._open = True

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if not self._open:
            raise RuntimeError("transaction already finished")
        return await self._store._fetch(sql, params)

    async def new_id(self, kind: str) -> int:
        """The next id of ``kind``; ids of committed objects are never handed out again."""
        _pool(kind)
        [(oid,)] = await self._fetch(_NEW_ID, (kind,))
        return int(oid)

    async def put(self, kind: str, row: Row) -> None:
        """Insert ``row``, or replace the stored row with the same id."""
        sql = _pool(kind)
        if row.id < 0:
            raise ValueError(f"{kind} id must be >= 0, got {row.id}")
        await self._fetch(sql.put, (row.id, row.name, row.uid, row.gid, row.body, row.parent))

    async def delete(self, kind: str, id: int) -> None:
        """Remove the row; a missing row is not an error."""
        await self._fetch(_pool(kind).delete, (id,))

    async def put_many(self, kind: str, rows: Sequence[Row]) -> None:
        """Insert or replace many rows in one round trip to the database thread."""
        if any(row.id < 0 for row in rows):
            raise ValueError(f"{kind} ids must be >= 0")
        params = [(r.id, r.name, r.uid, r.gid, r.body, r.parent) for r in rows]
        await self._execute_many(_pool(kind).put, params)

    async def delete_many(self, kind: str, ids: Sequence[int]) -> None:
        await self._execute_many(_pool(kind).delete, [(i,) for i in ids])

    async def execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """A statement of the caller's own tables (e.g. the run journal) over many parameter rows."""
        await self._execute_many(sql, params)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self._fetch(sql, params)

    async def _execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        if not self._open:
            raise RuntimeError("transaction already finished")
        if params:
            await self._store._execute_many(sql, params)

    async def get(self, kind: str, id: int) -> Row | None:
        rows = await self._fetch(_pool(kind).get, (id,))
        return Row(*rows[0]) if rows else None

    async def put_meta(self, key: str, value: str) -> None:
        await self._fetch(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def get_meta(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None


class Store:
    """The daemon's handle on the state file. Create with ``await Store.open(path)``."""

    def __init__(self, path: Path, conn: aiosqlite.Connection, schema_version: int) -> None:
        self.path = path
        self._conn = conn
        self._schema_version = schema_version
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Open (creating if needed) the store at ``path`` and bring its schema up to date."""
        path = Path(path)
        try:
            await asyncio.to_thread(_create_private_file, path)
            conn = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{path}: cannot open the state database: {e}") from e
        try:
            version = await _prepare(conn, path)
        except BaseException:
            await conn.close()
            raise
        log.info("state database %s at schema version %s", path, version)
        return cls(path, conn, version)

    @property
    def schema_version(self) -> int:
        return self._schema_version

    @property
    def busy(self) -> bool:
        """A transaction is open (work may be in flight on the database thread)."""
        return self._lock.locked()

    async def close(self) -> None:
        """Checkpoint the WAL into the main file and close; waits for a running transaction."""
        async with self._exclusive():
            if self._closed:
                return
            self._closed = True
            try:
                await _sql(self._conn, "PRAGMA optimize")
                await _sql(self._conn, "PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                await self._conn.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def load(self, kind: str) -> list[Row]:
        """All rows of ``kind``, ordered by id."""
        sql = _pool(kind).load
        async with self._reading():
            rows = await self._fetch(sql)
        return [Row(*row) for row in rows]

    async def get_meta(self, key: str) -> str | None:
        async with self._reading():
            return await Txn(self).get_meta(key)

    async def put_meta(self, key: str, value: str) -> None:
        async with self.transaction() as txn:
            await txn.put_meta(key, value)

    async def write_batch(self, ops: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        """Many statements in one transaction, in one trip to the database thread (group commit).

        ``ops`` are (sql, parameter rows) pairs; pool writes can be built with ``put_sql(kind)`` and
        ``delete_sql(kind)``. Committed or rolled back as a whole on the database thread; a caller
        cancelled meanwhile does not learn which (the state's flush task is never cancelled).
        """
        async with self._exclusive():
            try:
                # The function runs to its end on the database thread whatever happens to the caller.
                await self._conn._execute(_apply_batch, self._conn, ops)  # type: ignore[no-untyped-call]
            except sqlite3.Error as e:
                raise _store_error(self.path, e) from e

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Txn]:
        """One SQLite transaction: committed when the block exits normally, rolled back otherwise."""
        async with self._exclusive():
            if self._conn.in_transaction:  # left open by a commit/rollback that failed
                await self._conn.rollback()
            await self._fetch("BEGIN IMMEDIATE")
            txn = Txn(self)
            try:
                yield txn
                txn._open = False
                await run_to_completion(self._fetch("COMMIT"))
            except BaseException:
                txn._open = False
                await run_to_completion(self._conn.rollback())
                raise

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        if self._owner is asyncio.current_task():
            raise RuntimeError("a transaction is already open in this task; transactions do not nest")
        async with self._lock:
            self._owner = asyncio.current_task()
            try:
                yield
            finally:
                self._owner = None

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[None]:
        """Reads wait for other tasks' transactions, but may run inside the caller's own."""
        if self._owner is not None and self._owner is asyncio.current_task():
            yield
            return
        async with self._exclusive():
            yield

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return await _sql(self._conn, sql, params)
        except sqlite3.Error as e:
            raise _store_error(self.path, e) from e

    async def _execute_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        try:
            cursor = await self._conn.executemany(sql, params)
            await cursor.close()
        except sqlite3.Error as e:
            raise _store_error(self.path, e) from e

    async def sequences(self) -> dict[str, int]:
        """The next id of every kind that has handed out ids."""
        async with self._reading():
            rows = await self._fetch("SELECT kind, next_id FROM sequences")
        return {kind: int(next_id) for kind, next_id in rows}

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """A read of the caller's own tables, outside any transaction of another task."""
        async with self._reading():
            return await self._fetch(sql, params)


def put_sql(kind: str) -> str:
    """The upsert of one pool row: parameters (id, name, uid, gid, body, parent)."""
    return _pool(kind).put


def delete_sql(kind: str) -> str:
    return _pool(kind).delete


def row_params(row: Row) -> tuple[Any, ...]:
    return (row.id, row.name, row.uid, row.gid, row.body, row.parent)


def _apply_batch(conn: aiosqlite.Connection, ops: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
    """Runs on the database thread: BEGIN, every statement, COMMIT; ROLLBACK on any error."""
    raw = conn._conn
    raw.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in ops:
            if params:
                raw.executemany(sql, params)
        raw.execute("COMMIT")
    except BaseException:
        if raw.in_transaction:
            raw.execute("ROLLBACK")
        raise


def _store_error(path: Path, error: sqlite3.Error) -> StoreError:
    """A StoreError naming the file, saying plainly when the file itself is damaged."""
    detail = str(error)[:200]
    if getattr(error, "sqlite_errorname", "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return StoreError(f"{path}: corrupt or not an SQLite database ({detail}); restore it from a backup")
    return StoreError(f"{path}: {detail}")


async def _sql(conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """Run one statement to its end (no statement is left half-stepped) and return its rows."""
    return list(await conn.execute_fetchall(sql, params))


async def run_to_completion(operation: Awaitable[Any]) -> None:
    """Finish ``operation`` even if the task is cancelled meanwhile, then deliver the cancellation.

    A COMMIT or ROLLBACK is always carried out before the caller sees an exception, so the outcome
    of a transaction is settled when control leaves ``Store.transaction``.
    """
    task = asyncio.ensure_future(operation)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            await asyncio.wait([task])
        raise


def _create_private_file(path: Path) -> None:
    """Create the file (and its parent directories) readable by the owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


async def _prepare(conn: aiosqlite.Connection, path: Path) -> int:
    """Check the file is ours, set the connection up, and migrate; returns the schema version."""
    try:
        await _sql(conn, f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version, app_id, tables = await _identify(conn)
        _check_identity(path, version, app_id, tables)
        await _configure(conn, path)
        await _check_integrity(conn, path)
        return await _migrate(conn, path, version)
    except sqlite3.Error as e:
        raise _store_error(path, e) from e


async def _identify(conn: aiosqlite.Connection) -> tuple[int, int, int]:
    [(version,)] = await _sql(conn, "PRAGMA user_version")
    [(app_id,)] = await _sql(conn, "PRAGMA application_id")
    [(tables,)] = await _sql(conn, "SELECT count(*) FROM sqlite_master WHERE type = 'table'")
    return int(version), int(app_id), int(tables)


def _check_identity(path: Path, version: int, app_id: int, tables: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: schema version {version} is newer than this vmsched supports ({SCHEMA_VERSION}); upgrade vmsched"
        )
    foreign = app_id != APPLICATION_ID if version else tables > 0
    if foreign:
        raise StoreError(f"{path}: an SQLite database that is not a vmsched state database; refusing to use it")


async def _configure(conn: aiosqlite.Connection, path: Path) -> None:
    [(mode,)] = await _sql(conn, "PRAGMA journal_mode = WAL")
    if str(mode).lower() != "wal":
        raise StoreError(f"{path}: cannot use write-ahead logging on this file system (journal mode {mode})")
    await _sql(conn, "PRAGMA synchronous = FULL")
    await _sql(conn, "PRAGMA foreign_keys = ON")


async def _check_integrity(conn: aiosqlite.Connection, path: Path) -> None:
    problems = [row[0] for row in await _sql(conn, "PRAGMA quick_check")]
    if problems != ["ok"]:
        detail = "; ".join(problems[:3]).replace("\n", " ")
        raise StoreError(f"{path}: the state database is corrupt ({detail}); restore it from a backup")


async def _migrate(conn: aiosqlite.Connection, path: Path, version: int) -> int:
    for target in range(version + 1, SCHEMA_VERSION + 1):
        await _apply_step(conn, path, target, MIGRATIONS[target - 1])
    return SCHEMA_VERSION


async def _apply_step(conn: aiosqlite.Connection, path: Path, target: int, statements: Iterable[str]) -> None:
    await _sql(conn, "BEGIN IMMEDIATE")
    try:
        [(current,)] = await _sql(conn, "PRAGMA user_version")
        if current >= target:  # another process migrated meanwhile
            await conn.rollback()
            return
        for statement in statements:
            await _sql(conn, statement)
        await _sql(conn, f"PRAGMA user_version = {int(target)}")
        await _sql(conn, "COMMIT")
    except BaseException as e:
        await conn.rollback()
        if isinstance(e, sqlite3.Error):
            raise StoreError(f"{path}: migration to schema version {target} failed: {str(e)[:200]}") from e
        raise
    log.info("state database %s migrated to schema version %s", path, target)
