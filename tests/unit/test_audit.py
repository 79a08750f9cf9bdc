"""The audit log on every state backend (memory, SQLite, Redis): background batched writes,
queries by event, actor and time, cursor paging, retention, the bounded queue, the final flush,
and that no secret is ever kept."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest
from structlog.testing import capture_logs

from bridgeway.governance.audit import NAMESPACE, SCAN_BUDGET, AuditLog, key_fields, parse_time
from bridgeway.observability import metrics
from bridgeway.security.keys import KeyStore
from bridgeway.state.memory import MemoryKV
from tests.support.services import REDIS_URL, require_redis

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def audit(kv, clock):
    log = AuditLog(kv, clock=clock)
    log.start()
    yield log
    await log.stop()


def fill(audit: AuditLog, clock: Clock, n: int, *, step: float = 1.0, **fields) -> None:
    for i in range(n):
        audit.record(
            fields.get("event", "key.created"),
            actor=fields.get("actor", f"key:{i % 3:010d}"),
            outcome="success",
            n=i,
        )
        clock.now += step


async def everything(audit: AuditLog, **query) -> list[dict]:
    out, cursor = [], None
    while True:
        page, cursor = await audit.query(after=cursor, **query)
        out += page
        if cursor is None:
            return out


# --- writing ------------------------------------------------------------------------------------


async def test_record_returns_at_once_and_the_writer_stores_it_in_the_background(audit, kv, clock):
    audit.record("key.created", actor="admin:token", outcome="success", key_id="abcdef0123")
    assert await kv.list(NAMESPACE, "r/") == []  # nothing written yet: record() did no I/O
    await audit.flush()
    (record,), cursor = await audit.query()
    assert cursor is None
    assert record["event"] == "key.created" and record["actor"] == "admin:token"
    assert record["outcome"] == "success" and record["details"] == {"key_id": "abcdef0123"}
    assert record["time"] == "2026-01-01T00:00:00.000000Z" and record["epoch"] == T0
    for field in ("id", "service", "route", "method", "path", "address", "trace_id"):
        assert field in record


async def test_records_made_during_a_write_go_in_the_next_batch(kv, clock):
    gate = asyncio.Event()
    puts = []

    class SlowKV:
        async def put(self, *args, **kw):
            puts.append(args[1])
            await gate.wait()
            return await kv.put(*args, **kw)

        def __getattr__(self, name):
            return getattr(kv, name)

    audit = AuditLog(SlowKV(), clock=clock, batch_size=50)
    audit.start()
    fill(audit, clock, 1)
    while not puts:
        await asyncio.sleep(0.001)  # the writer holds the first record
    fill(audit, clock, 120)
    assert len(audit._queue) == 120 and len(puts) == 1  # queued, not one write each
    gate.set()
    await audit.stop()
    assert len(await everything(audit)) == 121


async def test_stop_writes_everything_still_queued(kv, clock):
    audit = AuditLog(kv, clock=clock)
    audit.start()
    fill(audit, clock, 300)
    await audit.stop()
    assert audit.dropped == 0
    assert len(await everything(audit)) == 300


async def test_a_failing_backend_is_retried_and_loses_nothing(kv, clock):
    failures = [3]

    class FlakyKV:
        async def put(self, *args, **kw):
            if failures[0]:
                failures[0] -= 1
                raise ConnectionError("state down")
            return await kv.put(*args, **kw)

        def __getattr__(self, name):
            return getattr(kv, name)

    audit = AuditLog(FlakyKV(), clock=clock)
    audit.start()
    with capture_logs() as logs:
        fill(audit, clock, 5)
        await asyncio.wait_for(audit.flush(), 5)
    await audit.stop()
    assert len(await everything(audit)) == 5
    assert sum(1 for e in logs if e["event"] == "audit_write_failed") == 3


async def test_what_cannot_be_written_at_shutdown_is_counted_as_dropped(clock):
    class DeadKV(MemoryKV):
        async def put(self, *args, **kw):
            raise ConnectionError("state down")

    audit = AuditLog(DeadKV(), clock=clock)
    audit.start()
    fill(audit, clock, 4)
    with capture_logs() as logs:
        await audit.stop(timeout=1)
    assert audit.dropped == 4
    assert [e["dropped"] for e in logs if e["event"] == "audit_dropped"] == [4]


# --- the bounded queue --------------------------------------------------------------------------


async def test_a_full_queue_drops_and_counts_and_logs_at_most_every_ten_seconds(clock):
    audit = AuditLog(MemoryKV(), clock=clock, capacity=10)  # not started: nothing drains
    before = metrics._AUDIT["dropped"]
    with capture_logs() as logs:
        fill(audit, clock, 1000)
    assert len(audit._queue) == 10 and audit.dropped == 990
    assert metrics._AUDIT["dropped"] - before == 990
    warnings = [e for e in logs if e["event"] == "audit_dropped"]
    assert len(warnings) == 1 and warnings[0]["total"] == 1
    # Every record still reached the log, dropped or not.
    assert sum(1 for e in logs if e["event"] == "audit") == 1000


async def test_a_flood_of_refused_requests_leaves_room_for_admin_events(clock):
    audit = AuditLog(MemoryKV(), clock=clock, capacity=10)
    for _ in range(50):
        audit.record("auth.failed", actor=None, outcome="failure", credential="api_key")
    assert len(audit._queue) == 9 and audit.dropped == 41
    audit.record("key.revoked", actor="admin:token", outcome="success", key_id="0123456789")
    assert audit._queue[-1]["event"] == "key.revoked"


def test_bad_event_names_and_outcomes_are_refused():
    audit = AuditLog(MemoryKV())
    with pytest.raises(ValueError):
        audit.record("Key Created", actor=None, outcome="success")
    with pytest.raises(ValueError):
        audit.record("key.created", actor=None, outcome="ok")


def test_a_disabled_log_records_nothing():
    audit = AuditLog(MemoryKV(), enabled=False)
    with capture_logs() as logs:
        audit.record("key.created", actor=None, outcome="success")
    assert not audit._queue and not logs


# --- reading ------------------------------------------------------------------------------------


async def test_newest_first_and_paging_covers_every_record_exactly_once(audit, clock):
    fill(audit, clock, 57)
    await audit.flush()
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = await audit.query(limit=10, after=cursor)
        pages += 1
        seen += page
        if cursor is None:
            break
    assert pages == 6  # 5 full pages and one of 7: no empty page at the end
    assert [r["details"]["n"] for r in seen] == list(range(56, -1, -1))
    assert len({r["id"] for r in seen}) == 57


async def test_query_by_event_reads_only_that_event(audit, clock):
    fill(audit, clock, 20, event="kv.put")
    fill(audit, clock, 7, event="key.revoked")
    fill(audit, clock, 20, event="kv.put")
    await audit.flush()
    revoked = await everything(audit, event="key.revoked", limit=3)
    assert [r["details"]["n"] for r in revoked] == list(range(6, -1, -1))
    assert {r["event"] for r in revoked} == {"key.revoked"}
    assert len(await everything(audit, event="kv.put", limit=7)) == 40
    assert await audit.query(event="config.rejected") == ([], None)


async def test_query_by_actor(audit, clock):
    fill(audit, clock, 30)  # actors cycle over three keys
    await audit.flush()
    mine = await everything(audit, actor="key:0000000001", limit=4)
    assert [r["details"]["n"] for r in mine] == list(range(28, 0, -3))


async def test_query_by_actor_reads_a_bounded_number_of_records(clock):
    audit = AuditLog(MemoryKV(), clock=clock)
    audit.start()
    fill(audit, clock, SCAN_BUDGET + 5, step=0.001)
    await audit.flush()
    page, cursor = await audit.query(actor="nobody")
    assert page == [] and cursor is not None  # gave up after the budget, says where to go on
    assert await audit.query(actor="nobody", after=cursor) == ([], None)
    await audit.stop()


async def test_query_by_time_window(audit, clock):
    fill(audit, clock, 10, step=60.0)  # one record a minute from T0
    await audit.flush()
    window = await everything(audit, since=T0 + 120, until=T0 + 300, limit=2)
    assert [r["epoch"] for r in window] == [T0 + 300, T0 + 240, T0 + 180, T0 + 120]
    assert [r["details"]["n"] for r in await everything(audit, since=T0 + 490)] == [9]
    assert [r["details"]["n"] for r in await everything(audit, until=T0 + 59)] == [0]
    both = await everything(audit, event="key.created", actor="key:0000000000", until=T0 + 400)
    assert [r["details"]["n"] for r in both] == [6, 3, 0]


async def test_a_records_own_time_is_an_inclusive_bound(audit, clock):
    clock.now = T0 + 0.1234567  # not a whole microsecond
    fill(audit, clock, 3, step=0.0000013)
    await audit.flush()
    for record in await everything(audit):
        for bound in (record["epoch"], parse_time(record["time"], 0)):
            found = await everything(audit, since=bound, until=bound)
            assert [r["id"] for r in found] == [record["id"]]


async def test_bad_query_arguments(audit):
    for kwargs in ({"limit": 0}, {"event": "no way"}, {"after": "garbage"}):
        with pytest.raises(ValueError):
            await audit.query(**kwargs)


# --- retention ----------------------------------------------------------------------------------


async def test_records_are_kept_for_the_retention_period(kv):
    audit = AuditLog(kv, retention=3600)
    audit.start()
    audit.record("key.created", actor=None, outcome="success")
    await audit.flush()
    keys = await kv.list(NAMESPACE, "")
    assert len(keys) == 2  # the record and its copy under its event
    for _, entry in keys:
        assert entry.expires_at == pytest.approx(time.time() + 3600, abs=5)
    await audit.stop()


async def test_expired_records_disappear():
    clock = Clock()
    kv = MemoryKV(clock=clock)
    audit = AuditLog(kv, clock=clock, retention=86400)
    audit.start()
    fill(audit, clock, 3, step=3600)
    await audit.flush()
    clock.now = T0 + 86400 + 1800  # the first record is now older than a day
    assert [r["details"]["n"] for r in await everything(audit)] == [2, 1]
    await audit.stop()


async def test_the_sweep_prunes_the_redis_index_of_expired_records():
    require_redis()
    from bridgeway.state.redis import RedisKV

    kv = RedisKV(REDIS_URL, prefix=f"bwtest-{uuid.uuid4().hex}")
    try:
        audit = AuditLog(kv, retention=0.2)
        audit.start()
        for _ in range(5):
            audit.record("key.created", actor=None, outcome="success")
        await audit.flush()
        index = kv._index(NAMESPACE)
        assert await kv._redis.zcard(index) == 10
        await asyncio.sleep(0.4)
        await audit._sweep()
        assert await kv._redis.zcard(index) == 0
        await audit.stop()
    finally:
        keys = [k async for k in kv._redis.scan_iter(match=f"{kv._prefix}:*", count=500)]
        if keys:
            await kv._redis.delete(*keys)
        await kv.close()


# --- no secrets ---------------------------------------------------------------------------------


async def test_no_key_secret_or_hash_is_ever_kept_or_logged(kv, clock):
    keys = KeyStore(kv)
    token, record = await keys.create("ci", "admin", services=["sim"])
    rotated, record = await keys.rotate(record.id, 60)
    secrets_ = [token, rotated, token.split("_", 2)[2], rotated.split("_", 2)[2]]
    secrets_ += [record.secret_sha256, record.previous_sha256]
    audit = AuditLog(kv, clock=clock)
    audit.start()
    with capture_logs() as logs:
        audit.record("key.created", actor="admin:token", outcome="success", **key_fields(record))
        # Careless callers: secrets under telling names, or a key inside a message, are redacted.
        audit.record(
            "auth.failed",
            actor=None,
            outcome="failure",
            path=f"/x/{token}",
            token=token,
            reason=f"bad key {rotated}",
            nested={"client_secret": "s3cr3t-value", "list": [token]},
            secret_sha256=record.secret_sha256,
        )
        await audit.flush()
    stored = b"".join(e.value for _, e in await kv.list(NAMESPACE, "", limit=1000))
    logged = orjson.dumps(logs)
    for secret in [*secrets_, "s3cr3t-value"]:
        assert secret.encode() not in stored and secret.encode() not in logged, secret
    (failed,), _ = await audit.query(event="auth.failed")
    assert failed["details"]["reason"] == f"bad key bw_{record.id}_[redacted]"  # the id is public
    assert failed["details"]["token"] == "[redacted]" and failed["path"] == f"/x/bw_{record.id}_[redacted]"
    await audit.stop()


# --- times --------------------------------------------------------------------------------------


def test_parse_time():
    now = T0
    assert parse_time("1767225600", now) == T0
    assert parse_time("1767225600.5", now) == T0 + 0.5
    assert parse_time("2026-01-01T00:00:00Z", now) == T0
    assert parse_time("2026-01-01T01:00:00+01:00", now) == T0
    assert parse_time("2026-01-01T00:00:00", now) == T0  # no offset: UTC
    assert parse_time("1h", now) == T0 - 3600
    assert parse_time("7d", now) == T0 - 7 * 86400
    for bad in ("", "soon", "nan", "inf", "1x"):
        with pytest.raises(ValueError):
            parse_time(bad, now)
