"""The event log contract, one suite on SQLite, Redis Streams and NATS JetStream."""

from __future__ import annotations

import asyncio
import time

import pytest

from bridgeway.jobs.events.log import NewEvent, Retention, SqliteEventLog, open_event_log


def ev(event_id: str, event_type: str = "job.done", at: float | None = None) -> NewEvent:
    return NewEvent(
        event_id, event_type, b'{"event_id":"%s"}' % event_id.encode(), time.time() if at is None else at
    )


async def test_append_numbers_in_order_and_reads_after_a_position(event_log):
    assert await event_log.last() == 0
    assert await event_log.read(0, 10) == []
    first = await event_log.append([ev(f"a{i}") for i in range(5)])
    assert [created for _, created in first] == [True] * 5
    seqs = [seq for seq, _ in first]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    second = await event_log.append([ev("b0", "job.failed")])
    assert second[0][0] > seqs[-1]
    assert await event_log.last() == second[0][0]

    everything = await event_log.read(0, 100)
    assert [e.event_id for e in everything] == [f"a{i}" for i in range(5)] + ["b0"]
    assert everything[-1].event_type == "job.failed"
    assert everything[0].body == b'{"event_id":"a0"}'
    # resuming from any position gives exactly what followed it
    page = await event_log.read(seqs[1], 2)
    assert [e.seq for e in page] == seqs[2:4]
    assert await event_log.read(second[0][0], 10) == []


async def test_a_repeated_event_id_is_stored_once_and_answers_the_first_seq(event_log):
    [(seq, created)] = await event_log.append([ev("same")])
    assert created
    again = await event_log.append([ev("other"), ev("same"), ev("other")])
    assert again[1] == (seq, False)
    assert again[0][1] is True and again[2] == (again[0][0], False)
    assert [e.event_id for e in await event_log.read(0, 10)] == ["same", "other"]


async def test_wait_returns_when_an_event_is_appended_elsewhere(event_log):
    top = await event_log.last()
    started = time.monotonic()
    await event_log.wait(top, 0.2)  # nothing new: sleeps the whole timeout
    assert time.monotonic() - started >= 0.15

    waiter = asyncio.create_task(event_log.wait(top, 10.0))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    started = time.monotonic()
    await event_log.append([ev("wake")])
    await asyncio.wait_for(waiter, 5.0)
    assert time.monotonic() - started < 2.0
    # already behind: returns at once
    started = time.monotonic()
    await event_log.wait(top, 10.0)
    assert time.monotonic() - started < 1.0


async def test_concurrent_appends_get_distinct_increasing_numbers(event_log):
    results = await asyncio.gather(
        *(event_log.append([ev(f"c{i}-{j}") for j in range(10)]) for i in range(10))
    )
    for batch in results:
        seqs = [seq for seq, _ in batch]
        assert seqs == sorted(seqs)
    assert len({seq for batch in results for seq, _ in batch}) == 100
    read = await event_log.read(0, 1000)
    assert [e.seq for e in read] == sorted(e.seq for e in read) and len(read) == 100


async def test_sqlite_retention_by_count_and_age_keeps_numbers_growing(tmp_path):
    log = SqliteEventLog(str(tmp_path / "r.db"), "r", Retention(max_age=60.0, max_count=3))
    try:
        now = time.time()
        await log.append([ev("old", at=now - 120)] + [ev(f"n{i}") for i in range(4)])
        await log.trim(now)
        assert [e.event_id for e in await log.read(0, 10)] == ["n1", "n2", "n3"]
        [(seq, _)] = await log.append([ev("later")])
        assert seq == 6 and await log.last() == 6
    finally:
        await log.close()


async def test_two_sqlite_handles_on_one_file_share_one_sequence(tmp_path):
    """Two worker processes' handles on one file: numbers never collide, and each sees the other's."""
    a = SqliteEventLog(str(tmp_path / "shared.db"), "s", Retention())
    b = SqliteEventLog(str(tmp_path / "shared.db"), "s", Retention())
    try:
        waiter = asyncio.create_task(b.wait(0, 5.0))
        await asyncio.sleep(0.05)
        await asyncio.gather(*(h.append([ev(f"{n}{i}")]) for i in range(20) for n, h in (("a", a), ("b", b))))
        await asyncio.wait_for(waiter, 2.0)
        assert [e.seq for e in await b.read(0, 100)] == list(range(1, 41))
    finally:
        await a.close()
        await b.close()


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="expected sqlite"):
        open_event_log("postgres://x", "n", Retention())
