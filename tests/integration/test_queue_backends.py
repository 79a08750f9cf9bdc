"""The queue backend contract (jobs/queues/backend.py), rule by rule, against every backend.

Each backend is opened through `open_queue_backend` on its real service, with a prefix and
queue names of its own per test, and cleaned up after. Where a backend judges time by the clock
the caller passes in (Redis: leases and delays are decided in Lua from `now`), the test clock is
fake and advancing it is instant; where the broker's own clock rules (NATS: ack_wait, nak
delays), advancing it sleeps for real, so those tests use leases and delays of about a second.

Adding a backend is one entry in CASES.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridgeway.jobs.queues import open_queue_backend
from bridgeway.jobs.queues.backend import Job, NewJob, Outcome, QueueBackend
from bridgeway.jobs.queues.service import JobIds
from tests.support.services import drop_nats_prefix, drop_redis_prefix, require_service


@dataclass(frozen=True)
class Case:
    url: Callable[[str, Path], str]  # (unique tag, tmp dir) -> backend URL
    service: str | None  # what must be reachable on loopback
    caller_clock: bool  # leases and delays follow the `now` passed in
    cleanup: Callable[[str], Awaitable[None]] | None = None  # drop what the tag's prefix wrote
    delayed_counted_as_queued: bool = True  # else a delayed job a claim has seen counts as leased


CASES = {
    "sqlite": Case(lambda _, tmp: f"sqlite:///{tmp / 'queue.db'}", None, True),
    "redis": Case(lambda tag, _: f"redis://127.0.0.1:6379/0?prefix={tag}", "redis", True, drop_redis_prefix),
    "nats": Case(
        lambda tag, _: f"nats://127.0.0.1:4222?prefix={tag}", "nats", False, drop_nats_prefix, False
    ),
}

IDS = JobIds()

# Short enough to wait for where the broker's clock rules. A test keeps to one lease per queue:
# NATS has one ack_wait per consumer (see jobs/queues/nats.py).
LEASE = 1.0


class Clock:
    """`now()` for the backend's calls; `advance()` moves it (instantly when fake)."""

    def __init__(self, fake: bool) -> None:
        self.fake = fake
        self._t = time.time()

    def now(self) -> float:
        return self._t if self.fake else time.time()

    async def advance(self, seconds: float) -> None:
        if self.fake:
            self._t += seconds
        else:
            await asyncio.sleep(seconds)


@dataclass
class Env:
    backend: QueueBackend
    clock: Clock
    queue: str
    open: Callable[..., Awaitable[QueueBackend]]  # another connection (a replica) to the same store
    case: Case

    def job(self, n: int = 0, **kw: object) -> NewJob:
        kw.setdefault("queue", self.queue)
        # Time-ordered ids, as the queue service makes them (SQLite breaks ties in age by id).
        return NewJob(id=IDS.next(time.time()), payload=b'{"n":%d}' % n, **kw)  # type: ignore[arg-type]

    async def put(self, n: int, **kw: object) -> list[Job]:
        stored = await self.backend.enqueue([self.job(i, **kw) for i in range(n)], self.clock.now())
        return [job for job, _ in stored]

    async def claim(self, limit: int = 100, lease: float = LEASE, backend: QueueBackend | None = None):
        return await (backend or self.backend).claim(self.queue, limit, lease, self.clock.now())

    async def settle(self, *outcomes: Outcome, backend: QueueBackend | None = None) -> list[Job | None]:
        return await (backend or self.backend).settle(list(outcomes), self.clock.now())


@pytest.fixture(params=sorted(CASES))
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    case = CASES[request.param]
    if case.service:
        require_service(case.service)
    tag = f"bwtest-{uuid.uuid4().hex[:12]}"
    url = case.url(tag, tmp_path)
    opened: list[QueueBackend] = []

    async def open_(**kw: float) -> QueueBackend:
        backend = open_queue_backend(url, **kw)
        await backend.open()
        opened.append(backend)
        return backend

    backend = await open_()
    try:
        yield Env(backend, Clock(fake=case.caller_clock), f"q-{uuid.uuid4().hex[:8]}", open_, case)
    finally:
        for b in opened:
            with contextlib.suppress(Exception):
                await b.close()
        if case.cleanup:
            await case.cleanup(tag)


