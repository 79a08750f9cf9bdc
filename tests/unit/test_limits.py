"""GCRA rate limits: the pure step, the in-process limiter, Redis across replicas, headers."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridgeway.config.units import Rate, parse_rate
from bridgeway.security.limits import (
    Decision,
    LimiterUnavailable,
    MemoryLimiter,
    RedisLimiter,
    gcra,
    ratelimit_headers,
)
from bridgeway.state.resp import RespClient
from tests.support.services import REDIS_URL, require_redis


def run(times: list[float], period: float, limit: int, costs: list[int] | None = None) -> list[Decision]:
    tat: float | None = None
    out = []
    for i, now in enumerate(times):
        tat, d = gcra(tat, now, period, limit, costs[i] if costs else 1)
        out.append(d)
    return out


# --- pure gcra -------------------------------------------------------------------------------


@pytest.mark.parametrize(("period", "limit"), [(10.0, 10), (60.0, 7), (1.0, 3), (0.5, 2), (3600.0, 1000)])
def test_fresh_key_allows_exactly_limit_then_denies(period: float, limit: int) -> None:
    now = 1_700_000_000.0  # epoch-sized clocks have coarse ulps; the burst must still be exact
    decisions = run([now] * (limit + 3), period, limit)
    assert [d.allowed for d in decisions] == [True] * limit + [False] * 3
    assert [d.remaining for d in decisions[:limit]] == list(range(limit - 1, -1, -1))


@pytest.mark.parametrize(("period", "limit"), [(10.0, 10), (60.0, 7), (1.0, 3)])
def test_one_more_after_one_interval(period: float, limit: int) -> None:
    tat = None
    for _ in range(limit):
        tat, _d = gcra(tat, 100.0, period, limit)
    tat, d = gcra(tat, 100.0 + period / limit * 0.99, period, limit)
    assert not d.allowed
    tat, d = gcra(tat, 100.0 + period / limit, period, limit)
    assert d.allowed and d.remaining == 0
    _tat, d = gcra(tat, 100.0 + period / limit, period, limit)
    assert not d.allowed


def test_exact_values() -> None:
    tat, d = gcra(None, 100.0, 10.0, 10)  # one request per second, burst 10
    assert d == Decision(True, 10, 9, 0.0, 1.0)
    for _ in range(9):
        tat, d = gcra(tat, 100.0, 10.0, 10)
    assert d == Decision(True, 10, 0, 0.0, 10.0)
    tat, d = gcra(tat, 100.0, 10.0, 10)
    assert d == Decision(False, 10, 0, 1.0, 10.0)
    tat, d = gcra(tat, 100.5, 10.0, 10)
    assert d == Decision(False, 10, 0, 0.5, 9.5)
    tat, d = gcra(tat, 101.0, 10.0, 10)
    assert d == Decision(True, 10, 0, 0.0, 10.0)
    _tat, d = gcra(tat, 200.0, 10.0, 10)  # long idle: a full bucket, no saved-up credit
    assert d == Decision(True, 10, 9, 0.0, 1.0)


def test_cost_and_peek() -> None:
    tat, d = gcra(None, 0.0, 10.0, 10, cost=4)
    assert d == Decision(True, 10, 6, 0.0, 4.0)
    tat, d = gcra(tat, 0.0, 10.0, 10, cost=4)
    assert d.remaining == 2
    tat2, d = gcra(tat, 0.0, 10.0, 10, cost=4)
    assert d == Decision(False, 10, 2, 2.0, 8.0)
    assert tat2 == tat
    tat3, d = gcra(tat, 0.0, 10.0, 10, cost=0)  # peek
    assert d.allowed and d.remaining == 2 and tat3 == tat
    _tat, d = gcra(tat, 0.0, 10.0, 10, cost=2)
    assert d == Decision(True, 10, 0, 0.0, 10.0)
    with pytest.raises(ValueError):
        gcra(None, 0.0, 10.0, 10, cost=11)
    with pytest.raises(ValueError):
        gcra(None, 0.0, 10.0, 10, cost=-1)


def test_denied_requests_do_not_consume() -> None:
    tat = None
    for _ in range(5):
        tat, _d = gcra(tat, 0.0, 5.0, 5)
    before = tat
    for i in range(100):  # hammering while limited changes nothing
        tat, d = gcra(tat, i * 0.009, 5.0, 5)
        assert not d.allowed and tat == before
    _tat, d = gcra(tat, 1.0, 5.0, 5)
    assert d.allowed


def test_no_double_burst_at_window_edge() -> None:
    rate = parse_rate("10/min")
    times = [59.9] * 10 + [60.1] * 10  # a fixed window would admit 20 here
    assert sum(d.allowed for d in run(times, rate.period, rate.count)) == 10


@settings(max_examples=300, deadline=None)
@given(
    period=st.sampled_from([0.5, 1.0, 10.0, 60.0, 7.3]),
    limit=st.integers(1, 20),
    arrivals=st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.integers(0, 20)), max_size=200),
    start=st.sampled_from([0.0, 12345.678, 1_700_000_000.0]),
)
def test_never_exceeds_burst_plus_rate(
    period: float, limit: int, arrivals: list[tuple[float, int]], start: float
) -> None:
    """In every interval [a_i, a_j] the allowed cost is <= limit + (a_j - a_i) * limit / period."""
    now, tat = start, None
    admitted: list[tuple[float, int]] = []
    for gap, cost in arrivals:
        now += gap * period / limit
        cost = min(cost, limit)
        tat, d = gcra(tat, now, period, limit, cost)
        assert d.remaining >= 0 and d.retry_after >= 0 and d.reset_after >= 0
        assert d.allowed == (d.retry_after == 0)
        if d.allowed:
            admitted.append((now, cost))
    for i in range(len(admitted)):
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            elapsed = admitted[j][0] - admitted[i][0]
            assert total <= limit + (elapsed + 1e-6) * limit / period  # 1 µs of rounding grace


# --- MemoryLimiter ---------------------------------------------------------------------------


async def test_memory_keys_independent_and_injected_clock() -> None:
    clock = [0.0]
    limiter = MemoryLimiter(clock=lambda: clock[0])
    rate = Rate(2, 1.0)
    assert [limiter.check("a", rate).allowed for _ in range(3)] == [True, True, False]
    assert (await limiter.hit("b", rate)).allowed  # another key has its own bucket
    clock[0] = 0.5
    assert limiter.check("a", rate).allowed
    assert not limiter.check("a", rate).allowed


def test_memory_evicts_stale_keys() -> None:
    limiter = MemoryLimiter(min_sweep=4)
    rate = Rate(1, 1.0)
    for k in "abcd":
        limiter.check(k, rate, now=0.0)  # reaching 4 sweeps, but all are live
    assert len(limiter) == 4
    for k in "efgh":
        limiter.check(k, rate, now=5.0)  # reaching 8 sweeps: a..d are full again
    assert len(limiter) == 4
    assert limiter.sweep(now=100.0) == 4 and len(limiter) == 0
    assert limiter.check("a", rate, now=100.0).remaining == 0  # evicted == fresh


# --- RedisLimiter ----------------------------------------------------------------------------


@pytest.fixture
async def redis_client():
    """A RespClient for looking at Redis directly, and a key prefix of the test's own."""
    require_redis()
    client = RespClient(REDIS_URL, timeout=2.0)
    prefix = f"bwtest:rl:{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        keys, cursor = [], b"0"
        while True:
            cursor, batch = await client.execute("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 500)
            keys += batch
            if cursor == b"0":
                break
        if keys:
            await client.execute("DEL", *keys)
        await client.close()


async def test_redis_two_replicas_admit_exactly_n(redis_client) -> None:
    client, prefix = redis_client
    n = 20
    rate = parse_rate(f"{n}/min")
    replicas = [RedisLimiter(REDIS_URL, prefix=prefix, timeout=2.0) for _ in range(2)]
    try:
        decisions = await asyncio.gather(*(replicas[i % 2].hit("client-1", rate) for i in range(3 * n)))
    finally:
        for r in replicas:
            await r.aclose()
    allowed = [d for d in decisions if d.allowed]
    denied = [d for d in decisions if not d.allowed]
    assert len(allowed) == n
    assert all(d.retry_after > 0 and d.remaining == 0 for d in denied)
    assert sorted(d.remaining for d in allowed) == list(range(n))
    ttl = await client.execute("PTTL", prefix + "client-1")
    assert 0 < ttl <= 60_000  # expires when the bucket is full again


async def test_redis_values_and_cost(redis_client) -> None:
    _client, prefix = redis_client
    limiter = RedisLimiter(REDIS_URL, prefix=prefix)
    rate = Rate(10, 10.0)
    d = await limiter.hit("k", rate, cost=4)
    assert d.allowed and d.remaining == 6 and d.retry_after == 0
    assert 3.9 <= d.reset_after <= 4.0
    d = await limiter.hit("k", rate, cost=7)
    assert not d.allowed and d.remaining == 6 and 0.9 < d.retry_after <= 1.0
    assert (await limiter.hit("other", rate)).remaining == 9
    await limiter.aclose()
    with pytest.raises(LimiterUnavailable):  # closed for good: no silent reconnect
        await limiter.hit("k", rate)


def test_memory_concurrency_slots() -> None:
    limiter = MemoryLimiter()
    assert [limiter.acquire("k", 2) for _ in range(3)] == [True, True, False]
    assert limiter.acquire("other", 2)  # keys are independent
    limiter.release("k")
    assert limiter.acquire("k", 2) and not limiter.acquire("k", 2)
    limiter.release("k")
    limiter.release("k")
    assert limiter._held == {"other": 1}  # a key with no slot in use takes no memory


async def test_redis_concurrency_slots_shared_and_leased(redis_client) -> None:
    _client, prefix = redis_client
    a, b = RedisLimiter(REDIS_URL, prefix=prefix), RedisLimiter(REDIS_URL, prefix=prefix)
    try:
        tokens = await asyncio.gather(*(x.acquire("k", 3, lease=60) for x in (a, b, a, b, a)))
        held = [t for t in tokens if t is not None]
        assert len(held) == 3  # two replicas together hold at most the limit
        await b.release("k", held[0])
        assert await a.acquire("k", 3, lease=60) is not None
        assert await a.acquire("k", 3, lease=60) is None
        # A holder that dies never releases: its slot comes back when the lease ends.
        assert await a.acquire("short", 1, lease=0.2) is not None
        assert await b.acquire("short", 1, lease=0.2) is None
        await asyncio.sleep(0.3)
        assert await b.acquire("short", 1, lease=0.2) is not None
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_dead_port_raises_quickly() -> None:
    limiter = RedisLimiter("redis://127.0.0.1:1/0", timeout=0.25)
    start = time.monotonic()
    with pytest.raises(LimiterUnavailable):
        await limiter.hit("k", Rate(1, 1.0))
    assert time.monotonic() - start < 1.0
    await limiter.aclose()


def test_redis_url_without_tls_support_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="TLS"):  # at start-up, not as failing checks later
        RedisLimiter("rediss://127.0.0.1:6380/0")


