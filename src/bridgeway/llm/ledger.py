"""Where LLM spend and budget holds live: one store per state backend, each `reserve` and each
`settle` one atomic step (the rules are `llm/budgets.py`'s).

    memory://   `MemoryLedgerStore`: the pure `Ledger` in this process
    sqlite://   `SqliteLedgerStore`: tables in the state file, each step one BEGIN IMMEDIATE
                transaction, so the worker processes sharing the file are serialised by SQLite
    redis://    `RedisLedgerStore`: one Lua script per step (one round trip, Redis's own clock),
                so every replica shares the budgets

Two records are kept: the spend rows the API reports (per UTC day, caller, team, public model
and deployment: requests, tokens in and out, nano-USD) and, per scope and day, the sums budgets
are checked against. Both are written by the same settle step.

Redis layout (prefix `bw:llm:`; one Redis, not Cluster: a step touches several scopes' keys):

    b:{scope}:{day}   hash n (nano-USD), t (tokens)     that scope's spend that day; expires in 32d
    b:{scope}:all     hash n, t                         all-time spend, for `total` budgets
    h:{scope}         hash n, t                         the sum of the holds in force
    hz:{scope}        zset "{id}|{nano}|{tokens}" -> expiry (ms): the holds; expired ones are
                      dropped (and taken off h:) by the next reserve of that scope
    s:{day}           hash "{caller}\x1e{team}\x1e{model}\x1e{deployment}\x1f{r|i|o|n}" -> count
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from bridgeway.llm.budgets import Hold, Ledger, Limit, day_of, first_day

SPEND_FIELDS = ("requests", "tokens_in", "tokens_out", "nano")
_SEP, _SUB = "\x1e", "\x1f"


class LedgerUnavailable(Exception):
    """The store could not answer (Redis down, SQLite locked beyond its busy timeout)."""


@dataclass(slots=True)
class Settlement:
    """The end of one request: its hold goes; if it was answered, its cost is spent."""

    hold: Hold | None
    answered: bool
    scopes: tuple[str, ...] = ()  # whose budget sums the cost counts in (caller, team)
    caller: str = "-"
    team: str = "-"
    model: str = ""
    deployment: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    nano: int = 0


@dataclass(slots=True)
class SpendRow:
    day: int
    caller: str
    team: str
    model: str
    deployment: str
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    nano: int = 0

    def add(self, requests: int, tokens_in: int, tokens_out: int, nano: int) -> None:
        self.requests += requests
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self.nano += nano


class LedgerStore(Protocol):
    async def reserve(self, limits: list[Limit], hold: Hold) -> Limit | None: ...

    async def settle(self, batch: list[Settlement]) -> None: ...

    async def rows(self, first: int, last: int) -> list[SpendRow]: ...

    async def close(self) -> None: ...


def open_ledger(state_url: str) -> LedgerStore:
    """The store on the same backend as the gateway's state."""
    scheme, _, rest = state_url.partition("://")
    scheme = scheme.lower()
    if scheme == "memory":
        return MemoryLedgerStore()
    if scheme == "sqlite":
        return SqliteLedgerStore(rest[1:])
    if scheme == "redis":
        return RedisLedgerStore(state_url)
    raise ValueError(f"no LLM spend store for state URL scheme {scheme!r}")


# ----------------------------------------------------------------------------------- memory


