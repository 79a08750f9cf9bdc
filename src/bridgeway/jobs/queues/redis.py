"""The Redis Streams queue backend: consumer groups for delivery, Lua for atomicity.

Every operation is one Lua script (one round trip, atomic across replicas) over these keys,
with P the prefix and Q the queue:

    P:job:{id}        hash of five fields, one HMGET to read a job and one HSET to move it on;
                      a TTL of `retention` once terminal:
                        m  what never changes, as the start of a JSON array: [id, queue,
                           headers, priority, max_attempts, created_at, idempotency_key,
                           callback_url,   (written by the gateway that enqueued it)
                        d  what changes, the rest of that array: state, attempts, run_at,
                           lease, lease_until, finished_at, last_error (JSON values; the
                           scripts read and rewrite it with one string.match)
                        x  the job's stream entry ('' when in none), z  what the scripts route
                           by: priority|max_attempts|queue|idempotency key, p  the payload
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

What a job costs inside the scripts (the speed is there: Redis runs one script at a time, and
each field a script reads costs about as much as a call): an enqueue is an XADD and one HSET; a
claim one HMGET and one HSET per job, the leases' ZADD once for the batch; an ack one HMGET, one
HSET and a PEXPIRE per job, the XACK, XDEL and the leases' ZREM once per stream for the batch.
Scripts answer with the rows they built, never re-read: a job is two strings, `m .. d .. ']'`
and its payload, so the gateway decodes one JSON array per job rather than sixteen fields.

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

# Shared Lua: helpers every script starts with.
_LIB = """
local P = ARGV[1]
local function qkey(q) return P .. ':q:' .. q end
local function jkey(id) return P .. ':job:' .. id end
-- A job: {m, d, x, z, p}; m is false when there is none.
local function read(id) return redis.call('HMGET', jkey(id), 'm', 'd', 'x', 'z', 'p') end
-- d: state, attempts, run_at, lease, lease_until, finished_at, last_error (lease and last_error
-- as JSON: null or a string; the error last, as it may hold any character).
local function state(row)
  return string.match(row[2], '^"(%a+)",(%d+),([^,]+),([^,]+),([^,]+),([^,]+),(.*)$')
end
local function tail(s, a, r, l, u, f, e)
  return '"' .. s .. '",' .. a .. ',' .. r .. ',' .. l .. ',' .. u .. ',' .. f .. ',' .. e
end
-- z: priority, max_attempts, queue, idempotency key ('' = none)
local function static(row) return string.match(row[4], '^([^|]*)|([^|]*)|([^|]*)|(.*)$') end
-- What the gateway reads: {the job as one JSON array, its payload}.
local function view(m, d, p) return {m .. d .. ']', p} end

local known_levels = {}
-- Append a job to the stream of its priority level (creating stream and group on first use);
-- the entry id, for the caller's HSET.
local function push(q, id, prio)
  local qk = qkey(q)
  local s = qk .. ':s:' .. prio
  if not known_levels[s] then
    if redis.call('ZADD', qk .. ':levels', 'NX', prio, prio) == 1 then
      redis.pcall('XGROUP', 'CREATE', s, 'g', '0', 'MKSTREAM')
    end
    known_levels[s] = true
  end
  return redis.call('XADD', s, '*', 'id', id)
end

local function ring(q)
  redis.call('XADD', qkey(q) .. ':bell', 'MAXLEN', '1', '*', 'r', '1')
end

