"""The event log: an ordered, append-only, trimmed sequence of events, on SQLite, Redis or NATS.

Every event appended gets the next sequence number of its log (1, 2, 3, ...; never reused, also
after trimming). The sequence number is the event's position and the id a subscriber resumes
from: SSE `id:` lines carry it, and `read(after=n)` answers what came after it. An event also
keeps its own `event_id` (the publisher's, or one generated), which is what dedupe looks at: an
event_id appended again within `dedupe_window` seconds is not stored twice, and the append
answers the sequence number the first one got.

Three backends keep the same contract (one conformance suite runs against all three):

- SQLite: a table with an INTEGER PRIMARY KEY AUTOINCREMENT (numbers never reused) and a table of
  recent event ids; an append is one `BEGIN IMMEDIATE` transaction, which SQLite serialises
  across the worker processes sharing the file. Other processes' appends are noticed through
  `PRAGMA data_version`, a cheap poll.
- Redis: a stream with explicit ids `0-<seq>` from an INCR counter, appended by one Lua script
  (dedupe keys with a TTL, XADD with approximate MAXLEN), read with XRANGE; new entries wake
  waiters through one XREAD BLOCK per process on its own connection.
- NATS JetStream: a stream whose own sequence numbers are ours; dedupe is JetStream's
  (`Nats-Msg-Id` within `duplicate_window`), retention its `max_age` / `max_msgs`; reads are
  message gets by sequence, and a core subscription to the stream's subject wakes waiters.

`wait(after, timeout)` is how a subscriber sleeps without spinning: it returns as soon as events
after `after` may exist (a notification where the backend has one), or after `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

TRIM_EVERY = 30.0  # seconds between two retention sweeps of one log, per process


@dataclass(slots=True, frozen=True)
class NewEvent:
    event_id: str
    event_type: str
    body: bytes  # the whole event as JSON, as it is delivered
    at: float  # wall clock when published: retention by age counts from here


@dataclass(slots=True, frozen=True)
class StoredEvent:
    seq: int
    event_id: str
    event_type: str
    body: bytes


@dataclass(slots=True, frozen=True)
class Retention:
    max_age: float = 7 * 86400.0
    max_count: int = 1_000_000
    dedupe_window: float = 120.0


class EventLog(Protocol):
    async def append(self, events: list[NewEvent]) -> list[tuple[int, bool]]:
        """Store a batch in order; (seq, created) per input. created=False: a duplicate event_id
        within the dedupe window, and seq is the first one's."""
        ...

    async def read(self, after: int, limit: int) -> list[StoredEvent]:
        """Up to `limit` events with seq > `after`, in order."""
        ...

    async def last(self) -> int:
        """The highest seq appended so far (0: none yet)."""
        ...

    async def wait(self, after: int, timeout: float) -> None: ...

    async def trim(self, now: float) -> int:
        """Apply retention now; returns how many events were dropped (where the backend knows)."""
        ...

    async def close(self) -> None: ...


