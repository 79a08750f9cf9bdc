"""Where LLM spend and budget holds live: one store per state backend, each `reserve` and each
`settle` one atomic step (the rules are `llm/budgets.py`'s).

    memory://   `MemoryLedgerStore`: the pure `Ledger` in this process
    sqlite://   `SqliteLedgerStore`: tables in the state file, in BEGIN IMMEDIATE transactions,
                so the worker processes sharing the file are serialised by SQLite
    redis://    `RedisLedgerStore`: Lua scripts (one round trip, Redis's own clock), so every
                replica shares the budgets

The SQLite and Redis stores group their work (group commit): the reservations that arrive while
a transaction (or script) is running wait and go together in the next one, with the settlements
queued by then, and each reservation is judged in arrival order against the running sums, just
as if it had a transaction of its own. Under load that is one thread hand-off and one
transaction (one EVALSHA) for a burst of requests instead of two per request; alone, a request
waits for nothing more than before. A group succeeds or fails as a whole: on failure every
request in it gets `LedgerUnavailable` and nothing of it is written. A request that goes away
while its reservation waits has its hold released by the store, not left until it expires.

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
import contextlib
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from bridgeway.llm.budgets import Hold, Ledger, Limit, day_of, first_day
from bridgeway.state.sqlite import open_sqlite

SPEND_FIELDS = ("requests", "tokens_in", "tokens_out", "nano")
CHECKPOINT_EVERY = 100  # inline SQLite commits between two WAL checkpoints (a few pages each)
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


def _sums(batch: list[Settlement]) -> tuple[list, dict[str, list[int]], dict[tuple, list[int]]]:
    """A batch of settlements as what it changes: the holds released (scope, hold), the spend per
    budget scope [nano, tokens], and per spend row (caller, team, model, deployment)
    [requests, tokens in, tokens out, nano]: one write per scope and row, however many requests."""
    released = []
    budget: dict[str, list[int]] = {}
    spend: dict[tuple, list[int]] = {}
    for s in batch:
        if s.hold is not None:
            released += [(scope, s.hold) for scope in s.hold.scopes]
        if not s.answered:
            continue
        tokens = s.tokens_in + s.tokens_out
        for scope in s.scopes:
            sums = budget.get(scope)
            if sums is None:
                budget[scope] = [s.nano, tokens]
            else:
                sums[0] += s.nano
                sums[1] += tokens
        key = (s.caller, s.team, s.model, s.deployment)
        row = spend.get(key)
        if row is None:
            spend[key] = [1, s.tokens_in, s.tokens_out, s.nano]
        else:
            row[0] += 1
            row[1] += s.tokens_in
            row[2] += s.tokens_out
            row[3] += s.nano
    return released, budget, spend


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
    """Tables next to the KV's in the state file; its own connection, used from one thread.

    Group commit: the reservations and settlements that arrive while a transaction runs wait
    for the next one, which takes them all: one thread hand-off and one BEGIN IMMEDIATE for a
    burst of requests instead of two each. Inside it the settlements are applied first (they
    arrived before, and their holds were made by earlier transactions), then each reservation
    is judged in arrival order against the running sums (what the tables say plus the holds
    this transaction has granted so far), exactly as if each had its own transaction. If the
    transaction fails, every request in it gets `LedgerUnavailable`: none of it was written.
    """

    def __init__(self, path: str, *, busy_timeout: float = 10.0, clock=time.time) -> None:
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridgeway-spend")
        self._conn = open_sqlite(
            path, SCHEMA, busy_timeout=busy_timeout
        )  # the thread's: waits for the write lock up to busy_timeout
        # The event loop's own: never waits for the lock (timeout 0), so a group is written
        # inline when the lock is free (the usual case) and in the thread only when another
        # process holds it. A transaction handed to a thread pays for the GIL on every SQLite
        # call (each one releases and retakes it), and under load each retake waits for the
        # busy event loop: milliseconds per transaction. Inline it is tens of microseconds: WAL
        # with synchronous=NORMAL does not fsync on commit. Its checkpoints, which do, run in
        # the thread (every CHECKPOINT_EVERY inline commits) instead of in a commit.
        self._fast: sqlite3.Connection | None = None
        if path != ":memory:":  # (a second :memory: connection would be another database)
            fast = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
            fast.execute("PRAGMA synchronous=NORMAL")
            fast.execute("PRAGMA wal_autocheckpoint=0")
            self._fast = fast
        self._inline_commits = 0
        # What waits for the next transaction: (limits, hold, future) and (settlements, future).
        self._reserves: list[tuple[list[Limit], Hold, asyncio.Future]] = []
        self._settles: list[tuple[list[Settlement], asyncio.Future | None]] = []  # None: nobody waits
        self._committer: asyncio.Task | None = None

    async def _run(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:  # locked beyond busy_timeout, disk full...
            raise LedgerUnavailable(f"SQLite: {exc}") from exc

    def reserve(self, limits: list[Limit], hold: Hold) -> asyncio.Future:
        """Awaitable: the limit that refused, or None when `hold` is held."""
        fut = asyncio.get_running_loop().create_future()
        self._reserves.append((limits, hold, fut))
        self._kick()
        return fut

    async def settle(self, batch: list[Settlement]) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._settles.append((batch, fut))
        self._kick()
        await fut

    def _kick(self) -> None:
        # The committer starts on the next loop iteration, so whatever else this iteration
        # queues joins the first transaction too.
        if self._committer is None:
            self._committer = asyncio.get_running_loop().create_task(self._commit())

    async def _commit(self) -> None:
        try:
            while self._reserves or self._settles:
                reserves, self._reserves = self._reserves, []
                settles, self._settles = self._settles, []
                waiters = [fut for *_, fut in reserves] + [fut for _, fut in settles if fut is not None]
                work = (
                    [(limits, hold) for limits, hold, _ in reserves],
                    [s for batch, _ in settles for s in batch],
                )
                try:
                    refused = self._inline(*work, self.clock())
                    if refused is None:
                        refused = await self._run(self._transaction, self._conn, *work, self.clock())
                except asyncio.CancelledError:
                    for fut in waiters:
                        fut.cancel()
                    raise
                except Exception as exc:  # noqa: BLE001 - handed to every waiter, never lost
                    for fut in waiters:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, hold, fut), limit in zip(reserves, refused, strict=True):
                    if not fut.done():
                        fut.set_result(limit)
                    elif limit is None:  # its request went away while waiting: release the hold now
                        self._settles.append(([Settlement(hold, False)], None))
                for _, fut in settles:
                    if fut is not None and not fut.done():
                        fut.set_result(None)
        finally:
            self._committer = None

    def _inline(self, reserves: list, settles: list, now: float) -> list | None:
        """The group written on the event loop's connection; None when the lock was taken (or
        anything else failed: the thread tries again, and reports what it finds)."""
        if self._fast is None:
            return None
        try:
            refused = self._transaction(self._fast, reserves, settles, now)
        except sqlite3.Error:
            return None
        self._inline_commits += 1
        if self._inline_commits % CHECKPOINT_EVERY == 0:
            self._executor.submit(self._checkpoint)
        return refused

    def _checkpoint(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # PASSIVE: what it cannot copy now, the next one does
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    @staticmethod
    def _transaction(
        conn: sqlite3.Connection,
        reserves: list[tuple[list[Limit], Hold]],
        settles: list[Settlement],
        now: float,
    ):
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: no other process reads stale sums
        try:
            if settles:
                SqliteLedgerStore._settle(conn, settles, now)
            refused = SqliteLedgerStore._reserve(conn, reserves, now) if reserves else []
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return refused

    @staticmethod
    def _reserve(conn: sqlite3.Connection, reserves: list[tuple[list[Limit], Hold]], now: float) -> list:
        """Judge each reservation in order; returns, per reservation, the limit that refused or None."""
        conn.execute("DELETE FROM llm_holds WHERE expires_at <= ?", (now,))
        today = day_of(now)
        spent: dict[tuple[str, int], tuple[int, int]] = {}  # (scope, days) -> read once
        held: dict[str, list[int]] = {}  # scope -> [nano, tokens]: the table's plus this transaction's

        def held_in(scope: str) -> list[int]:
            found = held.get(scope)
            if found is None:
                found = held[scope] = list(
                    conn.execute(
                        "SELECT COALESCE(SUM(nano), 0), COALESCE(SUM(tokens), 0) FROM llm_holds WHERE scope = ?",
                        (scope,),
                    ).fetchone()
                )
            return found

        out: list[Limit | None] = []
        granted = []
        for limits, hold in reserves:
            estimate = (hold.nano, hold.tokens)
            refused = None
            for limit in limits:
                window = (limit.scope, limit.days)
                sums = spent.get(window)
                if sums is None:
                    sums = spent[window] = conn.execute(
                        "SELECT COALESCE(SUM(nano), 0), COALESCE(SUM(tokens), 0) FROM llm_budget "
                        "WHERE scope = ? AND day >= ? AND day <= ?",
                        (limit.scope, first_day(limit.days, today), today),
                    ).fetchone()
                if limit.exceeded_by(sums, held_in(limit.scope), estimate):
                    refused = limit
                    break
            out.append(refused)
            if refused is None:
                for scope in hold.scopes:
                    sums = held_in(scope)
                    sums[0] += hold.nano
                    sums[1] += hold.tokens
                    granted.append((scope, hold.id, hold.nano, hold.tokens, hold.expires_at))
        if granted:
            conn.executemany(
                "INSERT OR REPLACE INTO llm_holds (scope, id, nano, tokens, expires_at) VALUES (?, ?, ?, ?, ?)",
                granted,
            )
        return out

    @staticmethod
    def _settle(conn: sqlite3.Connection, batch: list[Settlement], now: float) -> None:
        today = day_of(now)
        released, budget, spend = _sums(batch)
        if released:
            conn.executemany(
                "DELETE FROM llm_holds WHERE scope = ? AND id = ?",
                [(scope, hold.id) for scope, hold in released],
            )
        if budget:
            conn.executemany(
                "INSERT INTO llm_budget (scope, day, nano, tokens) VALUES (?, ?, ?, ?) ON CONFLICT (scope, day) "
                "DO UPDATE SET nano = nano + excluded.nano, tokens = tokens + excluded.tokens",
                [(scope, today, n, t) for scope, (n, t) in budget.items()],
            )
        if spend:
            conn.executemany(
                "INSERT INTO llm_spend VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (day, caller, team, model, deployment) DO UPDATE SET "
                "requests = requests + excluded.requests, tokens_in = tokens_in + excluded.tokens_in, "
                "tokens_out = tokens_out + excluded.tokens_out, nano = nano + excluded.nano",
                [(today, *key, *row) for key, row in spend.items()],
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
        if self._committer is not None:
            await self._committer  # what is queued is written first
        if self._fast is not None:
            self._fast.close()
        await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=False)
        self._executor = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------------ redis

# Every reservation waiting at one moment, judged in order in one script against running sums.
# ARGV: prefix, r, then r x (hold ttl ms, hold member, estimate nano, estimate tokens, m,
# m hold scopes, n, n x (scope, days (0: all time), nano limit|-1, token limit|-1)).
# Returns r numbers: -1 held, or the index of the limit that refused.
_RESERVE_LUA = """
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local today = math.floor(tonumber(t[1]) / 86400)
local held, spent = {}, {}
local function held_in(scope)
  local h = held[scope]
  if h then return h end
  local z, hk = P .. 'hz:' .. scope, P .. 'h:' .. scope
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, member in ipairs(gone) do
    local _, _, n, tk = string.find(member, '|(%d+)|(%d+)$')
    redis.call('HINCRBY', hk, 'n', '-' .. n)
    redis.call('HINCRBY', hk, 't', '-' .. tk)
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
  local v = redis.call('HMGET', hk, 'n', 't')
  h = {tonumber(v[1]) or 0, tonumber(v[2]) or 0}
  held[scope] = h
  return h
