"""The audit log: security events (keys created, revoked or rotated, failed logins, forbidden
calls, admin changes) as structured records, kept in the state backend and queryable.

Recording never waits for I/O, because it sits on paths an attacker can drive (every 401): a
`record()` call appends to a bounded in-memory queue and emits one JSON log line (event
"audit"); a background task writes the queue to the state backend in batches. When the writer
cannot keep up, new records are dropped rather than queued without bound: counted in
`bridgeway_audit_dropped_total` and logged at most every 10 s (their log line is still written).
Request-driven events (`auth.failed`, `access.forbidden`) may fill only part of the queue, so a
flood of bad tokens never crowds out an admin's `key.revoked`.

Records live in namespace `_audit` of the configured state, so those of every worker (SQLite)
and replica (Redis) land in one place, each kept for `audit.retention`. A record is stored twice:

    r/{id}              every record
    e/{event}/{id}      the same record under its event, so a query by event reads only those

An id reads `{10**20 - 1 - time_ns:020d}-{writer}`: the inverted timestamp makes the KV's
ascending listing newest first and a time window a key range; the writer part (random per
process) keeps the ids of concurrent workers apart. A page's last id is the next page's cursor.

Records never hold a key, token, secret or hash. Callers pass public facts only (a key's id, a
credential's kind); as a second line of defence `record()` redacts detail fields whose name says
secret and the secret part of any Bridgeway key found in a detail value.

Any part of the gateway records with `gateway.audit.record("oauth.token_issued", actor=...,
outcome="success", client_id=...)`: dotted lowercase event names, details as keywords.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import math
import os
import re
import secrets
import time
from collections import deque
from datetime import UTC, datetime, timedelta

import orjson

from bridgeway.config.units import parse_duration
from bridgeway.observability import logs, metrics
from bridgeway.state import KV

NAMESPACE = "_audit"
RETENTION = 30 * 86400.0
# The events the gateway records (docs/operations.md describes each); others may be added.
EVENTS = (
    "auth.failed",
    "access.forbidden",
    "key.created",
    "key.revoked",
    "key.rotated",
    "config.reloaded",
    "config.rejected",
    "service.instance_registered",
    "service.instance_deregistered",
    "kv.put",
    "kv.deleted",
    "oauth.token_issued",
    "oauth.token_revoked",
)
# Events any caller can cause by sending requests: they get only this share of the queue.
REQUEST_EVENTS = frozenset({"auth.failed", "access.forbidden"})
REQUEST_SHARE = 0.9
OUTCOMES = frozenset({"success", "failure"})
DROP_LOG_EVERY = 10.0
SWEEP_EVERY = 3600.0
SCAN_BUDGET = 10_000  # entries one query reads at most when filtering by actor
MAX_PATH = 512

_MAX_NS = 10**20 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EVENT = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+")
_ID = re.compile(r"[0-9]{20}-[0-9a-f]{1,16}")
_SECRET_NAME = re.compile(r"secret|token|password|passwd|hash|sha256|authorization", re.IGNORECASE)
_KEY_TOKEN = re.compile(r"(bw_[0-9A-Za-z]{10}_)[A-Za-z0-9_-]+")
REDACTED = "[redacted]"


class AuditLog:
    """One process's audit log. `record()` from anywhere in the event loop; `start()` the
    writer with the state, `stop()` writes what is still queued."""

    def __init__(
        self,
        kv: KV | None = None,
        *,
        clock=time.time,
        retention: float = RETENTION,
        enabled: bool = True,
        capacity: int = 10_000,
        batch_size: int = 500,
    ) -> None:
        self.kv = kv
        self.clock = clock
        self.retention = retention
        self.enabled = enabled
        self.capacity = capacity
        self.batch_size = batch_size
        self.writer = secrets.token_hex(4)
        self.dropped = 0
        self.log = logs.get_logger()
        self._queue: deque[dict] = deque()
        self._pending: deque[dict] = deque()  # taken from the queue, not yet written
        self._events = set(EVENTS)  # index prefixes the sweep visits
        self._last_ns = 0
        self._drops_logged = 0
        self._next_drop_log = 0.0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._task: asyncio.Task | None = None

    # -- recording -------------------------------------------------------------------------------

    def record(
        self,
        event: str,
        *,
        actor: str | None,
        outcome: str,
        trace_id: str | None = None,
        service: str | None = None,
        route: str | None = None,
        method: str | None = None,
        path: str | None = None,
        address: str | None = None,
        **details,
    ) -> None:
        """Record one event: `actor` is who acted ("admin:token", "key:<id>", "cli:<user>",
        "signal:SIGHUP"; None when unproven), `outcome` "success" or "failure", `address` the
        client's IP. Returns at once; the write happens in the background."""
        if not self.enabled:
            return
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {outcome!r}")
        if not _EVENT.fullmatch(event):
            raise ValueError(f"{event!r} is not a dotted lowercase event name")
        ns = max(int(self.clock() * 1e9), self._last_ns + 1)  # unique and ordered within a writer
        self._last_ns = ns
        micros = ns // 1000  # both times shown to the microsecond, so either one is a precise bound
        record = {
            "id": f"{_MAX_NS - ns:020d}-{self.writer}",
            "time": (_EPOCH + timedelta(microseconds=micros)).isoformat(timespec="microseconds")[:-6] + "Z",
            "epoch": micros / 1e6,
            "event": event,
            "actor": actor,
            "outcome": outcome,
            "service": service,
            "route": route,
            "method": method,
            "path": _clean(path[:MAX_PATH]) if path else path,
            "address": address,
            "trace_id": trace_id,
            "details": _clean(details),
        }
        self.log.info(
            "audit",
            audit_id=record["id"],
            audit_event=event,
            actor=actor,
            outcome=outcome,
            service=service,
            route=route,
            method=method,
            path=record["path"],
            address=address,
            trace_id=trace_id,
            details=record["details"],
        )
        limit = self.capacity * REQUEST_SHARE if event in REQUEST_EVENTS else self.capacity
        if len(self._queue) >= limit:
            self._drop(1)
            return
        self._events.add(event)
        self._queue.append(record)
        self._idle.clear()
        self._wake.set()

    def _drop(self, count: int, *, final: bool = False) -> None:
        self.dropped += count
        metrics.audit_dropped(count)
        self._report_drops(final)

    def _report_drops(self, final: bool = False) -> None:
        now = time.monotonic()
        if self.dropped > self._drops_logged and (final or now >= self._next_drop_log):
            self._next_drop_log = now + DROP_LOG_EVERY
            self.log.warning(
                "audit_dropped",
                dropped=self.dropped - self._drops_logged,
                total=self.dropped,
                capacity=self.capacity,
            )
            self._drops_logged = self.dropped

    # -- the writer ------------------------------------------------------------------------------

    def start(self, kv: KV | None = None) -> None:
        """Start writing to `kv` (or the store given at construction); needs a running loop."""
        if kv is not None:
            self.kv = kv
        if self.kv is None:
            raise RuntimeError("the audit log needs a state backend to write to")
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="bridgeway-audit-writer")

    async def stop(self, timeout: float = 5.0) -> None:
        """Write everything queued (for at most `timeout` seconds), then end the writer. What
        could not be written by then is counted as dropped."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        left = len(self._queue) + len(self._pending)
        self._queue.clear()
        self._pending.clear()
        self._idle.set()
        if left:
            self._drop(left, final=True)
        else:
            self._report_drops(final=True)

    async def flush(self) -> None:
        """Wait until every record queued so far is written."""
        if self._task is None:
            raise RuntimeError("the audit writer is not running")
        await self._idle.wait()

    async def _run(self) -> None:
        next_sweep = 0.0
        backoff = 0.0
        while True:
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_EVERY
                await self._sweep()
            if not self._pending:
                if not self._queue:
                    self._idle.set()
                    if self._stopping:
                        return
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), SWEEP_EVERY)
                    continue
                for _ in range(min(self.batch_size, len(self._queue))):
                    self._pending.append(self._queue.popleft())
            try:
                await self._write_pending()
                backoff = 0.0
            except Exception as exc:  # noqa: BLE001 - the state may be down for a while: retry
                self.log.warning("audit_write_failed", error=f"{type(exc).__name__}: {exc}"[:300])
                if self._stopping:
                    return
                backoff = min(5.0, backoff * 2 or 0.1)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):  # a stop() cuts the wait short
                    await asyncio.wait_for(self._wake.wait(), backoff)
            self._report_drops()

    async def _write_pending(self) -> None:
        while self._pending:
            record = self._pending[0]
            # Kept for the retention period from when it happened, however long it queued.
            ttl = record["epoch"] + self.retention - self.clock()
            if ttl > 0:
                value = orjson.dumps(record)
                # The KV has no multi-key write: the two copies go one after the other, and a
                # retry after a failure between them rewrites the first (same value, harmless).
                await self.kv.put(NAMESPACE, f"r/{record['id']}", value, ttl=ttl)
                await self.kv.put(NAMESPACE, f"e/{record['event']}/{record['id']}", value, ttl=ttl)
            self._pending.popleft()

    async def _sweep(self) -> None:
        """Visit the expired tail of each listing. Expired entries vanish by themselves, but
        Redis keeps their members in the namespace's index until a listing meets them, and a
        newest-first reader seldom reaches the oldest end."""
        boundary = _inverted(_ns(self.clock() - self.retention))
        try:
            for prefix in ("r/", *(f"e/{event}/" for event in sorted(self._events))):
                await self.kv.list(NAMESPACE, prefix, limit=1000, after=prefix + boundary)
        except Exception as exc:  # noqa: BLE001 - housekeeping: try again at the next sweep
            self.log.warning("audit_sweep_failed", error=f"{type(exc).__name__}: {exc}"[:300])

    # -- reading ---------------------------------------------------------------------------------

    async def query(
        self,
        event: str | None = None,
        actor: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> tuple[list[dict], str | None]:
        """Records newest first, at most `limit`, with `since <= epoch <= until`, and the cursor
        of the next page (None at the end). `after` is a cursor from a previous page.

        A query by event reads only that event's records; a time window is a key range. Only
        `actor` is filtered by reading: such a query reads at most SCAN_BUDGET records and may
        then return fewer than `limit` with a cursor to go on from."""
        if limit < 1:
            raise ValueError("limit: must be at least 1")
        if event is not None and not _EVENT.fullmatch(event):
            raise ValueError(f"event: {event!r} is not an event name")
        if after is not None and not _ID.fullmatch(after):
            raise ValueError("cursor: not a cursor returned by a previous page")
        prefix = f"e/{event}/" if event is not None else "r/"
        start = prefix + after if after is not None else None
        if until is not None:  # a bound is a whole microsecond, as records show their time
            start = max(start or "", prefix + _inverted(_ns(until) + 999))  # the newest allowed
        stop = _inverted(_ns(since)) if since is not None else None  # ids past it are older
        page = limit + 1 if actor is None else 500
        records: list[dict] = []
        scanned = 0
        while True:
            entries = await self.kv.list(NAMESPACE, prefix, limit=page, after=start)
            for key, entry in entries:
                record_id = key[len(prefix) :]
                if stop is not None and record_id[:20] > stop:
                    return records, None
                if len(records) == limit:
                    return records, records[-1]["id"]
                record = orjson.loads(entry.value)
                if actor is None or record["actor"] == actor:
                    records.append(record)
                scanned += 1
                if scanned >= SCAN_BUDGET and len(records) < limit:
                    return records, record_id
            if len(entries) < page:
                return records, None
            start = entries[-1][0]


def _ns(epoch: float) -> int:
    """`epoch` in ns, to the nearest microsecond: bounds are whole microseconds, as records show
    their times (and a float's error stays far below one)."""
    return round(epoch * 1e6) * 1000


def _inverted(ns: int) -> str:
    return f"{_MAX_NS - min(max(ns, 0), _MAX_NS):020d}"


def _clean(value, name: str = ""):
    """Details with secret-named fields and the secret part of Bridgeway keys redacted."""
    if _SECRET_NAME.search(name):
        return REDACTED
    if isinstance(value, str):
        return _KEY_TOKEN.sub(r"\1" + REDACTED, value) if "bw_" in value else value
    if isinstance(value, dict):
        return {k: _clean(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    return value


def parse_time(text: str, now: float) -> float:
    """Epoch seconds from epoch seconds (`1767225600`), ISO 8601 (`2026-01-01T00:00:00Z`; UTC
    when no offset is given) or a duration ago (`1h`, `30m`, `7d`)."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
        raise ValueError(f'"{text}" is not a time')
    if text[-1:].isalpha():
        with contextlib.suppress(ValueError):
            return now - parse_duration(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f'"{text}" is not a time (epoch seconds, ISO 8601, or a duration ago such as 1h)'
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def parse_window(since: str | None, until: str | None, now: float) -> tuple[float | None, float | None]:
    """A query's time bounds as epoch seconds; the ValueError names the bound that is wrong."""
    bounds = []
    for name, value in (("since", since), ("until", until)):
        try:
            bounds.append(parse_time(value, now) if value is not None else None)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return bounds[0], bounds[1]


def key_fields(record) -> dict:
    """What an audit record says about an API key: its public facts, never its secret or hashes."""
    return {
        "key_id": record.id,
        "name": record.name,
        "role": record.role,
        "client": record.client,
        "services": list(record.services) if record.services is not None else None,
        "expires_at": record.expires_at,
    }


def cli_actor() -> str:
    """The actor of a change made with the CLI: the operating-system user."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry for the uid (some containers)
        return f"cli:uid{os.getuid()}"