class _Changes:
    """Wakes this process's waiters when the log may have grown. A waiter takes the current
    generation before it looks at the log, so a notification between its look and its sleep is
    never lost."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def token(self) -> asyncio.Event:
        return self._event


async def _sleep_on(token: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await token.wait()


class _Watched:
    """`wait` for every backend: a per-process watcher task (started on first use) notifies."""

    _changes: _Changes
    _watcher: asyncio.Task | None

    async def last(self) -> int: ...  # pragma: no cover - provided by the backend

    async def _watch(self) -> None: ...  # pragma: no cover - provided by the backend

    async def wait(self, after: int, timeout: float) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())
        token = self._changes.token()
        if await self.last() > after:
            return
        await _sleep_on(token, timeout)

    async def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._watcher
            self._watcher = None


# -- SQLite ------------------------------------------------------------------------------------


class SqliteEventLog(_Watched):
    POLL = 0.02  # seconds between two looks at PRAGMA data_version while someone waits

    def __init__(self, path: str, name: str, retention: Retention, *, busy_timeout: float = 10.0) -> None:
        from bridgeway.state.sqlite import open_sqlite

        self.retention = retention
        self._events, self._ids = f"events_{name}", f"events_{name}_ids"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridgeway-events")
        self._conn = open_sqlite(
            path,
            f"""
                CREATE TABLE IF NOT EXISTS {self._events} (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    event_id TEXT NOT NULL,
                    event_type TEXT NOT NULL,
                    body BLOB NOT NULL,
                    at REAL NOT NULL
                );
                CREATE TABLE IF NOT EXISTS {self._ids} (
                    event_id TEXT PRIMARY KEY,
                    seq INTEGER NOT NULL,
                    at REAL NOT NULL
                ) WITHOUT ROWID;
                """,
            busy_timeout=busy_timeout,
        )
        self._next_trim = 0.0
        self._changes = _Changes()
        self._watcher = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _append(self, events: list[NewEvent], now: float) -> list[tuple[int, bool]]:
        conn = self._conn
        out: list[tuple[int, bool]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            horizon = now - self.retention.dedupe_window
            for e in events:
                row = conn.execute(
                    f"SELECT seq FROM {self._ids} WHERE event_id = ? AND at > ?", (e.event_id, horizon)
                ).fetchone()
                if row is not None:
                    out.append((row[0], False))
                    continue
                seq = conn.execute(
                    f"INSERT INTO {self._events} (event_id, event_type, body, at) VALUES (?, ?, ?, ?)",
                    (e.event_id, e.event_type, e.body, e.at),
                ).lastrowid
                conn.execute(
                    f"INSERT OR REPLACE INTO {self._ids} (event_id, seq, at) VALUES (?, ?, ?)",
                    (e.event_id, seq, now),
                )
                out.append((seq, True))
            if now >= self._next_trim:
                self._next_trim = now + TRIM_EVERY
                self._trim(now)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out

    def _trim(self, now: float) -> int:
        conn = self._conn
        dropped = conn.execute(f"DELETE FROM {self._events} WHERE at < ?", (now - self.retention.max_age,))
        count = dropped.rowcount
        top = conn.execute(f"SELECT max(seq) FROM {self._events}").fetchone()[0] or 0
        count += conn.execute(
            f"DELETE FROM {self._events} WHERE seq <= ?", (top - self.retention.max_count,)
        ).rowcount
        conn.execute(f"DELETE FROM {self._ids} WHERE at <= ?", (now - self.retention.dedupe_window,))
        return count

    def _trim_now(self, now: float) -> int:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            count = self._trim(now)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        return count

    def _read(self, after: int, limit: int) -> list[StoredEvent]:
        rows = self._conn.execute(
            f"SELECT seq, event_id, event_type, body FROM {self._events} WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return [StoredEvent(*row) for row in rows]

    def _last(self) -> int:
        # sqlite_sequence keeps the highest number ever given, also after the newest rows are trimmed
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (self._events,)).fetchone()
        return row[0] if row else 0

    async def append(self, events: list[NewEvent]) -> list[tuple[int, bool]]:
        if not events:
            return []
        out = await self._run(self._append, events, time.time())
        self._changes.notify()
        return out

    async def read(self, after: int, limit: int) -> list[StoredEvent]:
        return await self._run(self._read, after, limit) if limit > 0 else []

    async def last(self) -> int:
        return await self._run(self._last)

    async def trim(self, now: float) -> int:
        return await self._run(self._trim_now, now)

    async def _watch(self) -> None:
        """Other processes' commits change PRAGMA data_version of this connection."""
        version = None
        while True:
            current = await self._run(lambda: self._conn.execute("PRAGMA data_version").fetchone()[0])
            if version is not None and current != version:
                self._changes.notify()
            version = current
            await asyncio.sleep(self.POLL)

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._stop_watching()
        await self._run(self._conn.close)
        self._executor.shutdown(wait=False)
        self._executor = None  # type: ignore[assignment]


# -- Redis -------------------------------------------------------------------------------------

# KEYS: stream, counter. ARGV: dedupe key prefix, window_ms, maxlen, then per event: id, type,
# body, at. Returns {seq, created} per event. The dedupe keys share the stream's hash tag.
_APPEND = """
local out = {}
for i = 4, #ARGV, 4 do
  local idkey = ARGV[1] .. ARGV[i]
  local seen = redis.call('GET', idkey)
  if seen then
    out[#out + 1] = {tonumber(seen), 0}
  else
    local seq = redis.call('INCR', KEYS[2])
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '0-' .. seq,
               'i', ARGV[i], 't', ARGV[i + 1], 'b', ARGV[i + 2], 'at', ARGV[i + 3])
    redis.call('SET', idkey, seq, 'PX', ARGV[2])
    out[#out + 1] = {seq, 1}
  end
end
return out
"""


