"""Rate limits as GCRA (generic cell rate algorithm): a pure step, the clock passed in.

A rate of `limit` per `period` admits one request every `interval = period / limit` seconds on
average, with bursts of up to `limit`. Per key the only state is one number, the theoretical
arrival time `tat`: when the bucket would be completely full again if nothing else arrived.
A request of `cost` is allowed when `tat + cost * interval <= now + period`. Unlike fixed
windows there is no edge where two bursts meet: in any interval of length L at most
`limit + L / interval` requests are allowed.

    limiter = MemoryLimiter()                 # one process
    limiter = RedisLimiter("redis://...")      # N replicas share the limit, one round trip
    decision = await limiter.hit(key, parse_rate("100/s"))
    if not decision.allowed: 429 with ratelimit_headers(decision, rate)

`cost=0` peeks: it reports `remaining` without consuming anything.

Both limiters also hold concurrency slots (`acquire` / `release`): at most `limit` requests of a
key in flight at once. In Redis a slot is a lease in a sorted set, so the slots of a replica that
died free themselves when their lease ends.
"""

from __future__ import annotations

import contextlib
import functools
import math
import secrets
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from bridgeway.config.units import Rate

__all__ = [
    "Decision",
    "LimiterBackend",
    "LimiterUnavailable",
    "MemoryLimiter",
    "RedisLimiter",
    "gcra",
    "ratelimit_headers",
]

# Float sums of period/limit drift by a few ulps (and `now` near 1.7e9 has ulps of ~2e-7 s);
# a microsecond of grace keeps the last request of an exact burst from being denied by rounding.
_TOLERANCE = 1e-6


class Decision(NamedTuple):
    """Immutable; a named tuple because one is made per limited request, and a frozen
    dataclass's __init__ pays an `object.__setattr__` call per field."""

    allowed: bool
    limit: int  # burst capacity (requests)
    remaining: int  # requests still allowed right now (>= 0)
    retry_after: float  # seconds until this request (its cost) would be allowed; 0 when allowed
    reset_after: float  # seconds until the bucket is completely full again


class LimiterUnavailable(Exception):
    """The shared limiter could not answer in time; the caller picks fail-open or fail-closed."""


# Decision(...) without the Python-level __new__ that namedtuple generates: one made per request.
_decision = functools.partial(tuple.__new__, Decision)


def _bad_cost(cost: int, limit: int) -> ValueError:
    return ValueError(f"cost {cost} outside 0..{limit}: it could never be allowed")


def gcra(
    tat: float | None, now: float, period: float, limit: int, cost: int = 1
) -> tuple[float | None, Decision]:
    """Pure GCRA step: `tat` is the stored theoretical arrival time (None = fresh key); rate = limit per
    period, burst = limit. Returns (new_tat, decision); when not allowed, new_tat is the old tat (unchanged).

    Raises ValueError when `cost` is outside 0..limit (a request bigger than the burst never fits).
    """
    if not 0 <= cost <= limit:
        raise _bad_cost(cost, limit)
    interval = period / limit
    base = now if tat is None or tat < now else tat  # an idle key is a full bucket, not a credit
    new_tat = base + cost * interval
    slack = now + period - new_tat  # >= 0: the request fits under the burst
    if slack >= -_TOLERANCE:
        # slack + _TOLERANCE >= 0, so int() is floor; new_tat >= base >= now, so reset >= 0
        remaining = int((slack + _TOLERANCE) / interval)
        return new_tat, _decision(
            (True, limit, remaining if remaining < limit else limit, 0.0, new_tat - now)
        )
    free = now + period - base
    remaining = min(limit, max(0, math.floor((free + _TOLERANCE) / interval)))
    return tat, Decision(False, limit, remaining, -slack, base - now)


class LimiterBackend(Protocol):
    async def hit(self, key: str, rate: Rate, now: float | None = None, cost: int = 1) -> Decision: ...


class MemoryLimiter:
    """In-process limiter: a dict of key -> tat. Stale keys (tat <= now, i.e. a full bucket, the
    same as no entry) are swept when the dict doubles in size, so the sweep costs O(1) amortised
    per new key and memory stays within twice the live keys."""

    __slots__ = ("_clock", "_tats", "_sweep_at", "_min_sweep", "_held")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, min_sweep: int = 1024) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._min_sweep = min_sweep
        self._sweep_at = min_sweep
        self._held: dict[str, int] = {}  # key -> slots in use; absent means none

    def __len__(self) -> int:
        return len(self._tats)

    def check(self, key: str, rate: Rate, now: float | None = None, cost: int = 1) -> Decision:
        """The sync fast path: one dict lookup, one gcra step."""
        if now is None:
            now = self._clock()
        tats = self._tats
        new_tat, decision = gcra(tats.get(key), now, rate.period, rate.count, cost)
        if decision.allowed:
            tats[key] = new_tat
            if len(tats) >= self._sweep_at:
                self.sweep(now)
        return decision

    async def hit(self, key: str, rate: Rate, now: float | None = None, cost: int = 1) -> Decision:
        return self.check(key, rate, now, cost)

    def acquire(self, key: str, limit: int) -> bool:
        held = self._held.get(key, 0)
        if held >= limit:
            return False
        self._held[key] = held + 1
        return True

    def release(self, key: str) -> None:
        held = self._held.pop(key, 1) - 1
        if held > 0:
            self._held[key] = held

    def sweep(self, now: float | None = None) -> int:
        """Drop keys whose bucket is full again; returns how many were dropped."""
        if now is None:
            now = self._clock()
        tats = self._tats
        stale = [k for k, tat in tats.items() if tat <= now]
        for k in stale:
            del tats[k]
        self._sweep_at = max(self._min_sweep, 2 * len(tats))
        return len(stale)