-- Entries to take off their streams and ids off the leases zsets, once per batch.
local unstreamed, unleased = {}, {}
local function unstream(q, prio, eid)
  if eid ~= '' then
    local s = qkey(q) .. ':s:' .. prio
    local list = unstreamed[s]
    if not list then list = {}; unstreamed[s] = list end
    list[#list + 1] = eid
  end
end
local function unlease(q, id)
  local lk = qkey(q) .. ':leases'
  local list = unleased[lk]
  if not list then list = {}; unleased[lk] = list end
  list[#list + 1] = id
end
local function flush()
  for s, eids in pairs(unstreamed) do
    redis.call('XACK', s, 'g', unpack(eids))
    redis.call('XDEL', s, unpack(eids))
  end
  for lk, ids in pairs(unleased) do redis.call('ZREM', lk, unpack(ids)) end
  unstreamed, unleased = {}, {}
end

local function retire(id, q, key, retention_ms)
  redis.call('PEXPIRE', jkey(id), retention_ms)
  if key ~= '' then redis.call('PEXPIRE', qkey(q) .. ':idem:' .. key, retention_ms) end
end

-- A job (its row, leased or queued) to the dead letters: its new d. The caller flush()es.
local function bury(id, row, now, err, retention_ms)
  local _, a, r, _, _, _, _ = state(row)
  local prio, _, q, key = static(row)
  local qk = qkey(q)
  unstream(q, prio, row[3])
  unlease(q, id)
  redis.call('ZREM', qk .. ':delayed', id)
  local d = tail('dead', a, r, 'null', 'null', now, err)
  redis.call('HSET', jkey(id), 'd', d, 'x', '')
  redis.call('ZADD', qk .. ':dead', 0, id)
  redis.call('ZADD', qk .. ':deadt', now, id)
  retire(id, q, key, retention_ms)
  return d
end

-- Due delayed jobs into their streams, in run_at order.
local function promote(q, now)
  local dk = qkey(q) .. ':delayed'
  local due = redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, 1000)
  for _, id in ipairs(due) do
    local jk = jkey(id)
    local z = redis.call('HGET', jk, 'z')
    if z then redis.call('HSET', jk, 'x', push(q, id, string.match(z, '^([^|]*)|'))) end
  end
  if #due > 0 then redis.call('ZREM', dk, unpack(due)) end
end

-- Expired leases: back to the end of their level, or dead when out of attempts.
local function reap(q, now, retention_ms)
  local lk = qkey(q) .. ':leases'
  local expired = redis.call('ZRANGEBYSCORE', lk, '-inf', now, 'LIMIT', 0, 1000)
  for _, id in ipairs(expired) do
    local row = read(id)
    if row[1] then  -- else gone (expired or purged): nothing to put back
      local _, a, r, _, _, f, e = state(row)
      local prio, max_attempts = static(row)
      if tonumber(a) >= tonumber(max_attempts) then
        bury(id, row, now, '"lease expired"', retention_ms)
      else
        unstream(q, prio, row[3])
        redis.call('HSET', jkey(id), 'd', tail('queued', a, r, 'null', 'null', f, e), 'x', push(q, id, prio))
      end
    end
  end
  flush()
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

# ARGV: P, now, then 8 per job: id queue payload m z run_at priority idem.
# Returns per job: 1 (created) or the existing job's row. Everything is checked before anything is
# written, so a batch is stored whole or not at all.
_ENQUEUE = (
    _LIB
    + """
local now = tonumber(ARGV[2])
local n = (#ARGV - 2) / 8
local out = {}
local claimed_keys = {}
for i = 0, n - 1 do
  local b = 2 + i * 8
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
  local b = 2 + i * 8
  if not out[i + 1] then
    local id, q, run_at, idem = ARGV[b + 1], ARGV[b + 2], ARGV[b + 6], ARGV[b + 8]
    if not rung[q] then promote(q, now); rung[q] = true end
    local eid = ''
    if tonumber(run_at) <= now then
      eid = push(q, id, ARGV[b + 7])
    else
      redis.call('ZADD', qkey(q) .. ':delayed', run_at, id)
    end
    redis.call('HSET', jkey(id), 'm', ARGV[b + 4], 'd', tail('queued', 0, run_at, 'null', 'null', 'null', 'null'),
      'x', eid, 'z', ARGV[b + 5], 'p', ARGV[b + 3])
    if idem ~= '' then redis.call('SET', qkey(q) .. ':idem:' .. idem, id) end
    out[i + 1] = 1
  end
end
for q, _ in pairs(rung) do ring(q) end
for i = 1, n do
  if out[i] ~= 1 then
    local row = read(out[i])
    out[i] = view(row[1], row[2], row[5])
  end
end
return out
"""
)

# ARGV: P, queue, limit, lease, now, retention
_CLAIM = (
    _LIB
    + """
local q, limit, now = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[5])
local retention_ms = math.floor(tonumber(ARGV[6]) * 1000)
promote(q, now)
reap(q, now, retention_ms)
local qk = qkey(q)
local until_ = tostring(now + tonumber(ARGV[4]))
local out, deadlines = {}, {}
for _, lvl in ipairs(redis.call('ZREVRANGE', qk .. ':levels', 0, -1)) do
  local need = limit - #out
  if need <= 0 then break end
  local s = qk .. ':s:' .. lvl
  local r = redis.call('XREADGROUP', 'GROUP', 'g', 'c', 'COUNT', need, 'STREAMS', s, '>')
  if r then
    local stray = {}
    for _, entry in ipairs(r[1][2]) do
      local eid, id = entry[1], entry[2][2]
      local row = read(id)
      local st, a, run_at, _, _, f, e
      if row[1] then st, a, run_at, _, _, f, e = state(row) end
      if st == 'queued' and row[3] == eid then
        a = tonumber(a) + 1
        local d = tail('leased', a, run_at, '"' .. eid .. '/' .. a .. '"', until_, f, e)
        redis.call('HSET', jkey(id), 'd', d)
        out[#out + 1] = view(row[1], d, row[5])
        deadlines[#deadlines + 1] = until_
        deadlines[#deadlines + 1] = id
      else  -- purged, expired or re-queued under it: a stray entry
        stray[#stray + 1] = eid
      end
    end
    if #stray > 0 then
      redis.call('XACK', s, 'g', unpack(stray))
      redis.call('XDEL', s, unpack(stray))
    end
  end
end
if #deadlines > 0 then redis.call('ZADD', qk .. ':leases', unpack(deadlines)) end
return out
"""
)

# ARGV: P, now, retention, then 5 per outcome: id token action at error.
# Returns per outcome the job's row, or false when the token is stale.
_SETTLE = (
    _LIB
    + """
local now, now_s = tonumber(ARGV[2]), ARGV[2]
local retention_ms = math.floor(tonumber(ARGV[3]) * 1000)
local out = {}
local n = (#ARGV - 3) / 5
local rung = {}
for i = 0, n - 1 do
  local b = 3 + i * 5
  local id, token, action, at, err = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  local row = read(id)
  local st, a, r, l, u, f, e
  if row[1] then st, a, r, l, u, f, e = state(row) end
  if st ~= 'leased' or l ~= '"' .. token .. '"' then
    out[i + 1] = false
  else
    local jk = jkey(id)
    local prio, _, q, key = static(row)
    local d
    if action == 'extend' then
      d = tail(st, a, r, l, at, f, e)
      redis.call('HSET', jk, 'd', d)
      redis.call('ZADD', qkey(q) .. ':leases', at, id)
    elseif action == 'bury' then
      d = bury(id, row, now_s, cjson.encode(err), retention_ms)
    else
      unstream(q, prio, row[3])
      unlease(q, id)
      if action == 'ack' then
        d = tail('done', a, r, 'null', 'null', now_s, e)
        redis.call('HSET', jk, 'd', d, 'x', '')
        retire(id, q, key, retention_ms)
      else  -- retry
        local eid = ''
        if tonumber(at) <= now then
          eid = push(q, id, prio)
          rung[q] = true
        else
          redis.call('ZADD', qkey(q) .. ':delayed', at, id)
        end
        if err ~= '' then e = cjson.encode(err) end
        d = tail('queued', a, at, 'null', 'null', f, e)
        redis.call('HSET', jk, 'd', d, 'x', eid)
      end
    end
    out[i + 1] = view(row[1], d, row[5])
  end
end
flush()
for q, _ in pairs(rung) do ring(q) end
return out
"""
)

# ARGV: P, then ids. Rows (false where the job does not exist).
_GET_MANY = (
    _LIB
    + """
local out = {}
for i = 2, #ARGV do
  local row = read(ARGV[i])
  out[i - 1] = row[1] and view(row[1], row[2], row[5]) or false
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
  local row = read(id)
  if row[1] then out[#out + 1] = view(row[1], row[2], row[5]) end
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
    local row = read(id)
    local _, _, _, _, _, _, e = state(row)
    local prio, _, _, key = static(row)
    if key ~= '' then redis.call('PERSIST', qk .. ':idem:' .. key) end
    redis.call('HSET', jk, 'd', tail('queued', 0, now, 'null', 'null', 'null', e), 'x', push(q, id, prio))
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
  local z = redis.call('HGET', jk, 'z')
  local key = z and string.match(z, '^[^|]*|[^|]*|[^|]*|(.*)$') or ''
  if key ~= '' then redis.call('DEL', qk .. ':idem:' .. key) end
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
    local d = redis.call('HGET', jkey(first[1][2][2]), 'd')
    if d then  -- queued since it came due (run_at is the creation time of a job due at once)
      local t = tonumber(string.match(d, '^"%a+",%d+,([^,]+),'))
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


def _job(row: Sequence[bytes]) -> Job:
    meta, payload = row
    i, q, h, pr, ma, c, k, cb, s, a, r, lease, until, fin, err = orjson.loads(meta)
    return Job(i, q, payload, h, pr, s, a, ma, c, r, lease, until, err, fin, k, cb)


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
        self._get_many, self._dead, self._replay = r(_GET_MANY), r(_DEAD), r(_REPLAY)
        self._purge, self._stats, self._ready_in = r(_PURGE), r(_STATS), r(_READY_IN)
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
        out: list[tuple[Job, bool]] = []
        dumps = orjson.dumps
        for j in jobs:
            run_at = float(j.run_at or now)
            job = Job(
                j.id,
                j.queue,
                j.payload,
                dict(j.headers),
                j.priority,
                "queued",
                0,
                j.max_attempts,
                now,
                run_at,
                idempotency_key=j.idempotency_key,
                callback_url=j.callback_url,
            )
            meta = (
                j.id,
                j.queue,
                j.headers,
                j.priority,
                j.max_attempts,
                now,
                j.idempotency_key,
                j.callback_url,
            )
            key = j.idempotency_key or ""
            args += (
                j.id,
                j.queue,
                j.payload,
                dumps(meta)[:-1] + b",",  # the array, open for the changing fields
                f"{j.priority}|{j.max_attempts}|{j.queue}|{key}",
                repr(run_at),
                j.priority,
                key,
            )
            out.append((job, True))
        replies = await self._redis.evalsha(self._enqueue, (), args)
        for i, reply in enumerate(replies):
            if reply != 1:
                out[i] = (_job(reply), False)
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
        return (await self.get_many([job_id]))[0]

    async def get_many(self, job_ids: list[str]) -> list[Job | None]:
        if not job_ids:
            return []
        rows = await self._redis.evalsha(self._get_many, (), (self.prefix, *job_ids))
        return [None if row is None else _job(row) for row in rows]

    async def dead(self, queue: str, limit: int = 100, after: str | None = None) -> list[Job]:
        args = (self.prefix, queue, int(limit), after or "", repr(time.time()), self._retention_arg)
        return [_job(r) for r in await self._redis.evalsha(self._dead, (), args)]

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