end
local function spent_in(scope, days)
  local key = scope .. '|' .. days
  local s = spent[key]
  if s then return s end
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
  s = {sn, st}
  spent[key] = s
  return s
end
local out = {}
local i = 3
for r = 1, tonumber(ARGV[2]) do
  local ttl, member = ARGV[i], ARGV[i + 1]
  local en, et, m = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local base = i + 5 + m
  local n = tonumber(ARGV[base])
  local refused = -1
  for l = 0, n - 1 do
    local j = base + 1 + l * 4
    local scope, ln, lt = ARGV[j], tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
    local s, h = spent_in(scope, tonumber(ARGV[j + 1])), held_in(scope)
    if (ln >= 0 and s[1] + h[1] + en > ln) or (lt >= 0 and s[2] + h[2] + et > lt) then
      refused = l
      break
    end
  end
  if refused < 0 then
    for k = i + 5, base - 1 do
      local h = held_in(ARGV[k])
      h[1], h[2] = h[1] + en, h[2] + et
      local z, hk = P .. 'hz:' .. ARGV[k], P .. 'h:' .. ARGV[k]
      redis.call('ZADD', z, now + tonumber(ttl), member)
      redis.call('HINCRBY', hk, 'n', ARGV[i + 2])
      redis.call('HINCRBY', hk, 't', ARGV[i + 3])
      -- both go when their last hold would have expired
      redis.call('PEXPIRE', z, ttl)
      redis.call('PEXPIRE', hk, ttl)
    end
  end
  out[r] = refused
  i = base + 1 + n * 4
