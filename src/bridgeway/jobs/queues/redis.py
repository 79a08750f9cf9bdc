"""The Redis Streams queue backend: consumer groups for delivery, Lua for atomicity.

Every operation is one Lua script (one round trip, atomic across replicas) over these keys,
with P the prefix and Q the queue:

    P:job:{id}        hash: the job (`get` reads it); gets a TTL of `retention` once terminal
    P:q:Q:s:{prio}    a stream per priority level; entries carry only the job id. Consumer group
                      `g` hands each entry out once (XREADGROUP `>`); its pending list is the
                      set of leased jobs; settle XACKs and XDELs the entry
    P:q:Q:levels      zset of the priority levels in use (claim walks them highest first)
    P:q:Q:delayed     zset id -> run_at: delayed and retried jobs, moved into their level's
                      stream when due (by whichever claim or enqueue first sees them due)
    P:q:Q:leases      zset id -> lease_until: lease deadlines on the caller's clock
    P:q:Q:dead        zset of dead ids at score 0 (id order, ZRANGEBYLEX) and P:q:Q:deadt, the
                      same ids by burial time (retention)
    P:q:Q:idem:{key}  the id of the job an idempotency key created (SET NX semantics)
    P:q:Q:bell        a stream of length 1 that every enqueue rings: `wait` blocks on it

Leases follow the clock the caller passes in, not Redis's: a job's deadline lives in the
leases zset, and a claim first reclaims expired ones (back to the end of their level, or to the
dead set when out of attempts). XAUTOCLAIM would judge expiry by the idle time Redis measures,
with one minimum for the whole group; here each job has its own deadline (claims may ask for
different leases, and `extend` moves one job's deadline), so the zset decides and the entry is
re-queued explicitly. The lease token is `{stream entry id}/{attempts}`, stored in the job hash:
any replica can settle with it, and a token from an earlier claim no longer matches.

Ordering: highest priority first; within a level, the order in which jobs became due (every
script first moves due delayed jobs in, in run_at order). A reclaimed job rejoins the end of
its level. Standalone Redis (or one shard): job keys are not in their queue's hash slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson

from bridgeway.jobs.queues.backend import Job, NewJob, Outcome, QueueStats
from bridgeway.state.resp import RespClient

# The fields of a job hash, in the order every script returns them (HMGET).
FIELDS = (
    "id",
    "queue",
    "payload",
    "headers",
    "priority",
    "state",
    "attempts",
    "max_attempts",
    "created_at",
    "run_at",
    "lease",
    "lease_until",
    "last_error",
    "finished_at",
    "idem",
    "callback",
)

# Shared Lua: helpers every script starts with.
_LIB = (
    "local FIELDS = {"
    + ", ".join(f"'{f}'" for f in FIELDS)
    + "}\n"
    + """
local P = ARGV[1]
local function qkey(q) return P .. ':q:' .. q end
local function jkey(id) return P .. ':job:' .. id end
local function row(id) return redis.call('HMGET', jkey(id), unpack(FIELDS)) end

local known_levels = {}
-- Append a job to the stream of its priority level (creating stream and group on first use).
local function push(q, id, prio)
  local qk = qkey(q)
  local s = qk .. ':s:' .. prio
  if not known_levels[s] then
    if redis.call('ZADD', qk .. ':levels', 'NX', prio, prio) == 1 then
      redis.pcall('XGROUP', 'CREATE', s, 'g', '0', 'MKSTREAM')
    end
    known_levels[s] = true
  end
  local eid = redis.call('XADD', s, '*', 'id', id)
  redis.call('HSET', jkey(id), 'state', 'queued', 'entry', eid)
  return eid
end

local function ring(q)
  redis.call('XADD', qkey(q) .. ':bell', 'MAXLEN', '1', '*', 'r', '1')
end