async def test_redis_silent_server_times_out() -> None:
    """A server that accepts and never answers must not hold the request past `timeout`."""

    gone = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()
        await writer.wait_closed()
        gone.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = RedisLimiter(f"redis://127.0.0.1:{port}/0", timeout=0.25)
    try:
        start = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            await limiter.hit("k", Rate(1, 1.0))
        assert time.monotonic() - start < 1.0
    finally:
        await limiter.aclose()
        await asyncio.wait_for(gone.wait(), 1.0)  # aclose() hung up (and no socket outlives the test)
        server.close()


# --- headers ---------------------------------------------------------------------------------


def test_ratelimit_headers() -> None:
    rate = parse_rate("100/min")
    allowed = Decision(True, 100, 42, 0.0, 34.2)
    assert ratelimit_headers(allowed, rate) == [
        (b"ratelimit-policy", b"100;w=60"),
        (b"ratelimit", b"limit=100, remaining=42, reset=35"),
    ]
    denied = Decision(False, 100, 0, 0.3, 60.00000000000001)
    assert ratelimit_headers(denied, rate) == [
        (b"ratelimit-policy", b"100;w=60"),
        (b"ratelimit", b"limit=100, remaining=0, reset=60"),
        (b"retry-after", b"1"),
    ]
    assert ratelimit_headers(Decision(True, 2, 1, 0.0, 0.25), parse_rate("2/500ms"))[0] == (
        b"ratelimit-policy",
        b"2;w=1",
    )