def ids(jobs: list[Job] | list[Job | None]) -> list[str]:
    return [j.id for j in jobs if j is not None]


# -- enqueue -------------------------------------------------------------------------------------


async def test_enqueue_stores_every_field_and_get_reads_it(env: Env) -> None:
    now = env.clock.now()
    new = env.job(7, headers={"x-trace": "abc"}, priority=3, max_attempts=9, callback_url="http://cb/x")
    [(job, created)] = await env.backend.enqueue([new], now)
    assert created
    got = await env.backend.get(new.id)
    assert got is not None
    for j in (job, got):
        assert (j.id, j.queue, j.payload, j.headers) == (new.id, env.queue, b'{"n":7}', {"x-trace": "abc"})
        assert (j.priority, j.max_attempts, j.callback_url) == (3, 9, "http://cb/x")
        assert (j.state, j.attempts, j.lease, j.idempotency_key) == ("queued", 0, None, None)
        assert abs(j.created_at - now) < 1
    assert await env.backend.get(uuid.uuid4().hex) is None


async def test_an_idempotency_key_stores_a_job_once_per_queue(env: Env) -> None:
    now = env.clock.now()
    first = env.job(1, idempotency_key="order-1")
    [(job, created)] = await env.backend.enqueue([first], now)
    assert created and job.idempotency_key == "order-1"
    # again in a later batch, and twice within one batch: the first job answers every time
    again = await env.backend.enqueue(
        [
            env.job(2, idempotency_key="order-1"),
            env.job(3),
            env.job(4, idempotency_key="order-2"),
            env.job(5, idempotency_key="order-2"),
        ],
        now,
    )
    assert [c for _, c in again] == [False, True, True, False]
    assert again[0][0].id == first.id and again[0][0].payload == b'{"n":1}'
    assert again[3][0].id == again[2][0].id
    # another queue has keys of its own
    [(_, other_created)] = await env.backend.enqueue(
        [env.job(6, queue=env.queue + "-b", idempotency_key="order-1")], now
    )
    assert other_created
    claimed = await env.claim()
    assert sorted(j.payload for j in claimed) == [b'{"n":1}', b'{"n":3}', b'{"n":4}']


async def test_a_batch_that_fails_stores_nothing(env: Env) -> None:
    good = [env.job(i) for i in range(3)]
    bad = env.job(9)
    bad.payload = object()  # type: ignore[assignment]  # not bytes: the batch cannot be stored
    with pytest.raises(Exception):  # noqa: B017 - each backend raises its own error
        await env.backend.enqueue([*good, bad], env.clock.now())
    assert [await env.backend.get(j.id) for j in good] == [None, None, None]
    assert await env.claim() == []


# -- claim ---------------------------------------------------------------------------------------


async def test_claim_takes_highest_priority_first_then_oldest(env: Env) -> None:
    now = env.clock.now()
    jobs = [env.job(i, priority=p) for i, p in enumerate([0, 5, 1, 5, 0, -2])]
    for j in jobs:  # one by one: age order is enqueue order
        await env.backend.enqueue([j], now)
    first = await env.claim(limit=3)
    rest = await env.claim(limit=10)
    order = [jobs[i].id for i in (1, 3, 2, 0, 4, 5)]
    assert ids(first) == order[:3] and ids(rest) == order[3:]