-- Take the job's entry off its stream (acked: out of the pending list; deleted: out of XLEN).
local function unstream(q, id)
  local jk = jkey(id)
  local eid = redis.call('HGET', jk, 'entry')
  if eid then
    local s = qkey(q) .. ':s:' .. redis.call('HGET', jk, 'priority')
    redis.call('XACK', s, 'g', eid)
    redis.call('XDEL', s, eid)
    redis.call('HDEL', jk, 'entry')
  end
end

local function retire(q, id, retention_ms)
  local jk = jkey(id)
  redis.call('PEXPIRE', jk, retention_ms)
  local idem = redis.call('HGET', jk, 'idem')
  if idem then redis.call('PEXPIRE', qkey(q) .. ':idem:' .. idem, retention_ms) end
end

local function bury(q, id, now, err, retention_ms)
  local qk = qkey(q)
  local jk = jkey(id)
  unstream(q, id)
  redis.call('ZREM', qk .. ':leases', id)
  redis.call('ZREM', qk .. ':delayed', id)
  redis.call('HSET', jk, 'state', 'dead', 'finished_at', now, 'last_error', err)
  redis.call('HDEL', jk, 'lease', 'lease_until')
  redis.call('ZADD', qk .. ':dead', 0, id)
  redis.call('ZADD', qk .. ':deadt', now, id)
  retire(q, id, retention_ms)
end

-- Due delayed jobs into their streams, in run_at order.
local function promote(q, now)
  local dk = qkey(q) .. ':delayed'
  local due = redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, 1000)
  for _, id in ipairs(due) do
    push(q, id, redis.call('HGET', jkey(id), 'priority'))
  end
  if #due > 0 then redis.call('ZREM', dk, unpack(due)) end
end

-- Expired leases: back to the end of their level, or dead when out of attempts.
local function reap(q, now, retention_ms)
  local lk = qkey(q) .. ':leases'
  local expired = redis.call('ZRANGEBYSCORE', lk, '-inf', now, 'LIMIT', 0, 1000)
  for _, id in ipairs(expired) do
    local jk = jkey(id)
    local v = redis.call('HMGET', jk, 'attempts', 'max_attempts', 'priority')
    if tonumber(v[1]) >= tonumber(v[2]) then
      bury(q, id, now, 'lease expired', retention_ms)
    else
      unstream(q, id)
      redis.call('HDEL', jk, 'lease', 'lease_until')
      push(q, id, v[3])
    end
  end
  if #expired > 0 then redis.call('ZREM', lk, unpack(expired)) end
end

local function trim_dead(q, now, retention)
  local qk = qkey(q)
  local old = redis.call('ZRANGEBYSCORE', qk .. ':deadt', '-inf', now - retention, 'LIMIT', 0, 1000)
  if #old > 0 then
    redis.call('ZREM', qk .. ':deadt', unpack(old))
    redis.call('ZREM', qk .. ':dead', unpack(old))
  end
end
"""
)

# ARGV: P, now, then 9 per job: id queue payload headers run_at priority max_attempts idem callback.
# Returns per job: 1 (created) or the existing job's row. Everything is checked before anything is
# written, so a batch is stored whole or not at all.
_ENQUEUE = (
    _LIB
    + """
local now = tonumber(ARGV[2])
local n = (#ARGV - 2) / 9
local out = {}
local claimed_keys = {}
for i = 0, n - 1 do
  local b = 2 + i * 9
  local idem = ARGV[b + 8]
  if idem ~= '' then
    local ik = qkey(ARGV[b + 2]) .. ':idem:' .. idem
    local existing = redis.call('GET', ik)
    if claimed_keys[ik] then  -- the same key twice in one batch: the first one wins
      out[i + 1] = claimed_keys[ik]
    elseif existing and redis.call('EXISTS', jkey(existing)) == 1 then
      out[i + 1] = existing
    else
      claimed_keys[ik] = ARGV[b + 1]
    end
  end
end
local rung = {}
for i = 0, n - 1 do
  local b = 2 + i * 9
  if not out[i + 1] then
    local id, q, run_at, prio, idem = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 5]), ARGV[b + 6], ARGV[b + 8]
    local jk = jkey(id)
    redis.call('HSET', jk, 'id', id, 'queue', q, 'payload', ARGV[b + 3], 'headers', ARGV[b + 4],
      'priority', prio, 'state', 'queued', 'attempts', 0, 'max_attempts', ARGV[b + 7],
      'created_at', ARGV[2], 'run_at', ARGV[b + 5])
    if idem ~= '' then
      redis.call('HSET', jk, 'idem', idem)
      redis.call('SET', qkey(q) .. ':idem:' .. idem, id)
    end
    if ARGV[b + 9] ~= '' then redis.call('HSET', jk, 'callback', ARGV[b + 9]) end
    if not rung[q] then promote(q, now); rung[q] = true end
    if run_at <= now then push(q, id, prio) else redis.call('ZADD', qkey(q) .. ':delayed', run_at, id) end
    out[i + 1] = 1
  end