def _seq_of(stream_id: bytes) -> int:
    return int(stream_id.partition(b"-")[2])


class RedisEventLog(_Watched):
    def __init__(self, url: str, name: str, retention: Retention, prefix: str = "bw") -> None:
        from bridgeway.state.resp import RespClient

        self.url = url
        self.retention = retention
        tag = f"{prefix}:events:{{{name}}}"  # one hash tag: the script's keys live in one cluster slot
        self._stream, self._counter, self._ids = tag, f"{tag}:seq", f"{tag}:id:"
        self._redis = RespClient(url, timeout=5.0)
        self._script = self._redis.register_script(_APPEND)
        self._next_trim = 0.0
        self._changes = _Changes()
        self._watcher = None

    async def append(self, events: list[NewEvent]) -> list[tuple[int, bool]]:
        if not events:
            return []
        args: list[Any] = [self._ids, int(self.retention.dedupe_window * 1000), self.retention.max_count]
        for e in events:
            args += [e.event_id, e.event_type, e.body, repr(e.at)]
        reply = await self._redis.evalsha(self._script, [self._stream, self._counter], args)
        now = time.time()
        if now >= self._next_trim:
            self._next_trim = now + TRIM_EVERY
            await self.trim(now)
        self._changes.notify()
        return [(int(seq), bool(created)) for seq, created in reply]

    @staticmethod
    def _parse(entries: list) -> list[StoredEvent]:
        out = []
        for stream_id, fields in entries:
            f = dict(zip(fields[::2], fields[1::2], strict=True))
            out.append(StoredEvent(_seq_of(stream_id), f[b"i"].decode(), f[b"t"].decode(), f[b"b"]))
        return out

    async def read(self, after: int, limit: int) -> list[StoredEvent]:
        if limit <= 0:
            return []
        entries = await self._redis.execute("XRANGE", self._stream, f"(0-{after}", "+", "COUNT", limit)
        return self._parse(entries)

    async def last(self) -> int:
        value = await self._redis.execute("GET", self._counter)
        return int(value) if value else 0

    async def trim(self, now: float) -> int:
        """By count, XADD's MAXLEN already trims (approximately); by age: drop the oldest entries
        until one is young enough, a page at a time."""
        cutoff = now - self.retention.max_age
        dropped = 0
        for _ in range(10):
            entries = await self._redis.execute("XRANGE", self._stream, "-", "+", "COUNT", 200)
            young = None
            for stream_id, fields in entries:
                f = dict(zip(fields[::2], fields[1::2], strict=True))
                if float(f[b"at"]) >= cutoff:
                    young = stream_id
                    break
            if young is not None:
                dropped += await self._redis.execute("XTRIM", self._stream, "MINID", young)
                break
            if not entries:
                break
            dropped += await self._redis.execute(
                "XTRIM", self._stream, "MINID", f"0-{_seq_of(entries[-1][0]) + 1}"
            )
        return dropped

    async def _watch(self) -> None:
        """One XREAD BLOCK per process, on its own connection: a blocking command would hold up
        every call pipelined behind it on the shared one."""
        from bridgeway.state.resp import RespClient

        blocking = RespClient(self.url, timeout=None)
        try:
            seen = await self.last()
            while True:
                try:
                    reply = await blocking.execute(
                        "XREAD", "COUNT", 1, "BLOCK", 5000, "STREAMS", self._stream, f"0-{seen}"
                    )
                except (ConnectionError, OSError, TimeoutError):
                    await asyncio.sleep(0.5)
                    continue
                if reply:
                    newest = reply[0][1][-1][0]
                    seen = max(seen, _seq_of(newest), await self.last())
                    self._changes.notify()
        finally:
            await blocking.close()

    async def drop(self) -> None:
        """Delete the log and its dedupe keys (tests)."""
        cursor = b"0"
        while True:
            cursor, keys = await self._redis.execute("SCAN", cursor, "MATCH", f"{self._ids}*", "COUNT", 500)
            if keys:
                await self._redis.execute("DEL", *keys)
            if cursor == b"0":
                break
        await self._redis.execute("DEL", self._stream, self._counter)

    async def close(self) -> None:
        await self._stop_watching()
        await self._redis.close()


# -- NATS JetStream ----------------------------------------------------------------------------