async def test_a_claim_leases_each_job_once(env: Env) -> None:
    await env.put(5)
    now = env.clock.now()
    claimed = await env.backend.claim(env.queue, 3, 30.0, now)
    assert len(claimed) == 3
    for j in claimed:
        assert j.state == "leased" and j.attempts == 1 and j.lease
        assert j.lease_until is not None and abs(j.lease_until - (now + 30.0)) < 1
        stored = await env.backend.get(j.id)
        assert stored is not None and stored.state == "leased" and stored.lease == j.lease
    # A token is opaque and settles with its job's id: the jobs of one claim may share one
    # (SQLite's do), but no token of another claim is ever the same.
    more = await env.claim(limit=10)
    assert len(more) == 2 and not set(ids(more)) & set(ids(claimed))
    assert not {j.lease for j in more} & {j.lease for j in claimed}
    assert await env.claim() == []


async def test_concurrent_claimers_on_two_connections_never_share_a_job(env: Env) -> None:
    other = await env.open()
    await env.put(200)

    async def drain(backend: QueueBackend) -> list[str]:
        got: list[str] = []
        while batch := await env.claim(limit=17, lease=30.0, backend=backend):
            got += ids(batch)
        return got

    a, b = await asyncio.gather(drain(env.backend), drain(other))
    assert len(a) + len(b) == 200 and len(set(a) | set(b)) == 200


async def test_a_delayed_job_is_claimed_only_when_due(env: Env) -> None:
    now = env.clock.now()
    [late] = await env.put(1, run_at=now + 1.0)
    [soon] = await env.put(1)
    assert ids(await env.claim(lease=30.0)) == [soon.id]
    assert await env.claim(lease=30.0) == []
    stats = await env.backend.stats(env.queue, env.clock.now())
    assert stats.queued + stats.leased == 2
    assert stats.queued == (1 if env.case.delayed_counted_as_queued else 0)
    await env.clock.advance(1.2)
    [job] = await env.claim(lease=30.0)
    assert job.id == late.id and job.attempts == 1


# -- settle --------------------------------------------------------------------------------------


async def test_ack_finishes_a_job_and_its_token_then_changes_nothing(env: Env) -> None:
    await env.put(2)
    a, b = await env.claim()
    [done] = await env.settle(Outcome(a.id, a.lease, "ack"))
    assert done is not None and done.state == "done" and done.finished_at is not None and done.lease is None
    stored = await env.backend.get(a.id)
    assert stored is not None and stored.state == "done" and stored.attempts == 1
    # settled already, and a token that was never issued: both refused, nothing changes
    assert await env.settle(Outcome(a.id, a.lease, "bury", error="x"), Outcome(b.id, "forged", "ack")) == [
        None,
        None,
    ]
    assert (await env.backend.get(a.id)).state == "done"  # type: ignore[union-attr]
    assert (await env.backend.get(b.id)).state == "leased"  # type: ignore[union-attr]
    stats = await env.backend.stats(env.queue, env.clock.now())
    assert (stats.queued, stats.leased, stats.dead) == (0, 1, 0)


async def test_a_batch_of_outcomes_settles_each_job(env: Env) -> None:
    await env.put(4)
    a, b, c, d = await env.claim()
    now = env.clock.now()
    out = await env.settle(
        Outcome(a.id, a.lease, "ack"),
        Outcome(b.id, b.lease, "retry", at=now, error="flaky"),
        Outcome(c.id, c.lease, "bury", error="poison"),
        Outcome(d.id, "stale", "ack"),
    )
    assert [j.state if j else None for j in out] == ["done", "queued", "dead", None]
    assert out[1].last_error == "flaky" and out[2].last_error == "poison"  # type: ignore[union-attr]
    [again] = await env.claim(limit=1)
    assert again.id == b.id and again.attempts == 2


async def test_retry_later_holds_the_job_until_then(env: Env) -> None:
    await env.put(1)
    [job] = await env.claim(lease=30.0)
    [queued] = await env.settle(Outcome(job.id, job.lease, "retry", at=env.clock.now() + 1.0, error="busy"))
    assert queued is not None and queued.state == "queued" and queued.lease is None
    assert await env.claim(lease=30.0) == []
    await env.clock.advance(1.2)
    [again] = await env.claim(lease=30.0)
    assert again.id == job.id and again.attempts == 2 and again.last_error == "busy"
    assert again.lease != job.lease
    assert await env.settle(Outcome(job.id, job.lease, "ack")) == [None]  # the first lease is gone


