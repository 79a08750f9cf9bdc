"""SQLite queue backend specifics: durable across reopen, shared by processes without double
delivery, leases and their expiry, idempotency, dead letters. (The contract over every backend
is the conformance suite's; these are what only a file on disk shows.)"""

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
    now = 1000.0
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


async def test_lease_expiry_with_no_attempts_left_buries(tmp_path):
    q = SqliteQueue(tmp_path / "q.db")
    ((job, _),) = await q.enqueue([new(max_attempts=1)], 0.0)
    (leased,) = await q.claim("q", 1, 5.0, 1.0)
    assert leased.attempts == 1
    assert await q.claim("q", 1, 5.0, 10.0) == []  # expired, but it had its one attempt
    dead = await q.get(job.id)
    assert (dead.state, dead.last_error) == ("dead", "lease expired")
    await q.close()


async def test_extend_keeps_the_lease_and_retry_delays(tmp_path):
    q = SqliteQueue(tmp_path / "q.db")
    await q.enqueue([new()], 0.0)
    (job,) = await q.claim("q", 1, 5.0, 1.0)
    (extended,) = await q.settle([Outcome(job.id, job.lease, "extend", at=100.0)], 2.0)
    assert extended.lease_until == 100.0
    assert await q.claim("q", 1, 5.0, 50.0) == []  # still held
    (retried,) = await q.settle([Outcome(job.id, job.lease, "retry", at=200.0, error="boom")], 60.0)
    assert (retried.state, retried.run_at, retried.last_error) == ("queued", 200.0, "boom")
    assert await q.claim("q", 1, 5.0, 199.0) == []
    (again,) = await q.claim("q", 1, 5.0, 200.0)
    assert again.attempts == 2 and again.lease != job.lease
    await q.close()


async def test_idempotency_keys_within_and_across_batches(tmp_path):
    q = SqliteQueue(tmp_path / "q.db")
    first = await q.enqueue([new(idempotency_key="k1"), new(idempotency_key="k1"), new()], 0.0)
    assert [c for _, c in first] == [True, False, True]
    assert first[0][0].id == first[1][0].id
    again = await q.enqueue([new(idempotency_key="k1"), new("other", idempotency_key="k1")], 1.0)
    assert again[0] == (again[0][0], False) and again[0][0].id == first[0][0].id
    assert again[1][1] is True  # keys are per queue
    assert (await q.stats("q", 2.0)).queued == 2
    await q.close()


async def test_a_failed_batch_stores_nothing(tmp_path):
    q = SqliteQueue(tmp_path / "q.db")
    ((job, _),) = await q.enqueue([new()], 0.0)
    with pytest.raises(Exception):  # noqa: B017 - the same id twice: the primary key refuses it
        await q.enqueue([new(), NewJob(job.id, "q", b"1")], 0.0)
    assert (await q.stats("q", 1.0)).queued == 1
    await q.close()


async def test_dead_letters_list_replay_purge(tmp_path):
    q = SqliteQueue(tmp_path / "q.db")
    await q.enqueue([new() for _ in range(5)], 0.0)
    jobs = await q.claim("q", 5, 5.0, 0.0)
    await q.settle([Outcome(j.id, j.lease, "bury", error="poison") for j in jobs], 1.0)
    dead = await q.dead("q", limit=3)
    assert [j.id for j in dead] == sorted(j.id for j in jobs)[:3]
    assert [j.id for j in await q.dead("q", after=dead[-1].id)] == sorted(j.id for j in jobs)[3:]
    assert await q.replay("q", [jobs[0].id, "nope"], 2.0) == 1
    assert (await q.get(jobs[0].id)).attempts == 0
    assert await q.purge("q") == 4
    stats = await q.stats("q", 3.0)
    assert (stats.queued, stats.dead) == (1, 0)
    assert stats.oldest_age == pytest.approx(1.0)
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
