"""SQLite (WAL) KV: the embedded default. Durable, and shared by worker processes on one machine.

One connection per handle, used only from one dedicated worker thread, so calls never block the
event loop and need no locking here. Writes are single `BEGIN IMMEDIATE` transactions, which
SQLite serialises across connections and processes (waiting up to `busy_timeout`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bridgeway.state.base import Entry, check_put, check_version, prefix_end

SWEEP_EVERY = 30.0  # seconds between opportunistic deletes of expired rows

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    version INTEGER NOT NULL,
    expires_at REAL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires_at) WHERE expires_at IS NOT NULL;
"""

LIVE = "(expires_at IS NULL OR expires_at > ?)"


def _use_wal(conn: sqlite3.Connection, wait: float) -> None:
    """Switch the file to WAL once. Changing the journal mode needs the file to itself, and
    SQLite answers "database is locked" at once, without its busy wait, while another process
    (a sibling worker starting, say) holds it: so check first, and retry for up to `wait`."""
    deadline = time.monotonic() + wait
    while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def open_sqlite(path: str, schema: str, *, busy_timeout: float = 10.0) -> sqlite3.Connection:
    """A connection to one of Bridgeway's SQLite files, in WAL mode with `schema` applied: the KV,
    the queues, the event log and the LLM ledger each open theirs so, and use it from one thread
    of their own (autocommit; writes in explicit BEGIN IMMEDIATE transactions)."""
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    try:
        if path != ":memory:":
            _use_wal(conn, busy_timeout)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(schema)
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteKV:
    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0) -> None:
        self.path = str(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridgeway-sqlite")
        # Opened here (synchronously, so a bad path fails at open_state); used only in the executor.
        self._conn = open_sqlite(self.path, SCHEMA, busy_timeout=busy_timeout)
        self._next_sweep = 0.0

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _current(self, ns: str, key: str, now: float) -> int | None:
        row = self._conn.execute(
            f"SELECT version FROM kv WHERE ns = ? AND key = ? AND {LIVE}", (ns, key, now)
        ).fetchone()
        return row[0] if row else None

    def _write(self, fn: Any, *args: Any) -> Any:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(*args)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        return result

    def _get(self, ns: str, key: str) -> Entry | None:
        row = self._conn.execute(
            f"SELECT value, version, expires_at FROM kv WHERE ns = ? AND key = ? AND {LIVE}",
            (ns, key, time.time()),
        ).fetchone()
        return Entry(*row) if row else None

    def _put(
        self, ns: str, key: str, value: bytes, expires_at: float | None, if_version: int | None
    ) -> Entry:
        now = time.time()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_EVERY
            self._conn.execute("DELETE FROM kv WHERE expires_at <= ?", (now,))
        current = self._current(ns, key, now)  # an expired row counts as absent: versions restart
        check_version(ns, key, if_version, current)
        entry = Entry(value, (current or 0) + 1, expires_at)
        self._conn.execute(
            "INSERT INTO kv (ns, key, value, version, expires_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, version = excluded.version, "
            "expires_at = excluded.expires_at",
            (ns, key, value, entry.version, expires_at),
        )
        return entry

    def _delete(self, ns: str, key: str, if_version: int | None) -> bool:
        current = self._current(ns, key, time.time())
        check_version(ns, key, if_version, current)
        self._conn.execute("DELETE FROM kv WHERE ns = ? AND key = ?", (ns, key))  # also drops an expired row
        return current is not None

    def _list(self, ns: str, prefix: str, limit: int, after: str | None) -> list[tuple[str, Entry]]:
        sql, args = (
            f"SELECT key, value, version, expires_at FROM kv WHERE ns = ? AND {LIVE}",
            [ns, time.time()],
        )
        if after is not None and after >= prefix:
            sql += " AND key > ?"
            args.append(after)
        else:
            sql += " AND key >= ?"
            args.append(prefix)
        if (end := prefix_end(prefix)) is not None:
            sql += " AND key < ?"
            args.append(end)
        sql += " ORDER BY key LIMIT ?"
        args.append(limit)
        return [(k, Entry(v, ver, exp)) for k, v, ver, exp in self._conn.execute(sql, args)]

    async def get(self, namespace: str, key: str) -> Entry | None:
        return await self._run(self._get, namespace, key)

    async def put(
        self,
        namespace: str,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        if_version: int | None = None,
    ) -> Entry:
        value, expires_at = check_put(value, ttl, if_version)
        return await self._run(self._write, self._put, namespace, key, value, expires_at, if_version)

    async def delete(self, namespace: str, key: str, *, if_version: int | None = None) -> bool:
        return await self._run(self._write, self._delete, namespace, key, if_version)

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 100, after: str | None = None
    ) -> list[tuple[str, Entry]]:
        if limit <= 0:
            return []
        return await self._run(self._list, namespace, prefix, limit, after)

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._run(self._conn.close)
        self._executor.shutdown(wait=False)
        self._executor = None  # type: ignore[assignment]