end
return out
"""

# A batch of settlements, summed by the client first.
# ARGV: prefix, a, a x (scope, hold member) to release, b, b x (scope, nano, tokens) spent,
# c, c x (spend field, requests, tokens in, tokens out, nano).
_SETTLE_LUA = """
local P = ARGV[1]
local t = redis.call('TIME')
local today = math.floor(tonumber(t[1]) / 86400)
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local z, member = P .. 'hz:' .. ARGV[i], ARGV[i + 1]
  if redis.call('ZREM', z, member) == 1 then
    local _, _, n, tk = string.find(member, '|(%d+)|(%d+)$')
    redis.call('HINCRBY', P .. 'h:' .. ARGV[i], 'n', '-' .. n)
    redis.call('HINCRBY', P .. 'h:' .. ARGV[i], 't', '-' .. tk)
  end
  i = i + 2
end
local b = tonumber(ARGV[i])
i = i + 1
for _ = 1, b do
  local day, all = P .. 'b:' .. ARGV[i] .. ':' .. today, P .. 'b:' .. ARGV[i] .. ':all'
  redis.call('HINCRBY', day, 'n', ARGV[i + 1])
  redis.call('HINCRBY', day, 't', ARGV[i + 2])
  redis.call('EXPIRE', day, 2764800)
  redis.call('HINCRBY', all, 'n', ARGV[i + 1])
  redis.call('HINCRBY', all, 't', ARGV[i + 2])
  i = i + 3