# KEYS[1] = bucket. ARGV = period_ms, limit, cost. Times in ms (floats; Lua numbers are doubles).
# `now` is the server's TIME, so replicas with skewed clocks agree. The tat is written with
# string.format because Lua's tostring keeps only 14 digits (10 ms at epoch scale), and floats
# are returned as strings because Redis truncates Lua numbers to integers.
_GCRA_LUA = """
local period = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = period / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + cost * interval
local slack = now + period - new_tat
local allowed = 0
local retry = 0
if slack >= -0.001 then
  allowed = 1
  tat = new_tat
  -- expire when the bucket is full again: a missing key means exactly that
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.max(1, math.ceil(tat - now)))
else
  retry = -slack
end
local remaining = math.floor((now + period - tat + 0.001) / interval)
remaining = math.max(0, math.min(limit, remaining))
return {allowed, remaining, string.format('%.3f', retry), string.format('%.3f', tat - now)}
"""


# KEYS[1] = the key's slots (member = slot token, score = lease end, ms). ARGV = limit, lease_ms,
# token. Expired leases are dropped first, so a crashed holder's slots come back by themselves.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"""


class RedisLimiter:
    """GCRA shared by every replica: one Lua script, one round trip per hit (after the first
    call loads the script). Raises LimiterUnavailable instead of waiting longer than `timeout`
    (twice that only in the rare call that finds the script gone from Redis and sends it again).

    It talks to Redis through RespClient (one pipelined connection, see state/resp.py): on the
    hot path redis-py's asyncio client cost more per call than the round trip itself."""

    def __init__(self, url: str, *, prefix: str = "bw:rl:", timeout: float = 0.25) -> None:
        from bridgeway.state.resp import RespClient, RespError  # hiredis: the [redis] extra, loaded only here

        # connect_timeout too: a call waiting for a connect is bounded by `timeout` anyway
        self._redis = RespClient(url, timeout=timeout, connect_timeout=timeout)
        # an error reply, a lost or refused connection, or no answer within `timeout`
        self._errors: tuple[type[BaseException], ...] = (RespError, OSError, TimeoutError)
        self._prefix = prefix
        self._script = self._redis.register_script(_GCRA_LUA)
        self._acquire = self._redis.register_script(_ACQUIRE_LUA)

    async def hit(self, key: str, rate: Rate, now: float | None = None, cost: int = 1) -> Decision:
        """`now` is ignored: Redis's own clock (TIME) decides, so all replicas share one timeline."""
        if not 0 <= cost <= rate.count:
            raise _bad_cost(cost, rate.count)
        try:
            allowed, remaining, retry_ms, reset_ms = await self._redis.evalsha(
                self._script, (self._prefix + key,), (rate.period * 1000, rate.count, cost)
            )
        except self._errors as exc:
            raise LimiterUnavailable(f"rate limiter store unavailable: {exc.__class__.__name__}") from exc
        return Decision(
            allowed == 1, rate.count, int(remaining), float(retry_ms) / 1000, float(reset_ms) / 1000
        )

    async def acquire(self, key: str, limit: int, lease: float) -> str | None:
        """A slot's token, or None when `limit` are in flight; the slot frees itself after `lease`."""
        token = secrets.token_hex(8)
        try:
            got = await self._redis.evalsha(
                self._acquire, (self._prefix + key,), (limit, int(lease * 1000), token)
            )
        except self._errors as exc:
            raise LimiterUnavailable(f"rate limiter store unavailable: {exc.__class__.__name__}") from exc
        return token if got == 1 else None

    async def release(self, key: str, token: str) -> None:
        """Best effort: if Redis cannot be reached now, the lease frees the slot later."""
        with contextlib.suppress(*self._errors):
            await self._redis.execute("ZREM", self._prefix + key, token)

    async def aclose(self) -> None:
        await self._redis.close()


def _whole_seconds(seconds: float) -> int:
    # ceil, but not up a whole second for float noise (60.00000000000001 -> 60)
    return max(0, math.ceil(seconds - _TOLERANCE))


@functools.lru_cache(maxsize=1024)
def _policy(limit: int, period: float) -> bytes:
    """A rate's `RateLimit-Policy` value: the same for every request under that rate."""
    return b"%d;w=%d" % (limit, max(1, _whole_seconds(period)))


def ratelimit_headers(decision: Decision, rate: Rate) -> list[tuple[bytes, bytes]]:
    """`RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers), plus
    `Retry-After` when denied; integers only, names lower-case as ASGI wants them."""
    headers = [
        (b"ratelimit-policy", _policy(decision.limit, rate.period)),
        (
            b"ratelimit",
            b"limit=%d, remaining=%d, reset=%d"
            # reset_after >= 0, so this is `_whole_seconds` without its clamp, and no call
            % (decision.limit, decision.remaining, math.ceil(decision.reset_after - _TOLERANCE)),
        ),
    ]
    if not decision.allowed:
        headers.append((b"retry-after", b"%d" % max(1, _whole_seconds(decision.retry_after))))
    return headers
