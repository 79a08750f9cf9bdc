"""The SQLite queue backend: the embedded default, durable across restarts, shared by every
worker process that opens the same file.

One connection per handle, used only from one dedicated thread (as `state/sqlite.py` does), so
calls never block the event loop. Every write is one `BEGIN IMMEDIATE` transaction, which SQLite
serialises across connections and processes: a claim is a single `UPDATE ... RETURNING` over the
ids a sub-select picked, so two processes claiming at once never get the same job. A batch of
jobs or outcomes is one transaction, which is where the speed comes from (WAL, synchronous=NORMAL:
a commit survives a killed process; only a power cut may lose the last ones).

A lease token is random per claim call and stored on each job it leased; settling matches
(id, token), so a token from an expired lease, or one already used, matches nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from bridgeway.jobs.queues.backend import Job, NewJob, Outcome, QueueStats
from bridgeway.state.sqlite import open_sqlite

QUEUED, LEASED, DONE, DEAD = 0, 1, 2, 3
STATE_NAMES = ("queued", "leased", "done", "dead")
SWEEP_EVERY = 30.0  # seconds between deletes of done jobs past their retention
POLL = 0.02  # how often an idle waiter looks again for jobs another process queued

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    state INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    run_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    payload BLOB NOT NULL,
    headers BLOB,
    lease TEXT,
    lease_until REAL,
    last_error TEXT,
    finished_at REAL,
    idempotency_key TEXT,
    callback_url TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (queue, priority DESC, run_at, id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (queue, lease_until) WHERE state = 1;
CREATE INDEX IF NOT EXISTS jobs_dead ON jobs (queue, id) WHERE state = 3;
CREATE INDEX IF NOT EXISTS jobs_done ON jobs (finished_at) WHERE state = 2;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (queue, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Jobs per queue and state, kept by triggers in the same transactions as the jobs (any process,
-- any version that writes the file keeps them): `stats` reads a row instead of counting a
-- backlog (a count(*) of 50,000 queued jobs took ~30 ms of this thread, every /queues call).
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS job_counts (
    queue TEXT NOT NULL,
    state INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (queue, state)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS job_counts_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_counts VALUES (NEW.queue, NEW.state, 1)
        ON CONFLICT (queue, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS job_counts_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE queue = OLD.queue AND state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS job_counts_move AFTER UPDATE OF state ON jobs
    WHEN OLD.state != NEW.state BEGIN
    UPDATE job_counts SET n = n - 1 WHERE queue = OLD.queue AND state = OLD.state;
    INSERT INTO job_counts VALUES (NEW.queue, NEW.state, 1)
        ON CONFLICT (queue, state) DO UPDATE SET n = n + 1;
END;
-- A file from before the counts: count once, in the transaction that made the triggers.
INSERT INTO job_counts SELECT queue, state, count(*) FROM jobs
    WHERE NOT EXISTS (SELECT 1 FROM job_counts) GROUP BY queue, state;
COMMIT;
"""

COLUMNS = (
    "id, queue, payload, headers, priority, state, attempts, max_attempts, created_at, run_at, "
    "lease, lease_until, last_error, finished_at, idempotency_key, callback_url"
)


def _job(row: tuple) -> Job:
    headers = row[3]
    return Job(
        row[0],
        row[1],
        row[2],
        orjson.loads(headers) if headers else {},
        row[4],
        STATE_NAMES[row[5]],
        *row[6:],
    )


