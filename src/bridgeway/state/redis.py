"""Redis KV: state shared by gateway replicas.

Layout (`{ns}` is a Redis Cluster hash tag, so one namespace lives in one slot and the scripts
below stay cluster-safe; the namespace is percent-encoded so it can never run into the key):

    {prefix}:kv:{ns}:{key}   hash  v=value, ver=version, exp=expires_at ("" = none); PEXPIRE for TTL
    {prefix}:kvidx:{ns}      zset  every key, score 0, for ZRANGEBYLEX listing
    {prefix}:kvexp:{ns}      zset  keys with a TTL, scored by expires_at, for sweeping the index

A key that expires leaves its index member behind; `list` skips such members and removes them
with a script that re-checks existence, so it never races with a concurrent re-create. Writes
with a TTL also sweep the namespace every `SWEEP_EVERY` seconds: members whose key has expired
leave both indexes, so a namespace of short-lived keys (the response cache) does not grow its
index without bound.
"""

from __future__ import annotations

import time
from urllib.parse import quote

import redis.asyncio as aioredis

from bridgeway.state.base import Entry, VersionMismatch, check_put, prefix_end

SWEEP_EVERY = 30.0  # seconds between two sweeps of one namespace's expired index members, per process
SWEEP_BATCH = 500  # members looked at per round trip of a sweep; at most 10 rounds per sweep

# KEYS: entry, index, expiry index. ARGV: member, value, if_version|"", ttl_ms|"", expires_at|"".
PUT = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'ver')) or 0
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= cur then return {0, cur} end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'ver', cur + 1, 'exp', ARGV[5])
if ARGV[4] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
else
  redis.call('PERSIST', KEYS[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return {1, cur + 1}
"""

# KEYS: entry, index, expiry index. ARGV: member, if_version|"". Returns {ok, current version or 0}.
DELETE = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'ver')) or 0
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= cur then return {0, cur} end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return {1, cur}
"""

# KEYS: index, expiry index, entry1..n. ARGV: member1..n. Drop members whose entry is gone;
# returns how many were dropped.
PRUNE = """
local dropped = 0
for i, member in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 2]) == 0 then
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZREM', KEYS[2], member)
    dropped = dropped + 1
  end
end
return dropped
"""


def _entry(fields: list[bytes | None]) -> Entry | None:
    value, ver, exp = fields
    if value is None or ver is None:
        return None
    return Entry(value, int(ver), float(exp) if exp else None)


class RedisKV:
    def __init__(self, url: str, *, prefix: str = "bw") -> None:
        self._redis = aioredis.from_url(url)
        self._prefix = prefix
        self._put = self._redis.register_script(PUT)
        self._delete = self._redis.register_script(DELETE)
        self._prune = self._redis.register_script(PRUNE)
        self._next_sweep: dict[str, float] = {}

    def _ns(self, ns: str) -> str:
        return "{" + quote(ns, safe="") + "}"

    def _key(self, ns: str, key: str) -> str:
        return f"{self._prefix}:kv:{self._ns(ns)}:{key}"

    def _index(self, ns: str) -> str:
        return f"{self._prefix}:kvidx:{self._ns(ns)}"

    def _expiries(self, ns: str) -> str:
        return f"{self._prefix}:kvexp:{self._ns(ns)}"

    def _keys(self, ns: str, key: str) -> list[str]:
        return [self._key(ns, key), self._index(ns), self._expiries(ns)]

    async def ping(self) -> None:
        await self._redis.ping()

    async def get(self, namespace: str, key: str) -> Entry | None:
        return _entry(await self._redis.hmget(self._key(namespace, key), "v", "ver", "exp"))

    async def put(
        self,
        namespace: str,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        if_version: int | None = None,
    ) -> Entry:
        value, expires_at = check_put(value, ttl, if_version)
        ttl_ms = "" if ttl is None else max(1, round(ttl * 1000))
        exp = "" if expires_at is None else repr(expires_at)
        ver = "" if if_version is None else if_version
        ok, current = await self._put(keys=self._keys(namespace, key), args=[key, value, ver, ttl_ms, exp])
        if not ok:
            raise VersionMismatch(namespace, key, if_version or 0, current or None)
        if expires_at is not None and (now := time.time()) >= self._next_sweep.get(namespace, 0.0):
            await self._sweep(namespace, now)
        return Entry(value, current, expires_at)

    async def _sweep(self, namespace: str, now: float) -> None:
        """Drop the index members of keys that have expired (bounded work; the rest next time)."""
        expiries, index = self._expiries(namespace), self._index(namespace)
        alive = 0  # members due by this clock whose key still exists (another clock): stepped over
        for _ in range(10):
            members = await self._redis.zrangebyscore(expiries, "-inf", now, start=alive, num=SWEEP_BATCH)
            if members:
                names = [m.decode() for m in members]
                keys = [index, expiries, *(self._key(namespace, m) for m in names)]
                alive += len(names) - await self._prune(keys=keys, args=names)
            if len(members) < SWEEP_BATCH:
                self._next_sweep[namespace] = now + SWEEP_EVERY
                return
        # A backlog is left: the next write with a TTL continues the sweep.

    async def delete(self, namespace: str, key: str, *, if_version: int | None = None) -> bool:
        ver = "" if if_version is None else if_version
        ok, current = await self._delete(keys=self._keys(namespace, key), args=[key, ver])
        if not ok:
            raise VersionMismatch(namespace, key, if_version or 0, current or None)
        return current > 0

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 100, after: str | None = None
    ) -> list[tuple[str, Entry]]:
        index = self._index(namespace)
        end = prefix_end(prefix)
        hi = "+" if end is None else "(" + end
        lo = "(" + after if after is not None and after >= prefix else "[" + prefix
        out: list[tuple[str, Entry]] = []
        while len(out) < limit:
            want = limit - len(out)
            members = [m.decode() for m in await self._redis.zrangebylex(index, lo, hi, start=0, num=want)]
            if not members:
                break
            keys = [self._key(namespace, m) for m in members]
            async with self._redis.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hmget(k, "v", "ver", "exp")
                rows = await pipe.execute()
            gone: list[int] = []
            for i, (member, fields) in enumerate(zip(members, rows, strict=True)):
                entry = _entry(fields)
                if entry is None:
                    gone.append(i)
                else:
                    out.append((member, entry))
            if gone:
                await self._prune(
                    keys=[index, self._expiries(namespace), *(keys[i] for i in gone)],
                    args=[members[i] for i in gone],
                )
            if len(members) < want:
                break
            lo = "(" + members[-1]
        return out

    async def close(self) -> None:
        await self._redis.aclose()