async def test_extend_keeps_a_lease_past_its_first_deadline(env: Env) -> None:
    await env.put(1)
    [job] = await env.claim(lease=LEASE)
    await env.clock.advance(LEASE * 0.6)
    [ext] = await env.settle(Outcome(job.id, job.lease, "extend", at=env.clock.now() + LEASE))
    assert ext is not None and ext.state == "leased" and ext.lease == job.lease
    await env.clock.advance(LEASE * 0.6)  # past the first deadline, within the extended one
    assert await env.claim() == []
    [done] = await env.settle(Outcome(job.id, job.lease, "ack"))
    assert done is not None and done.state == "done"
    assert await env.settle(Outcome(job.id, job.lease, "extend", at=env.clock.now() + 5)) == [None]


# -- leases --------------------------------------------------------------------------------------


async def test_an_expired_lease_is_reclaimed_and_its_old_token_is_stale(env: Env) -> None:
    await env.put(1)
    [job] = await env.claim(lease=LEASE)
    await env.clock.advance(LEASE + 0.5)
    [again] = await env.claim(lease=LEASE)
    assert again.id == job.id and again.attempts == 2 and again.lease != job.lease
    assert await env.settle(Outcome(job.id, job.lease, "ack")) == [None]
    [done] = await env.settle(Outcome(again.id, again.lease, "ack"))
    assert done is not None and done.state == "done" and done.attempts == 2


async def test_an_expired_lease_on_the_last_attempt_buries_the_job(env: Env) -> None:
    [new] = await env.put(1, max_attempts=1)
    [job] = await env.claim(lease=LEASE)
    await env.clock.advance(LEASE + 0.5)
    assert await env.claim() == []
    dead = await env.backend.get(new.id)
    assert dead is not None and dead.state == "dead" and dead.last_error == "lease expired"
    assert ids(await env.backend.dead(env.queue)) == [job.id]


# -- dead letters --------------------------------------------------------------------------------


async def test_dead_jobs_are_listed_in_id_order_replayed_and_purged(env: Env) -> None:
    await env.put(5)
    claimed = await env.claim()
    await env.settle(*(Outcome(j.id, j.lease, "bury", error=f"e{j.id}") for j in claimed))
    want = sorted(ids(claimed))
    page1 = await env.backend.dead(env.queue, limit=3)
    page2 = await env.backend.dead(env.queue, limit=3, after=page1[-1].id)
    assert ids(page1) + ids(page2) == want
    assert all(j.state == "dead" and j.last_error == f"e{j.id}" for j in page1 + page2)
    assert (await env.backend.stats(env.queue, env.clock.now())).dead == 5

    assert await env.backend.replay(env.queue, [want[0], "no-such-job"], env.clock.now()) == 1
    assert await env.backend.replay(env.queue, [want[0]], env.clock.now()) == 0  # not dead any more
    [back] = await env.claim()
    assert back.id == want[0] and back.attempts == 1  # attempts start again

    assert await env.backend.replay(env.queue, None, env.clock.now()) == 4
    assert len(await env.claim()) == 4 and await env.backend.dead(env.queue) == []

    await env.settle(Outcome(back.id, back.lease, "bury", error="again"))
    assert await env.backend.purge(env.queue) == 1
    assert await env.backend.dead(env.queue) == [] and await env.backend.get(back.id) is None
    assert (await env.backend.stats(env.queue, env.clock.now())).dead == 0


async def test_a_poison_job_dies_after_its_attempts_and_replays(env: Env) -> None:
    [new] = await env.put(1, max_attempts=3)
    for attempt in range(1, 4):
        [job] = await env.claim()
        assert job.attempts == attempt
        action = "bury" if attempt == job.max_attempts else "retry"
        await env.settle(Outcome(job.id, job.lease, action, at=env.clock.now(), error="boom"))  # type: ignore[arg-type]
    assert await env.claim() == []
    assert ids(await env.backend.dead(env.queue)) == [new.id]
    assert await env.backend.replay(env.queue, None, env.clock.now()) == 1
    [job] = await env.claim()
    assert job.id == new.id and job.attempts == 1


