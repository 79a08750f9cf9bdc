"""SQLite queue backend specifics: durable across reopen, shared by processes without double
delivery; and the backend URLs. (The contract over every backend, leases, idempotency and dead
letters included, is the conformance suite's, tests/integration/test_queue_backends.py; these
are what only a file on disk shows.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import pytest

from bridgeway.jobs.queues import open_queue_backend
from bridgeway.jobs.queues.backend import NewJob, Outcome
from bridgeway.jobs.queues.service import JobIds
from bridgeway.jobs.queues.sqlite import SqliteQueue

IDS = JobIds()


def new(queue="q", **kw) -> NewJob:
    return NewJob(IDS.next(time.time()), queue, b'{"n":1}', **kw)


async def test_jobs_survive_a_reopen_in_every_state(tmp_path):
    path = tmp_path / "q.db"
    q = SqliteQueue(path)
    now = time.time()  # the store judges retention by its own clock
    stored = await q.enqueue([new(max_attempts=1), new(), new(headers={"x-a": "1"}, priority=3)], now)
    claimed = await q.claim("q", 2, 30.0, now)
    assert [j.priority for j in claimed] == [3, 0]  # highest priority first
    await q.settle([Outcome(claimed[0].id, claimed[0].lease, "ack")], now)
    await q.close()

    q = SqliteQueue(path)  # as after a restart
    states = {j.id: j.state for j in await q.get_many([job.id for job, _ in stored])}
    assert sorted(states.values()) == ["done", "leased", "queued"]
    assert (await q.get(claimed[0].id)).headers == {"x-a": "1"}
    # The leased job's lease runs out: it had its one attempt, so it is dead; the queued one is due.
    again = await q.claim("q", 10, 30.0, now + 31)
    assert [j.id for j in again] == [stored[1][0].id]
    assert claimed[1].id == stored[0][0].id and (await q.get(claimed[1].id)).state == "dead"
    assert await q.settle([Outcome(claimed[1].id, claimed[1].lease, "ack")], now + 31) == [None]
    await q.close()


def _consume(path: str, out, start) -> None:
    async def run() -> list[str]:
        q = SqliteQueue(path)
        seen: list[str] = []
        start.wait()  # a barrier: both processes claim from the same moment
        while jobs := await q.claim("q", 20, 60.0, time.time()):
            seen += [j.id for j in jobs]
            await q.settle([Outcome(j.id, j.lease, "ack") for j in jobs], time.time())
        await q.close()
        return seen

    out.put(asyncio.run(run()))


async def test_two_processes_claiming_never_get_the_same_job(tmp_path):
    path = str(tmp_path / "q.db")
    q = SqliteQueue(path)
    n = 3000
    stored = await q.enqueue([new() for _ in range(n)], time.time())
    ctx = multiprocessing.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_consume, args=(path, out, start)) for _ in range(2)]
    for p in procs:
        p.start()
    seen = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    ids = seen[0] + seen[1]
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == {job.id for job, _ in stored}
    await q.close()


def test_backend_urls():
    with pytest.raises(ValueError, match="scheme"):
        open_queue_backend("kafka://x")
    with pytest.raises(ValueError, match="no scheme"):
        open_queue_backend("q.db")
    assert isinstance(open_queue_backend("sqlite:///:memory:"), SqliteQueue)
    # The brokers' handles are built without connecting (open() connects); ?prefix= is checked.
    redis = open_queue_backend("redis://127.0.0.1:1/0?prefix=app-1")
    assert (type(redis).__name__, redis.prefix, redis.url) == (
        "RedisQueueBackend",
        "app-1",
        "redis://127.0.0.1:1/0",
    )
    nats = open_queue_backend("nats://127.0.0.1:1")
    assert (type(nats).__name__, nats.prefix) == ("NatsQueueBackend", "bw")
    with pytest.raises(ValueError, match="prefix must be"):
        open_queue_backend("redis://127.0.0.1/0?prefix=a:b")
    with pytest.raises(ValueError, match="unknown option"):
        open_queue_backend("nats://127.0.0.1?stream=x")


async def test_counts_follow_every_move_and_a_file_from_before_them_is_counted(tmp_path):
    path = tmp_path / "q.db"
    q = SqliteQueue(path, retention=0.0)
    now = time.time()
    await q.enqueue([new(), new(), new(max_attempts=1), new("other")], now)
    with q._conn:  # a file written before the counts existed
        q._conn.executescript(
            "DROP TRIGGER job_counts_insert; DROP TRIGGER job_counts_delete; "
            "DROP TRIGGER job_counts_move; DROP TABLE job_counts;"
        )
    await q.close()

    q = SqliteQueue(path, retention=0.0)
    assert (await q.stats("q", now)).queued == 3 and (await q.stats("other", now)).queued == 1
    a, b, c = await q.claim("q", 3, 30.0, now)
    await q.settle([Outcome(a.id, a.lease, "ack"), Outcome(b.id, b.lease, "bury", error="x")], now)
    stats = await q.stats("q", now)
    assert (stats.queued, stats.leased, stats.dead) == (0, 1, 1)
    await q.claim("q", 1, 30.0, now + 60)  # c's lease ran out on its last attempt: dead
    assert (await q.replay("q", None, now + 60)) == 2
    stats = await q.stats("q", now + 60)
    assert (stats.queued, stats.leased, stats.dead) == (2, 0, 0)
    (d, e) = await q.claim("q", 2, 30.0, now + 61)
    await q.settle([Outcome(d.id, d.lease, "bury"), Outcome(e.id, e.lease, "bury")], now + 61)
    assert await q.purge("q") == 2
    counted = dict(q._conn.execute("SELECT state, n FROM job_counts WHERE queue = 'q'").fetchall())
    actual = dict(q._conn.execute("SELECT state, count(*) FROM jobs WHERE queue = 'q' GROUP BY state"))
    assert {s: n for s, n in counted.items() if n} == actual  # done jobs too, until swept
    await q.close()