end
local c = tonumber(ARGV[i])
i = i + 1
local s = P .. 's:' .. today
for _ = 1, c do
  local f = ARGV[i]
  redis.call('HINCRBY', s, f .. '\\31r', ARGV[i + 1])
  redis.call('HINCRBY', s, f .. '\\31i', ARGV[i + 2])
  redis.call('HINCRBY', s, f .. '\\31o', ARGV[i + 3])
  redis.call('HINCRBY', s, f .. '\\31n', ARGV[i + 4])
  i = i + 5
end
return 1
"""

_COLUMNS = {"r": "requests", "i": "tokens_in", "o": "tokens_out", "n": "nano"}


class RedisLedgerStore:
    """Reservations are grouped as in SQLite: those arriving while a script runs go together in
    the next EVALSHA (one in flight at a time), each judged in order against the running sums.
    A batch of settlements is one EVALSHA of its sums. Each script is atomic: all or nothing."""

    def __init__(self, url: str, *, prefix: str = "bw:llm:", timeout: float = 1.0) -> None:
        from bridgeway.state.resp import RespClient, RespError

        self._redis = RespClient(url, timeout=timeout, connect_timeout=timeout)
        self._errors: tuple[type[BaseException], ...] = (RespError, OSError, TimeoutError)
        self.prefix = prefix
        self._reserve = self._redis.register_script(_RESERVE_LUA)
        self._settle = self._redis.register_script(_SETTLE_LUA)
        self._reserves: list[tuple[list[Limit], Hold, asyncio.Future]] = []
        self._committer: asyncio.Task | None = None
        self._releases: set[asyncio.Task] = set()

    @staticmethod
    def _member(hold: Hold) -> str:
        return f"{hold.id}|{hold.nano}|{hold.tokens}"

    def reserve(self, limits: list[Limit], hold: Hold) -> asyncio.Future:
        """Awaitable: the limit that refused, or None when `hold` is held."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._reserves.append((limits, hold, fut))
        if self._committer is None:
            self._committer = loop.create_task(self._commit())
        return fut

    async def _commit(self) -> None:
        try:
            while self._reserves:
                group, self._reserves = self._reserves, []
                args: list = [self.prefix, len(group)]
                now = time.time()
                for limits, hold, _ in group:
                    args += [max(1, round((hold.expires_at - now) * 1000)), self._member(hold)]
                    args += [hold.nano, hold.tokens, len(hold.scopes), *hold.scopes, len(limits)]
                    for limit in limits:
                        args += [limit.scope, limit.days, -1 if limit.nano is None else limit.nano]
                        args.append(-1 if limit.tokens is None else limit.tokens)
                try:
                    refused = await self._redis.evalsha(self._reserve, (), args)
                except asyncio.CancelledError:
                    for *_, fut in group:
                        fut.cancel()
                    raise
                except self._errors as exc:
                    error = LedgerUnavailable(f"Redis: {exc.__class__.__name__}")
                    for *_, fut in group:
                        if not fut.done():
                            fut.set_exception(error)
                    continue
                abandoned = []
                for (limits, hold, fut), index in zip(group, refused, strict=True):
                    limit = None if index < 0 else limits[index]
                    if not fut.done():
                        fut.set_result(limit)
                    elif limit is None:  # its request went away while waiting: release the hold
                        abandoned.append(Settlement(hold, False))
                if abandoned:
                    task = asyncio.get_running_loop().create_task(self._release(abandoned))
                    self._releases.add(task)
                    task.add_done_callback(self._releases.discard)
        finally:
            self._committer = None

    async def _release(self, batch: list[Settlement]) -> None:
        with contextlib.suppress(LedgerUnavailable):  # the holds expire by themselves then
            await self.settle(batch)

    async def settle(self, batch: list[Settlement]) -> None:
        released, budget, spend = _sums(batch)
        args: list = [self.prefix, len(released)]
        for scope, hold in released:
            args += [scope, self._member(hold)]
        args.append(len(budget))
        for scope, (nano, tokens) in budget.items():
            args += [scope, nano, tokens]
        args.append(len(spend))
        for key, row in spend.items():
            args += [_SEP.join(key), *row]
        try:
            await self._redis.evalsha(self._settle, (), args)
        except self._errors as exc:
            raise LedgerUnavailable(f"Redis: {len(batch)} settlements failed ({exc!r})") from exc

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
        while self._committer is not None or self._releases:
            await asyncio.gather(*filter(None, (self._committer, *self._releases)), return_exceptions=True)
        await self._redis.close()