# -- stats, wait, retention ----------------------------------------------------------------------


async def test_stats_count_each_state_and_the_oldest_age(env: Env) -> None:
    empty = await env.backend.stats(env.queue, env.clock.now())
    assert (empty.queued, empty.leased, empty.dead, empty.oldest_age) == (0, 0, 0, 0)
    await env.put(4)
    await env.put(1, run_at=env.clock.now() + 60)
    a, b = await env.claim(limit=2, lease=30.0)
    await env.settle(Outcome(b.id, b.lease, "bury", error="x"))
    await env.clock.advance(1.0)
    stats = await env.backend.stats(env.queue, env.clock.now())
    assert (stats.queued, stats.leased, stats.dead) == (3, 1, 1)
    assert 0.9 <= stats.oldest_age < 30


async def test_wait_wakes_on_an_enqueue_and_times_out_when_idle(env: Env) -> None:
    started = time.monotonic()
    await env.backend.wait(env.queue, 0.3)
    assert 0.25 <= time.monotonic() - started < 2.0

    async def enqueue_soon() -> None:
        await asyncio.sleep(0.2)
        await env.put(1)

    started = time.monotonic()
    producer = asyncio.create_task(enqueue_soon())
    await env.backend.wait(env.queue, 5.0)
    woke = time.monotonic() - started
    await producer
    assert 0.15 <= woke < 2.0
    started = time.monotonic()
    await env.backend.wait(env.queue, 5.0)  # a claimable job: returns at once
    assert time.monotonic() - started < 1.0
    assert len(await env.claim()) == 1


async def test_terminal_jobs_are_kept_for_the_retention_only(env: Env) -> None:
    short = await env.open(retention=1.0)
    now = env.clock.now()
    await short.enqueue([env.job(1), env.job(2, idempotency_key="k")], now)
    a, b = await short.claim(env.queue, 10, 30.0, now)
    await short.settle([Outcome(a.id, a.lease, "ack"), Outcome(b.id, b.lease, "ack")], now)
    assert (await short.get(a.id)).state == "done"  # type: ignore[union-attr]
    await asyncio.sleep(2.5)  # retention is judged by the store's clock
    assert await short.get(a.id) is None and await short.get(b.id) is None


# -- crashes and replicas ------------------------------------------------------------------------


async def test_a_consumer_that_dies_holding_leases_loses_nothing(env: Env) -> None:
    doomed = await env.open()
    await env.put(30, idempotency_key=None)
    keyed = env.job(99, idempotency_key="once")
    await env.backend.enqueue([keyed], env.clock.now())
    held = await env.claim(limit=20, lease=LEASE, backend=doomed)
    assert len(held) == 20
    await doomed.close()  # dies with its leases: its connection is gone

    survivor = await env.open()  # a fresh connection, as after a restart
    [(dup, created)] = await survivor.enqueue([env.job(100, idempotency_key="once")], env.clock.now())
    assert not created and dup.id == keyed.id  # idempotency holds across reconnects
    # the jobs nobody held are there at once; the dead consumer's come back when its leases end
    first = await env.claim(limit=100, lease=LEASE, backend=survivor)
    assert len(first) == 11 and not set(ids(first)) & set(ids(held))
    assert all(await env.settle(*(Outcome(j.id, j.lease, "ack") for j in first), backend=survivor))
    await env.clock.advance(LEASE + 0.5)
    second = await env.claim(limit=100, lease=LEASE, backend=survivor)
    assert sorted(ids(second)) == sorted(ids(held)) and {j.attempts for j in second} == {2}
    out = await env.settle(*(Outcome(j.id, j.lease, "ack") for j in second), backend=survivor)
    assert all(j is not None and j.state == "done" for j in out)
    stats = await survivor.stats(env.queue, env.clock.now())
    assert (stats.queued, stats.leased, stats.dead) == (0, 0, 0)