class SqliteQueue:
    def __init__(self, path: str | Path, *, retention: float = 7 * 86400.0, busy_timeout: float = 10.0):
        self.path = str(path)
        self.retention = retention
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridgeway-queue")
        self._conn = open_sqlite(self.path, SCHEMA, busy_timeout=busy_timeout)
        self._next_sweep = 0.0
        self._waiters: dict[str, asyncio.Event] = {}
        # Wakes so far per queue, and how many the last claim had seen: a job enqueued between a
        # claim that found nothing and the wait that follows it must not sleep a poll interval.
        self._wakes: dict[str, int] = {}
        self._seen: dict[str, int] = {}

    async def open(self) -> None:
        """Nothing to do: the file was opened (and its schema made) by the constructor."""

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _write(self, fn: Any, *args: Any) -> Any:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(*args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    # -- enqueue ---------------------------------------------------------------------------

    def _enqueue(self, jobs: list[NewJob], now: float) -> list[tuple[Job, bool]]:
        conn = self._conn
        out: list[tuple[Job, bool] | None] = [None] * len(jobs)
        rows = []
        seen: dict[tuple[str, str], int] = {}  # the same key twice in one batch: one job
        for i, new in enumerate(jobs):
            key = new.idempotency_key
            if key is not None:
                first = seen.get((new.queue, key))
                if first is not None:
                    out[i] = (out[first][0], False)
                    continue
                row = conn.execute(
                    f"SELECT {COLUMNS} FROM jobs WHERE queue = ? AND idempotency_key = ?", (new.queue, key)
                ).fetchone()
                if row is not None:
                    out[i] = (_job(row), False)
                    seen[(new.queue, key)] = i
                    continue
                seen[(new.queue, key)] = i
            run_at = new.run_at or now
            headers = orjson.dumps(new.headers) if new.headers else None
            rows.append(
                (
                    new.id,
                    new.queue,
                    new.priority,
                    run_at,
                    new.max_attempts,
                    now,
                    new.payload,
                    headers,
                    key,
                    new.callback_url,
                )
            )
            out[i] = (
                Job(
                    new.id,
                    new.queue,
                    new.payload,
                    dict(new.headers),
                    new.priority,
                    "queued",
                    0,
                    new.max_attempts,
                    now,
                    run_at,
                    idempotency_key=key,
                    callback_url=new.callback_url,
                ),
                True,
            )
        conn.executemany(
            "INSERT INTO jobs (id, queue, state, priority, run_at, attempts, max_attempts, created_at, "
            "payload, headers, idempotency_key, callback_url) VALUES (?, ?, 0, ?, ?, 0, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        return out  # type: ignore[return-value]

    async def enqueue(self, jobs: list[NewJob], now: float) -> list[tuple[Job, bool]]:
        if not jobs:
            return []
        result = await self._run(self._write, self._enqueue, jobs, now)
        for queue in {j.queue for j in jobs}:
            self._wake(queue)
        return result

    # -- claim -----------------------------------------------------------------------------

    def _expire(self, queue: str, now: float) -> None:
        """Leases past their time: back to queued, or dead when they used their last attempt."""
        self._conn.execute(
            "UPDATE jobs SET state = CASE WHEN attempts >= max_attempts THEN 3 ELSE 0 END, "
            "finished_at = CASE WHEN attempts >= max_attempts THEN ? END, "
            "lease = NULL, lease_until = NULL, last_error = 'lease expired' "
            "WHERE queue = ? AND state = 1 AND lease_until <= ?",
            (now, queue, now),
        )

    def _claim(self, queue: str, limit: int, lease: float, now: float) -> list[Job]:
        self._expire(queue, now)
        token = os.urandom(12).hex()
        rows = self._conn.execute(
            f"UPDATE jobs SET state = 1, attempts = attempts + 1, lease = ?, lease_until = ? "
            f"WHERE id IN (SELECT id FROM jobs WHERE queue = ? AND state = 0 AND run_at <= ? "
            f"ORDER BY priority DESC, run_at, id LIMIT ?) RETURNING {COLUMNS}",
            (token, now + lease, queue, now, limit),
        ).fetchall()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_EVERY
            self._conn.execute(
                "DELETE FROM jobs WHERE state = 2 AND finished_at < ?", (now - self.retention,)
            )
        jobs = [_job(r) for r in rows]
        jobs.sort(key=lambda j: (-j.priority, j.run_at, j.id))  # RETURNING keeps no order
        return jobs

    def _claim_any(self, queue: str, limit: int, lease: float, now: float) -> list[Job]:
        # A read first: an idle queue, polled by loops and long-polls, never takes the write lock.
        if not self._claimable(queue, now):
            return []
        return self._write(self._claim, queue, limit, lease, now)

    async def claim(self, queue: str, limit: int, lease: float, now: float) -> list[Job]:
        if limit <= 0:
            return []
        self._seen[queue] = self._wakes.get(queue, 0)
        return await self._run(self._claim_any, queue, limit, lease, now)

    # -- settle ----------------------------------------------------------------------------

    def _ack_many(self, outcomes: list[Outcome], now: float) -> dict[str, Job]:
        """Acks, the bulk of any batch: one UPDATE per lease token (a claim's batch shares one)."""
        by_lease: dict[str, list[str]] = {}
        for o in outcomes:
            by_lease.setdefault(o.lease, []).append(o.job_id)
        done: dict[str, Job] = {}
        for lease, ids in by_lease.items():
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows = self._conn.execute(
                    "UPDATE jobs SET state = 2, lease = NULL, lease_until = NULL, finished_at = ? "
                    f"WHERE state = 1 AND lease = ? AND id IN ({','.join('?' * len(chunk))}) "
                    f"RETURNING {COLUMNS}",
                    (now, lease, *chunk),
                ).fetchall()
                done.update((row[0], _job(row)) for row in rows)
        return done

    def _settle(self, outcomes: list[Outcome], now: float) -> list[Job | None]:
        conn = self._conn
        acked = self._ack_many([o for o in outcomes if o.action == "ack"], now)
        out: list[Job | None] = []
        for o in outcomes:
            where = "WHERE id = ? AND lease = ? AND state = 1"
            if o.action == "ack":
                out.append(acked.pop(o.job_id, None))  # an id twice in one batch: settled once
                continue
            if o.action == "retry":
                sql = (
                    "UPDATE jobs SET state = 0, lease = NULL, lease_until = NULL, run_at = ?, "
                    f"last_error = ? {where}"
                )
                args: tuple = (o.at if o.at is not None else now, o.error, o.job_id, o.lease)
            elif o.action == "bury":
                sql = (
                    "UPDATE jobs SET state = 3, lease = NULL, lease_until = NULL, finished_at = ?, "
                    f"last_error = ? {where}"
                )
                args = (now, o.error, o.job_id, o.lease)
            elif o.action == "extend":
                sql = f"UPDATE jobs SET lease_until = ? {where} AND lease_until > ?"
                args = (o.at, o.job_id, o.lease, now)
            else:
                raise ValueError(f"unknown outcome action {o.action!r}")
            row = conn.execute(sql + f" RETURNING {COLUMNS}", args).fetchone()
            out.append(_job(row) if row else None)
        return out

    async def settle(self, outcomes: list[Outcome], now: float) -> list[Job | None]:
        if not outcomes:
            return []
        result = await self._run(self._write, self._settle, outcomes, now)
        for queue in {j.queue for j in result if j is not None and j.state == "queued"}:
            self._wake(queue)
        return result

    # -- reading and dead letters ----------------------------------------------------------

    # A done job past its retention is gone even before the next sweep deletes it.
    _KEPT = "(state != 2 OR finished_at >= ?)"

    def _get(self, job_id: str) -> Job | None:
        row = self._conn.execute(
            f"SELECT {COLUMNS} FROM jobs WHERE id = ? AND {self._KEPT}",
            (job_id, time.time() - self.retention),
        ).fetchone()
        return _job(row) if row else None

    async def get(self, job_id: str) -> Job | None:
        return await self._run(self._get, job_id)

    def _get_many(self, job_ids: list[str]) -> list[Job | None]:
        found: dict[str, Job] = {}
        for start in range(0, len(job_ids), 500):  # SQLite's bound-parameter limit
            chunk = job_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT {COLUMNS} FROM jobs WHERE id IN ({marks}) AND {self._KEPT}"
            for row in self._conn.execute(sql, (*chunk, time.time() - self.retention)):
                found[row[0]] = _job(row)
        return [found.get(i) for i in job_ids]

    async def get_many(self, job_ids: list[str]) -> list[Job | None]:
        return await self._run(self._get_many, job_ids) if job_ids else []

    def _dead(self, queue: str, limit: int, after: str | None) -> list[Job]:
        rows = self._conn.execute(
            f"SELECT {COLUMNS} FROM jobs WHERE queue = ? AND state = 3 AND id > ? ORDER BY id LIMIT ?",
            (queue, after or "", limit),
        ).fetchall()
        return [_job(r) for r in rows]

    async def dead(self, queue: str, limit: int = 100, after: str | None = None) -> list[Job]:
        return await self._run(self._dead, queue, limit, after)

    def _replay(self, queue: str, ids: list[str] | None, now: float) -> int:
        sql = (
            "UPDATE jobs SET state = 0, attempts = 0, run_at = ?, finished_at = NULL "
            "WHERE queue = ? AND state = 3"
        )
        if ids is None:
            return self._conn.execute(sql, (now, queue)).rowcount
        return sum(self._conn.execute(sql + " AND id = ?", (now, queue, i)).rowcount for i in ids)

    async def replay(self, queue: str, ids: list[str] | None, now: float) -> int:
        count = await self._run(self._write, self._replay, queue, ids, now)
        if count:
            self._wake(queue)
        return count

    def _purge(self, queue: str) -> int:
        return self._conn.execute("DELETE FROM jobs WHERE queue = ? AND state = 3", (queue,)).rowcount

    async def purge(self, queue: str) -> int:
        return await self._run(self._write, self._purge, queue)

    def _stats(self, queue: str, now: float) -> QueueStats:
        conn = self._conn
        counts = dict(conn.execute("SELECT state, n FROM job_counts WHERE queue = ?", (queue,)).fetchall())
        # The oldest due job: the first of each priority level in the due index, found level by
        # level (a few seeks; min(run_at) over the queue would walk every queued job).
        oldest = None
        level = conn.execute(
            "SELECT max(priority) FROM jobs WHERE queue = ? AND state = 0", (queue,)
        ).fetchone()[0]
        while level is not None:
            first = conn.execute(
                "SELECT run_at FROM jobs WHERE queue = ? AND state = 0 AND priority = ? "
                "ORDER BY run_at LIMIT 1",
                (queue, level),
            ).fetchone()[0]
            if first <= now and (oldest is None or first < oldest):
                oldest = first
            level = conn.execute(
                "SELECT max(priority) FROM jobs WHERE queue = ? AND state = 0 AND priority < ?",
                (queue, level),
            ).fetchone()[0]
        return QueueStats(
            counts.get(QUEUED, 0),
            counts.get(LEASED, 0),
            counts.get(DEAD, 0),
            max(0.0, now - oldest) if oldest is not None else 0.0,
        )

    async def stats(self, queue: str, now: float) -> QueueStats:
        return await self._run(self._stats, queue, now)

    # -- waiting ---------------------------------------------------------------------------

    def _wake(self, queue: str) -> None:
        self._wakes[queue] = self._wakes.get(queue, 0) + 1
        event = self._waiters.pop(queue, None)
        if event is not None:
            event.set()

    def _claimable(self, queue: str, now: float) -> bool:
        conn = self._conn
        return (
            conn.execute(
                "SELECT 1 FROM jobs WHERE queue = ? AND state = 0 AND run_at <= ? LIMIT 1", (queue, now)
            ).fetchone()
            is not None
            or conn.execute(
                "SELECT 1 FROM jobs WHERE queue = ? AND state = 1 AND lease_until <= ? LIMIT 1", (queue, now)
            ).fetchone()
            is not None
        )

    async def wait(self, queue: str, timeout: float) -> None:
        """Woken at once by this process's enqueues; jobs another process queued, and delayed
        jobs falling due, are seen by a look every POLL seconds (one indexed read)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._wakes.get(queue, 0) != self._seen.get(queue, 0):
                self._seen[queue] = self._wakes[queue]
                return  # something came since the last claim looked
            left = deadline - loop.time()
            if left <= 0:
                return
            event = self._waiters.get(queue)
            if event is None:
                event = self._waiters[queue] = asyncio.Event()
            try:
                await asyncio.wait_for(event.wait(), min(left, POLL))
            except TimeoutError:
                if await self._run(self._claimable, queue, time.time()):
                    return
            else:
                self._seen[queue] = self._wakes.get(queue, 0)
                return

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._run(self._conn.close)
        self._executor.shutdown(wait=False)
        self._executor = None  # type: ignore[assignment]