class MemoryLedgerStore:
    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.ledger = Ledger()
        self.spend: dict[tuple, SpendRow] = {}

    async def reserve(self, limits: list[Limit], hold: Hold) -> Limit | None:
        return self.ledger.reserve(limits, hold, self.clock())

    async def settle(self, batch: list[Settlement]) -> None:
        now = self.clock()
        for s in batch:
            self.ledger.settle(
                s.hold.id if s.hold else None,
                s.scopes if s.answered else (),
                s.nano,
                s.tokens_in + s.tokens_out,
                now,
            )
            if s.answered:
                key = (day_of(now), s.caller, s.team, s.model, s.deployment)
                self.spend.setdefault(key, SpendRow(*key)).add(1, s.tokens_in, s.tokens_out, s.nano)

    async def rows(self, first: int, last: int) -> list[SpendRow]:
        return [r for r in self.spend.values() if first <= r.day <= last]

    async def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------- sqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_spend (
    day INTEGER NOT NULL, caller TEXT NOT NULL, team TEXT NOT NULL, model TEXT NOT NULL,
    deployment TEXT NOT NULL, requests INTEGER NOT NULL, tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL, nano INTEGER NOT NULL,
    PRIMARY KEY (day, caller, team, model, deployment)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS llm_budget (
    scope TEXT NOT NULL, day INTEGER NOT NULL, nano INTEGER NOT NULL, tokens INTEGER NOT NULL,
    PRIMARY KEY (scope, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS llm_holds (
    scope TEXT NOT NULL, id TEXT NOT NULL, nano INTEGER NOT NULL, tokens INTEGER NOT NULL,
    expires_at REAL NOT NULL, PRIMARY KEY (scope, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS llm_holds_expiry ON llm_holds (expires_at);
"""


class SqliteLedgerStore:
    """Tables next to the KV's in the state file; its own connection, used from one thread."""

    def __init__(self, path: str, *, busy_timeout: float = 10.0, clock=time.time) -> None:
        from bridgeway.state.sqlite import _use_wal

        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridgeway-spend")
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            if path != ":memory:":
                _use_wal(conn, busy_timeout)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def _run(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:  # locked beyond busy_timeout, disk full...
            raise LedgerUnavailable(f"SQLite: {exc}") from exc

    def _transaction(self, fn, *args):
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: no other process reads stale sums
        try:
            result = fn(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def reserve(self, limits: list[Limit], hold: Hold) -> Limit | None:
        return await self._run(self._transaction, self._reserve, limits, hold, self.clock())

    @staticmethod
    def _reserve(conn: sqlite3.Connection, limits: list[Limit], hold: Hold, now: float) -> Limit | None:
        conn.execute("DELETE FROM llm_holds WHERE expires_at <= ?", (now,))
        today = day_of(now)
        estimate = (hold.nano, hold.tokens)
        for limit in limits:
            spent = conn.execute(
                "SELECT COALESCE(SUM(nano), 0), COALESCE(SUM(tokens), 0) FROM llm_budget "
                "WHERE scope = ? AND day >= ? AND day <= ?",
                (limit.scope, first_day(limit.days, today), today),
            ).fetchone()
            held = conn.execute(
                "SELECT COALESCE(SUM(nano), 0), COALESCE(SUM(tokens), 0) FROM llm_holds WHERE scope = ?",
                (limit.scope,),
            ).fetchone()
            if limit.exceeded_by(spent, held, estimate):
                return limit
        conn.executemany(
            "INSERT OR REPLACE INTO llm_holds (scope, id, nano, tokens, expires_at) VALUES (?, ?, ?, ?, ?)",
            [(scope, hold.id, hold.nano, hold.tokens, hold.expires_at) for scope in hold.scopes],
        )
        return None

    async def settle(self, batch: list[Settlement]) -> None:
        await self._run(self._transaction, self._settle, batch, self.clock())

    @staticmethod
    def _settle(conn: sqlite3.Connection, batch: list[Settlement], now: float) -> None:
        today = day_of(now)
        for s in batch:
            if s.hold is not None:
                conn.executemany(
                    "DELETE FROM llm_holds WHERE scope = ? AND id = ?",
                    [(scope, s.hold.id) for scope in s.hold.scopes],
                )
            if not s.answered:
                continue
            tokens = s.tokens_in + s.tokens_out
            conn.executemany(
                "INSERT INTO llm_budget (scope, day, nano, tokens) VALUES (?, ?, ?, ?) ON CONFLICT (scope, day) "
                "DO UPDATE SET nano = nano + excluded.nano, tokens = tokens + excluded.tokens",
                [(scope, today, s.nano, tokens) for scope in s.scopes],
            )
            conn.execute(
                "INSERT INTO llm_spend VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?) "
                "ON CONFLICT (day, caller, team, model, deployment) DO UPDATE SET "
                "requests = requests + 1, tokens_in = tokens_in + excluded.tokens_in, "
                "tokens_out = tokens_out + excluded.tokens_out, nano = nano + excluded.nano",
                (today, s.caller, s.team, s.model, s.deployment, s.tokens_in, s.tokens_out, s.nano),
            )

    async def rows(self, first: int, last: int) -> list[SpendRow]:
        def read() -> list[SpendRow]:
            cursor = self._conn.execute(
                "SELECT * FROM llm_spend WHERE day >= ? AND day <= ? ORDER BY day", (first, last)
            )
            return [SpendRow(*row) for row in cursor]

        return await self._run(read)

    async def close(self) -> None:
        if self._executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=False)
        self._executor = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------------ redis

# ARGV: prefix, hold ttl ms, hold member, estimate nano, estimate tokens, m, m hold scopes,
# n, then n x (scope, days (0: all time), nano limit|-1, token limit|-1).
# Returns {1, -1, now_s} held, or {0, index of the refusing limit, now_s}.
_RESERVE_LUA = """
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local today = math.floor(tonumber(t[1]) / 86400)
local en, et = tonumber(ARGV[4]), tonumber(ARGV[5])
local m = tonumber(ARGV[6])
local held = {}
for i = 7, 6 + m do
  local z, h = P .. 'hz:' .. ARGV[i], P .. 'h:' .. ARGV[i]
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, member in ipairs(gone) do
    local _, _, n, tk = string.find(member, '|(%d+)|(%d+)$')
    redis.call('HINCRBY', h, 'n', '-' .. n)
    redis.call('HINCRBY', h, 't', '-' .. tk)
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
  local v = redis.call('HMGET', h, 'n', 't')
  held[ARGV[i]] = {tonumber(v[1]) or 0, tonumber(v[2]) or 0}
end
local base = 7 + m
for i = 0, tonumber(ARGV[base]) - 1 do
  local j = base + 1 + i * 4
  local scope, days, ln, lt = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
  local sn, st = 0, 0
  if days == 0 then
    local v = redis.call('HMGET', P .. 'b:' .. scope .. ':all', 'n', 't')
    sn, st = tonumber(v[1]) or 0, tonumber(v[2]) or 0
  else
    for d = today - days + 1, today do
      local v = redis.call('HMGET', P .. 'b:' .. scope .. ':' .. d, 'n', 't')
      sn, st = sn + (tonumber(v[1]) or 0), st + (tonumber(v[2]) or 0)
    end
  end
  local h = held[scope] or {0, 0}
  if (ln >= 0 and sn + h[1] + en > ln) or (lt >= 0 and st + h[2] + et > lt) then
    return {0, i, t[1]}
  end
end
for i = 7, 6 + m do
  local z, h = P .. 'hz:' .. ARGV[i], P .. 'h:' .. ARGV[i]
  redis.call('ZADD', z, now + tonumber(ARGV[2]), ARGV[3])
  redis.call('HINCRBY', h, 'n', ARGV[4])
  redis.call('HINCRBY', h, 't', ARGV[5])
  -- both go when their last hold would have expired
  redis.call('PEXPIRE', z, ARGV[2])
  redis.call('PEXPIRE', h, ARGV[2])
end
return {1, -1, t[1]}
"""

# ARGV: prefix, hold member|"", m, m hold scopes, answered 0|1, k, k scopes, nano, tokens,
# spend field, tokens in, tokens out.
_SETTLE_LUA = """
local P = ARGV[1]
local t = redis.call('TIME')
local today = math.floor(tonumber(t[1]) / 86400)
local member, m = ARGV[2], tonumber(ARGV[3])
for i = 4, 3 + m do
  if redis.call('ZREM', P .. 'hz:' .. ARGV[i], member) == 1 then
    local _, _, n, tk = string.find(member, '|(%d+)|(%d+)$')
    redis.call('HINCRBY', P .. 'h:' .. ARGV[i], 'n', '-' .. n)
    redis.call('HINCRBY', P .. 'h:' .. ARGV[i], 't', '-' .. tk)
  end
end
local j = 4 + m
if ARGV[j] == '0' then return 0 end
local k = tonumber(ARGV[j + 1])
local n, tk = ARGV[j + 2 + k], ARGV[j + 3 + k]
for i = j + 2, j + 1 + k do
  local day = P .. 'b:' .. ARGV[i] .. ':' .. today
  redis.call('HINCRBY', day, 'n', n)
  redis.call('HINCRBY', day, 't', tk)
  redis.call('EXPIRE', day, 2764800)
  redis.call('HINCRBY', P .. 'b:' .. ARGV[i] .. ':all', 'n', n)
  redis.call('HINCRBY', P .. 'b:' .. ARGV[i] .. ':all', 't', tk)
end
local s, f = P .. 's:' .. today, ARGV[j + 4 + k]
redis.call('HINCRBY', s, f .. '\\31r', 1)
redis.call('HINCRBY', s, f .. '\\31i', ARGV[j + 5 + k])
redis.call('HINCRBY', s, f .. '\\31o', ARGV[j + 6 + k])
redis.call('HINCRBY', s, f .. '\\31n', n)
return 1
"""

_COLUMNS = {"r": "requests", "i": "tokens_in", "o": "tokens_out", "n": "nano"}


class RedisLedgerStore:
    def __init__(self, url: str, *, prefix: str = "bw:llm:", timeout: float = 1.0) -> None:
        from bridgeway.state.resp import RespClient, RespError

        self._redis = RespClient(url, timeout=timeout, connect_timeout=timeout)
        self._errors: tuple[type[BaseException], ...] = (RespError, OSError, TimeoutError)
        self.prefix = prefix
        self._reserve = self._redis.register_script(_RESERVE_LUA)
        self._settle = self._redis.register_script(_SETTLE_LUA)

    @staticmethod
    def _member(hold: Hold) -> str:
        return f"{hold.id}|{hold.nano}|{hold.tokens}"

    async def reserve(self, limits: list[Limit], hold: Hold) -> Limit | None:
        args: list = [self.prefix, max(1, round((hold.expires_at - time.time()) * 1000)), self._member(hold)]
        args += [hold.nano, hold.tokens, len(hold.scopes), *hold.scopes, len(limits)]
        for limit in limits:
            args += [limit.scope, limit.days, -1 if limit.nano is None else limit.nano]
            args.append(-1 if limit.tokens is None else limit.tokens)
        try:
            ok, index, _ = await self._redis.evalsha(self._reserve, (), args)
        except self._errors as exc:
            raise LedgerUnavailable(f"Redis: {exc.__class__.__name__}") from exc
        return None if ok == 1 else limits[index]

    async def settle(self, batch: list[Settlement]) -> None:
        calls = []
        for s in batch:
            hold = s.hold
            args: list = [self.prefix, self._member(hold) if hold else "", len(hold.scopes) if hold else 0]
            args += hold.scopes if hold else ()
            args += [1 if s.answered else 0, len(s.scopes), *s.scopes, s.nano, s.tokens_in + s.tokens_out]
            args += [_SEP.join((s.caller, s.team, s.model, s.deployment)), s.tokens_in, s.tokens_out]
            calls.append(self._redis.evalsha(self._settle, (), args))
        # Issued together: the pipelined client sends them in one write.
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise LedgerUnavailable(
                f"Redis: {len(failed)} of {len(batch)} settlements failed ({failed[0]!r})"
            )

    async def rows(self, first: int, last: int) -> list[SpendRow]:
        out: list[SpendRow] = []
        try:
            days = range(first, last + 1)
            replies = await asyncio.gather(
                *(self._redis.execute("HGETALL", f"{self.prefix}s:{d}") for d in days)
            )
        except self._errors as exc:
            raise LedgerUnavailable(f"Redis: {exc.__class__.__name__}") from exc
        for day, flat in zip(days, replies, strict=True):
            found: dict[str, SpendRow] = {}
            for i in range(0, len(flat), 2):
                name, _, column = flat[i].decode().rpartition(_SUB)
                row = found.get(name)
                if row is None:
                    row = found[name] = SpendRow(day, *name.split(_SEP))
                setattr(row, _COLUMNS[column], int(flat[i + 1]))
            out += found.values()
        return out

    async def close(self) -> None:
        await self._redis.close()