end
for q, _ in pairs(rung) do ring(q) end
for i = 1, n do
  if out[i] ~= 1 then out[i] = row(out[i]) end
end
return out
"""
)

# ARGV: P, queue, limit, lease, now, retention
_CLAIM = (
    _LIB
    + """
local q, limit, lease, now = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local retention_ms = math.floor(tonumber(ARGV[6]) * 1000)
promote(q, now)
reap(q, now, retention_ms)
local qk = qkey(q)
local until_ = now + lease
local out = {}
for _, lvl in ipairs(redis.call('ZREVRANGE', qk .. ':levels', 0, -1)) do
  local need = limit - #out
  if need <= 0 then break end
  local s = qk .. ':s:' .. lvl
  local r = redis.call('XREADGROUP', 'GROUP', 'g', 'c', 'COUNT', need, 'STREAMS', s, '>')
  if r then
    for _, e in ipairs(r[1][2]) do
      local eid, id = e[1], e[2][2]
      local jk = jkey(id)
      if redis.call('HGET', jk, 'state') == 'queued' then
        local attempts = redis.call('HINCRBY', jk, 'attempts', 1)
        redis.call('HSET', jk, 'state', 'leased', 'lease', eid .. '/' .. attempts, 'lease_until', until_)
        redis.call('ZADD', qk .. ':leases', until_, id)
        out[#out + 1] = row(id)
      else  -- purged or replayed under it: a stray entry
        redis.call('XACK', s, 'g', eid)
        redis.call('XDEL', s, eid)
      end
    end
  end
end
return out
"""
)

# ARGV: P, now, retention, then 5 per outcome: id token action at error.
# Returns per outcome the job's row, or false when the token is stale.
_SETTLE = (
    _LIB
    + """
local now = tonumber(ARGV[2])
local retention_ms = math.floor(tonumber(ARGV[3]) * 1000)
local out = {}
local n = (#ARGV - 3) / 5
for i = 0, n - 1 do
  local b = 3 + i * 5
  local id, token, action, at, err = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  local jk = jkey(id)
  local v = redis.call('HMGET', jk, 'state', 'lease', 'queue')
  if v[1] ~= 'leased' or v[2] ~= token then
    out[i + 1] = false
  else
    local q = v[3]
    local qk = qkey(q)
    if action == 'extend' then
      redis.call('HSET', jk, 'lease_until', at)
      redis.call('ZADD', qk .. ':leases', at, id)
    elseif action == 'bury' then
      bury(q, id, now, err, retention_ms)
    else
      unstream(q, id)
      redis.call('ZREM', qk .. ':leases', id)
      redis.call('HDEL', jk, 'lease', 'lease_until')
      if action == 'ack' then
        redis.call('HSET', jk, 'state', 'done', 'finished_at', now)
        retire(q, id, retention_ms)
      else  -- retry
        redis.call('HSET', jk, 'state', 'queued', 'run_at', at)
        if err ~= '' then redis.call('HSET', jk, 'last_error', err) end
        if tonumber(at) <= now then
          push(q, id, redis.call('HGET', jk, 'priority'))
          ring(q)
        else
          redis.call('ZADD', qk .. ':delayed', at, id)
        end
      end
    end
    out[i + 1] = row(id)
  end
end
return out
"""
)

# ARGV: P, queue, limit, after ('' = from the start), now, retention
_DEAD = (
    _LIB
    + """
local q, limit = ARGV[2], tonumber(ARGV[3])
trim_dead(q, tonumber(ARGV[5]), tonumber(ARGV[6]))
local start = ARGV[4] == '' and '-' or '(' .. ARGV[4]
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYLEX', qkey(q) .. ':dead', start, '+', 'LIMIT', 0, limit)) do
  out[#out + 1] = row(id)
end
return out
"""
)

# ARGV: P, queue, now, then the ids ('*' alone = every dead job). Returns how many.
_REPLAY = (
    _LIB
    + """
local q, now = ARGV[2], ARGV[3]
local qk = qkey(q)
local ids = {}
if ARGV[4] == '*' then
  ids = redis.call('ZRANGE', qk .. ':dead', 0, -1)
else
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local n = 0
for _, id in ipairs(ids) do
  local jk = jkey(id)
  if redis.call('ZREM', qk .. ':dead', id) == 1 and redis.call('EXISTS', jk) == 1 then
    redis.call('ZREM', qk .. ':deadt', id)
    redis.call('PERSIST', jk)
    local idem = redis.call('HGET', jk, 'idem')
    if idem then redis.call('PERSIST', qk .. ':idem:' .. idem) end
    redis.call('HSET', jk, 'attempts', 0, 'run_at', now)
    redis.call('HDEL', jk, 'finished_at')
    push(q, id, redis.call('HGET', jk, 'priority'))
    n = n + 1
  end
end
if n > 0 then ring(q) end
return n
"""
)

# ARGV: P, queue. Returns how many dead jobs were deleted.
_PURGE = (
    _LIB
    + """
local q = ARGV[2]
local qk = qkey(q)
local ids = redis.call('ZRANGE', qk .. ':dead', 0, -1)
for _, id in ipairs(ids) do
  local jk = jkey(id)
  local idem = redis.call('HGET', jk, 'idem')
  if idem then redis.call('DEL', qk .. ':idem:' .. idem) end
  redis.call('DEL', jk)
end
redis.call('DEL', qk .. ':dead', qk .. ':deadt')
return #ids
"""
)

# ARGV: P, queue, now, retention -> {queued, leased, dead, oldest_age (string)}
_STATS = (
    _LIB
    + """
local q, now = ARGV[2], tonumber(ARGV[3])
trim_dead(q, now, tonumber(ARGV[4]))
local qk = qkey(q)
local in_streams, oldest = 0, nil
for _, lvl in ipairs(redis.call('ZRANGE', qk .. ':levels', 0, -1)) do
  local s = qk .. ':s:' .. lvl
  in_streams = in_streams + redis.call('XLEN', s)
  local last = '0-0'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', s)) do
    for j = 1, #g, 2 do if g[j] == 'last-delivered-id' then last = g[j + 1] end end
  end
  local first = redis.call('XRANGE', s, '(' .. last, '+', 'COUNT', 1)
  if #first > 0 then
    local v = redis.call('HMGET', jkey(first[1][2][2]), 'run_at', 'created_at')
    if v[1] then  -- queued since it came due, or since it was created when it was due at once
      local t = math.max(tonumber(v[1]), tonumber(v[2]))
      if oldest == nil or t < oldest then oldest = t end
    end
  end
end
local leased = redis.call('ZCARD', qk .. ':leases')
local due = redis.call('ZRANGEBYSCORE', qk .. ':delayed', '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1)
if #due > 0 and (oldest == nil or tonumber(due[2]) < oldest) then oldest = tonumber(due[2]) end
local age = 0
if oldest then age = math.max(0, now - oldest) end
return {in_streams - leased + redis.call('ZCARD', qk .. ':delayed'), leased,
        redis.call('ZCARD', qk .. ':dead'), tostring(age)}
"""
)

# ARGV: P, queue, now -> {seconds until something may be claimable (0 = now, -1 = nothing
# scheduled), the bell's last id}
_READY_IN = (
    _LIB
    + """
local q, now = ARGV[2], tonumber(ARGV[3])
local qk = qkey(q)
local bell = redis.call('XREVRANGE', qk .. ':bell', '+', '-', 'COUNT', 1)
local bell_id = #bell > 0 and bell[1][1] or '0-0'
for _, lvl in ipairs(redis.call('ZRANGE', qk .. ':levels', 0, -1)) do
  local s = qk .. ':s:' .. lvl
  local last = '0-0'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', s)) do
    for j = 1, #g, 2 do if g[j] == 'last-delivered-id' then last = g[j + 1] end end
  end
  if #redis.call('XRANGE', s, '(' .. last, '+', 'COUNT', 1) > 0 then return {'0', bell_id} end
end
local next_at = nil
for _, k in ipairs({':delayed', ':leases'}) do
  local first = redis.call('ZRANGE', qk .. k, 0, 0, 'WITHSCORES')
  if #first > 0 and (next_at == nil or tonumber(first[2]) < next_at) then next_at = tonumber(first[2]) end
end
if next_at == nil then return {'-1', bell_id} end
return {tostring(math.max(0, next_at - now)), bell_id}
"""
)


def _f(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _s(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _job(row: Sequence[Any]) -> Job:
    (
        id_,
        queue,
        payload,
        headers,
        priority,
        state,
        attempts,
        max_attempts,
        created_at,
        run_at,
        lease,
        lease_until,
        last_error,
        finished_at,
        idem,
        callback,
    ) = row
    return Job(
        id=id_.decode(),
        queue=queue.decode(),
        payload=payload,
        headers=orjson.loads(headers) if headers != b"{}" else {},
        priority=int(priority),
        state=state.decode(),
        attempts=int(attempts),
        max_attempts=int(max_attempts),
        created_at=float(created_at),
        run_at=float(run_at),
        lease=_s(lease),
        lease_until=_f(lease_until),
        last_error=_s(last_error),
        finished_at=_f(finished_at),
        idempotency_key=_s(idem),
        callback_url=_s(callback),
    )


class RedisQueueBackend:
    """Queues in Redis Streams; see the module docstring for the layout."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "bw",
        retention: float = 7 * 86400.0,
        timeout: float | None = 10.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.retention = retention
        self._redis = RespClient(url, timeout=timeout)
        r = self._redis.register_script
        self._enqueue, self._claim, self._settle = r(_ENQUEUE), r(_CLAIM), r(_SETTLE)
        self._dead, self._replay, self._purge = r(_DEAD), r(_REPLAY), r(_PURGE)
        self._stats, self._ready_in = r(_STATS), r(_READY_IN)
        self._retention_arg = repr(retention)
        # Connections for `wait`'s blocking XREAD: a blocked command would hold up every call
        # pipelined behind it on the shared client, so each waiter borrows its own.
        self._blocking: list[RespClient] = []
        self._closed = False

    async def open(self) -> None:
        """The client connects on first use; a PING makes an unreachable Redis fail now."""
        await self._redis.execute("PING")

    async def enqueue(self, jobs: list[NewJob], now: float) -> list[tuple[Job, bool]]:
        if not jobs:
            return []
        args: list[Any] = [self.prefix, repr(now)]
        for j in jobs:
            args += (
                j.id,
                j.queue,
                j.payload,
                orjson.dumps(j.headers) if j.headers else b"{}",
                repr(float(j.run_at)),
                int(j.priority),
                int(j.max_attempts),
                j.idempotency_key or "",
                j.callback_url or "",
            )
        replies = await self._redis.evalsha(self._enqueue, (), args)
        out: list[tuple[Job, bool]] = []
        for j, reply in zip(jobs, replies, strict=True):
            if reply == 1:
                job = Job(
                    id=j.id,
                    queue=j.queue,
                    payload=j.payload,
                    headers=dict(j.headers),
                    priority=int(j.priority),
                    state="queued",
                    attempts=0,
                    max_attempts=int(j.max_attempts),
                    created_at=now,
                    run_at=float(j.run_at),
                    idempotency_key=j.idempotency_key,
                    callback_url=j.callback_url,
                )
                out.append((job, True))
            else:
                out.append((_job(reply), False))
        return out

    async def claim(self, queue: str, limit: int, lease: float, now: float) -> list[Job]:
        if limit <= 0:
            return []
        args = (self.prefix, queue, int(limit), repr(float(lease)), repr(now), self._retention_arg)
        return [_job(row) for row in await self._redis.evalsha(self._claim, (), args)]

    async def settle(self, outcomes: list[Outcome], now: float) -> list[Job | None]:
        if not outcomes:
            return []
        args: list[Any] = [self.prefix, repr(now), self._retention_arg]
        for o in outcomes:
            at = o.at if o.at is not None else now
            args += (o.job_id, o.lease, o.action, repr(float(at)), o.error or "")
        replies = await self._redis.evalsha(self._settle, (), args)
        return [None if r is None else _job(r) for r in replies]

    async def get(self, job_id: str) -> Job | None:
        row = await self._redis.execute("HMGET", f"{self.prefix}:job:{job_id}", *FIELDS)
        return None if row[0] is None else _job(row)

    async def get_many(self, job_ids: list[str]) -> list[Job | None]:
        if not job_ids:
            return []
        # Sent together before any reply is awaited: one write, one round trip (pipelined).
        execute, prefix = self._redis.execute, self.prefix
        rows = await asyncio.gather(*(execute("HMGET", f"{prefix}:job:{i}", *FIELDS) for i in job_ids))
        return [None if row[0] is None else _job(row) for row in rows]

    async def dead(self, queue: str, limit: int = 100, after: str | None = None) -> list[Job]:
        args = (self.prefix, queue, int(limit), after or "", repr(time.time()), self._retention_arg)
        rows = await self._redis.evalsha(self._dead, (), args)
        return [_job(r) for r in rows if r[0] is not None]

    async def replay(self, queue: str, ids: list[str] | None, now: float) -> int:
        if ids is not None and not ids:
            return 0
        args = (self.prefix, queue, repr(now), *(ids if ids is not None else ("*",)))
        return int(await self._redis.evalsha(self._replay, (), args))

    async def purge(self, queue: str) -> int:
        return int(await self._redis.evalsha(self._purge, (), (self.prefix, queue)))

    async def stats(self, queue: str, now: float) -> QueueStats:
        args = (self.prefix, queue, repr(now), self._retention_arg)
        queued, leased, dead, age = await self._redis.evalsha(self._stats, (), args)
        return QueueStats(queued=int(queued), leased=int(leased), dead=int(dead), oldest_age=float(age))

    async def wait(self, queue: str, timeout: float) -> None:
        """Block on the queue's bell (XREAD from its last id) until an enqueue rings it, the next
        delayed job or lease deadline comes, or `timeout`. The readiness check and the bell's id
        are read in one script, so an enqueue in between is never missed."""
        ready_in, bell_id = await self._redis.evalsha(
            self._ready_in, (), (self.prefix, queue, repr(time.time()))
        )
        ready_in = float(ready_in)
        if ready_in == 0:
            return
        block = timeout if ready_in < 0 else min(timeout, ready_in)
        if block <= 0:
            return
        client = self._blocking.pop() if self._blocking else RespClient(self.url, timeout=None)
        bell = f"{self.prefix}:q:{queue}:bell"
        try:
            await client.execute("XREAD", "BLOCK", max(1, int(block * 1000)), "STREAMS", bell, bell_id)
        except BaseException:
            # cancelled or failed mid-block: its reply is still owed, so the connection is not reused
            await client.close()
            raise
        if self._closed:
            await client.close()
        else:
            self._blocking.append(client)

    async def close(self) -> None:
        self._closed = True
        clients, self._blocking = self._blocking, []
        await asyncio.gather(self._redis.close(), *(c.close() for c in clients))