class NatsEventLog(_Watched):
    TYPE_HEADER = "Bw-Event-Type"

    def __init__(self, url: str, name: str, retention: Retention, prefix: str | None = None) -> None:
        self.url = url
        self.name = name if prefix is None else f"{prefix}_{name}"  # the stream
        self.subject = f"{prefix or 'bw'}.events.{name}"
        self.retention = retention
        self._nc = None
        self._js = None
        self._opening: asyncio.Lock | None = None
        self._changes = _Changes()
        self._watcher = None

    async def _open(self):
        if self._js is not None:
            return self._js
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._js is None:
                import nats
                from nats.js.api import StorageType, StreamConfig
                from nats.js.errors import BadRequestError, NotFoundError

                nc = await nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=-1)
                js = nc.jetstream(timeout=5)
                config = StreamConfig(
                    name=self.name,
                    subjects=[self.subject],
                    storage=StorageType.FILE,
                    max_msgs=self.retention.max_count,
                    max_age=self.retention.max_age,
                    duplicate_window=self.retention.dedupe_window,
                )
                try:
                    await js.stream_info(self.name)
                    await js.update_stream(config)
                except NotFoundError:
                    try:
                        await js.add_stream(config)
                    except BadRequestError:  # another worker created it first
                        await js.update_stream(config)
                self._nc, self._js = nc, js
        return self._js

    async def append(self, events: list[NewEvent]) -> list[tuple[int, bool]]:
        if not events:
            return []
        js = await self._open()
        # One connection writes the publishes in the order they are issued, so the sequence
        # numbers follow the batch's order; the acks are awaited together.
        acks = await asyncio.gather(
            *(
                js.publish(
                    self.subject,
                    e.body,
                    headers={"Nats-Msg-Id": e.event_id, self.TYPE_HEADER: e.event_type},
                )
                for e in events
            )
        )
        self._changes.notify()
        return [(ack.seq, not ack.duplicate) for ack in acks]

    async def read(self, after: int, limit: int) -> list[StoredEvent]:
        from nats.js.errors import NotFoundError

        js = await self._open()
        info = await js.stream_info(self.name)
        first, last = max(after + 1, info.state.first_seq), min(info.state.last_seq, after + limit)
        if limit <= 0 or last < first:
            return []

        async def get(seq: int):
            with contextlib.suppress(NotFoundError):  # trimmed meanwhile
                return await js.get_msg(self.name, seq=seq, subject=self.subject, next=True)
            return None

        # Gets by sequence, pipelined over the one connection; `next` skips deleted numbers.
        msgs = await asyncio.gather(*(get(seq) for seq in range(first, last + 1)))
        out: dict[int, StoredEvent] = {}
        for msg in msgs:
            if msg is not None and msg.seq not in out and msg.seq > after:
                headers = msg.headers or {}
                out[msg.seq] = StoredEvent(
                    msg.seq,
                    headers.get("Nats-Msg-Id", ""),
                    headers.get(self.TYPE_HEADER, ""),
                    msg.data or b"",
                )
        return [out[seq] for seq in sorted(out)][:limit]

    async def last(self) -> int:
        js = await self._open()
        return (await js.stream_info(self.name)).state.last_seq

    async def trim(self, now: float) -> int:
        return 0  # JetStream applies max_age and max_msgs itself

    async def _watch(self) -> None:
        await self._open()
        sub = await self._nc.subscribe(self.subject, cb=self._published)
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _published(self, msg) -> None:
        self._changes.notify()

    async def drop(self) -> None:
        """Delete the stream (tests)."""
        js = await self._open()
        with contextlib.suppress(Exception):
            await js.delete_stream(self.name)

    async def close(self) -> None:
        await self._stop_watching()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = self._js = None


def open_event_log(url: str, name: str, retention: Retention) -> EventLog:
    """The log `name` on the jobs backend at `url` (sqlite:///path, redis://, nats://). A
    `?prefix=` on a broker's URL (which keeps deployments' queues apart) names the log too."""
    from bridgeway.jobs.queues import _split_prefix

    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "sqlite" and rest.startswith("/") and rest[1:]:
        return SqliteEventLog(rest[1:], name, retention)
    if scheme == "redis":
        base, prefix = _split_prefix(url, "bw")
        return RedisEventLog(base, name, retention, prefix)
    if scheme in ("nats", "tls"):
        base, prefix = _split_prefix(url, "")
        return NatsEventLog(base, name, retention, prefix or None)
    raise ValueError(
        f"jobs backend {url!r}: expected sqlite:///path.db, redis://host:port/db or nats://host:port"
    )