async def test_a_lease_shows_on_every_replica_as_its_claim_issued_it(env: Env) -> None:
    # The API's settle reads the jobs first (get_many) and checks their lease, on whichever replica
    # the worker's call reaches: every replica must show the lease the claim issued.
    replica = await env.open()
    await env.put(3)
    claimed = await env.claim(lease=30.0)
    seen = await replica.get_many([j.id for j in claimed])
    assert [(j.state, j.lease, j.attempts) for j in seen if j] == [(j.state, j.lease, 1) for j in claimed]
    out = await env.settle(*(Outcome(j.id, j.lease, "ack") for j in claimed), backend=replica)
    assert [j.state if j else None for j in out] == ["done"] * 3
    assert [(await env.backend.get(j.id)).state for j in claimed] == ["done"] * 3  # type: ignore[union-attr]
    # the claimer's own stale view of them (get_many may answer its leases from memory) settles nothing
    assert await env.settle(*(Outcome(j.id, j.lease, "ack") for j in claimed)) == [None] * 3


async def test_attempts_count_every_claim_across_expiries_retries_and_replicas(env: Env) -> None:
    other = await env.open()
    [new] = await env.put(1, max_attempts=4)
    [first] = await env.claim(lease=LEASE)
    await env.clock.advance(LEASE + 0.5)  # expires: the next claim is the second attempt
    [second] = await env.claim(lease=LEASE, backend=other)
    assert (second.id, second.attempts) == (new.id, 2)
    [again] = await env.settle(Outcome(second.id, second.lease, "retry", at=env.clock.now(), error="flaky"))
    assert again is not None and (again.state, again.attempts) == ("queued", 2)
    [third] = await env.claim(lease=LEASE)
    assert third.attempts == 3 and third.last_error == "flaky"
    stored = await other.get(new.id)
    assert stored is not None and (stored.state, stored.attempts, stored.lease) == ("leased", 3, third.lease)
    await env.clock.advance(LEASE + 0.5)
    [fourth] = await env.claim(lease=LEASE, backend=other)
    assert fourth.attempts == 4
    # stale tokens of every earlier attempt change nothing
    stale = [Outcome(j.id, j.lease, "ack") for j in (first, second, third)]
    assert await env.settle(*stale) == [None, None, None]
    await env.clock.advance(LEASE + 0.5)  # the last attempt's lease expires: dead
    assert await env.claim() == []
    dead = await env.backend.get(new.id)
    assert dead is not None and (dead.state, dead.attempts, dead.last_error) == ("dead", 4, "lease expired")


async def test_idempotency_keys_hold_across_a_restart_and_after_the_job_is_done(env: Env) -> None:
    first = await env.open()
    [(job, created)] = await first.enqueue([env.job(1, idempotency_key="once")], env.clock.now())
    assert created
    await first.close()  # a restart: nothing of the first process is left but what it stored
    restarted = await env.open()
    [(dup, created)] = await restarted.enqueue([env.job(2, idempotency_key="once")], env.clock.now())
    assert not created and (dup.id, dup.state, dup.payload) == (job.id, "queued", b'{"n":1}')
    [leased] = await env.claim(backend=restarted)
    await env.settle(Outcome(leased.id, leased.lease, "ack"), backend=restarted)
    [(done, created)] = await env.backend.enqueue([env.job(3, idempotency_key="once")], env.clock.now())
    assert not created and (done.id, done.state) == (job.id, "done")
    assert await env.claim() == []


async def test_any_replica_settles_with_the_token(env: Env) -> None:
    replica = await env.open()
    await env.put(3)
    claimed = await env.claim()
    out = await env.settle(*(Outcome(j.id, j.lease, "ack") for j in claimed), backend=replica)
    assert [j.state if j else None for j in out] == ["done"] * 3
    assert await env.settle(*(Outcome(j.id, j.lease, "ack") for j in claimed)) == [None] * 3
