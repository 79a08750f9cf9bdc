"""A lean asyncio Redis client for hot-path commands: one pipelined connection, no pool.

Why our own client: a rate-limit check in Redis costs one small EVALSHA, and measured here most
of the time of that call through redis-py's asyncio client goes into its per-command machinery
(pool checkout, command packing in Python, response callbacks), not into Redis. As with the
upstream HTTP client (dataplane/upstream.py), the per-call path here is kept to: pack the command
(hiredis, C), append it to a write buffer, append a future to a FIFO, one timer.

Pipelining: Redis answers the commands of a connection in the order it received them, so every
caller writes at once and the replies are matched to a FIFO of futures. N concurrent callers
share one socket, and the commands issued in the same event-loop iteration leave in one write
(buffered and flushed by `loop.call_soon`: fewer syscalls than one write per command; see
bench/redis_client.py). Replies are parsed by `hiredis.Reader` (C).

A timed-out (or cancelled) call gives up its future but not its place in the FIFO: its reply
still arrives, in order, and is dropped, so later calls still get their own replies. A
connection that owes replies and has been silent for `dead_after` seconds is presumed dead and
closed, so a vanished server (no FIN, no RST) costs a reconnect, not an ever-growing FIFO.

Scope: plain TCP only (`redis://[[user]:password@]host[:port][/db]`); no TLS (`rediss://`), no
Unix sockets, no RESP3, no pub/sub. Blocking commands (BLPOP, WAIT, ...) work but hold up every
call queued behind them on the shared connection: keep them off this client.

    client = RespClient("redis://127.0.0.1:6379/0", timeout=0.25)
    await client.execute("SET", "k", "v")        # -> b"OK"; error replies raise RespError
    sha = client.register_script(LUA)
    await client.evalsha(sha, ["key"], [1, 2])   # EVAL once if the server lost the script
    await client.close()
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from hiredis import ProtocolError, Reader, pack_command

__all__ = ["RespClient", "RespConnectionError", "RespError"]


class RespError(Exception):
    """An error reply from Redis; the message is Redis's own (e.g. "NOSCRIPT No matching ...").

    Error replies nested in an array (a Lua table, EXEC) are returned as RespError instances
    inside the list, not raised."""


class RespConnectionError(ConnectionError):
    """The connection could not be opened, was lost, or the client was closed. Calls that were
    in flight on a lost connection fail with it; the next call opens a new connection."""


def parse_url(url: str) -> tuple[str, int, int, str | None, str | None]:
    """`redis://[[user]:password@]host[:port][/db]` -> (host, port, db, user, password)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme != "redis":
        why = "TLS (rediss://) is not supported" if scheme == "rediss" else f"unknown scheme {scheme!r}"
        raise ValueError(f"Redis URL {_redact(url)!r}: {why}; expected redis://host:port/db")
    if parts.query or parts.fragment:
        raise ValueError(f"Redis URL {_redact(url)!r}: options (?...) are not supported")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"Redis URL {_redact(url)!r}: port and db must be numbers") from None
    host = parts.hostname or "127.0.0.1"
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return host, port, db, user, password


def _redact(url: str) -> str:
    # Error messages may be logged: never echo a password.
    head, at, tail = url.rpartition("@")
    return f"{head.partition('://')[0]}://***@{tail}" if at else url


class _Connection(asyncio.Protocol):
    """One socket: commands go out through a write buffer, replies come back in FIFO order."""

    __slots__ = (
        "_client",
        "_loop",
        "transport",
        "_reader",
        "_pending",
        "_timer",
        "_timer_at",
        "_buf",
        "_flushing",
        "heard",
        "closed",
    )

    def __init__(self, client: RespClient) -> None:
        self._client = client
        self._loop = client._loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self._reader = Reader(replyError=RespError)
        # (future, deadline or None) per command sent and not yet answered, oldest first, under one
        # timer armed for the earliest deadline: a loop timer made and cancelled per command cost
        # more than the rest of the client's work for it.
        self._pending: deque[tuple[asyncio.Future[Any], float | None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._buf: list[bytes] = []
        self._flushing = False
        self.heard = 0.0  # loop time of the last reply, or of the first command owed since
        self.closed = False

    def send(self, packed: bytes, timeout: float | None) -> asyncio.Future[Any]:
        loop = self._loop
        fut = loop.create_future()
        if self.closed:  # lost while a handshake or a waiting caller was being resumed
            fut.set_exception(RespConnectionError("connection to Redis lost"))
            return fut
        now = loop.time()
        deadline = None
        if timeout is not None:
            deadline = now + timeout
            if deadline < self._timer_at:
                self._arm(deadline)
        pending = self._pending
        if not pending:
            self.heard = now  # silence is counted from the first reply owed
        pending.append((fut, deadline))
        self._buf.append(packed)
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flushing = False
        if self.closed:
            return
        buf = self._buf
        self.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))
        buf.clear()

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._expire)

    def _expire(self) -> None:
        """The earliest deadline passed: fail the calls past theirs, and wait for the next one.
        Answered calls left the FIFO without touching the timer, so it may find none."""
        self._timer = None
        self._timer_at = math.inf
        now = self._loop.time()
        expired = False
        earliest = math.inf
        for fut, deadline in self._pending:
            if deadline is None:
                continue
            if deadline <= now:
                expired = True
                if not fut.done():
                    fut.set_exception(TimeoutError("Redis did not answer in time"))
            elif deadline < earliest:
                earliest = deadline
        # An expired call keeps its slot in the FIFO for the late reply. But a server silent for
        # this long while owing replies is presumed gone: without this, a black-holed connection
        # would be kept (and its FIFO would grow) until TCP itself gave up, minutes later.
        dead_after = self._client.dead_after
        if expired and now - self.heard >= dead_after:
            self.fail(RespConnectionError(f"no reply from Redis for {dead_after:g}s: connection dropped"))
        elif earliest < math.inf:
            self._arm(earliest)

    def fail(self, exc: BaseException) -> None:
        """Close now and fail every call still waiting on this connection. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._client._connection_closed(self)
        self._buf.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending = self._pending
        while pending:
            fut, _ = pending.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        try:
            reply = reader.gets()
            while reply is not False:  # RESP2 has no booleans: False only means "need more bytes"
                fut, _ = pending.popleft()
                if not fut.done():  # else timed out or cancelled: the reply is dropped
                    if type(reply) is RespError:
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
                reply = reader.gets()
        except ProtocolError as exc:
            self.fail(RespConnectionError(f"invalid reply from Redis: {exc}"))
            return
        except IndexError:  # a reply nobody asked for: the stream is out of step
            self.fail(RespConnectionError("unexpected reply from Redis"))
            return
        self.heard = self._loop.time()

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost fails what is pending

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.fail(RespConnectionError(f"connection to Redis lost{reason}"))


class RespClient:
    """Redis over one pipelined connection, opened on the first call and reopened on the first call
    after it was lost. `timeout` bounds every call (including a connect it has to wait for);
    None waits for ever."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        timeout: float | None = None,
        connect_timeout: float | None = 5.0,
        dead_after: float = 1.0,
    ) -> None:
        self.host, self.port, self.db, self._user, self._password = parse_url(url)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.dead_after = dead_after
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # bound on first use
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._scripts: dict[str, bytes] = {}  # sha -> source, for the NOSCRIPT fallback
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._conn else "idle"
        return f"<RespClient {self.host}:{self.port}/{self.db} {state}>"

    def execute(self, *args: bytes | str | int | float) -> Awaitable[Any]:
        """Send one command; await the reply (bytes, int, list, None). An error reply raises
        RespError; TimeoutError after `timeout`; RespConnectionError when the connection fails."""
        packed = pack_command(args)
        conn = self._conn
        if conn is None:
            return self._execute_connecting(packed)
        # A plain future, not a coroutine, on the hot path: one allocation fewer per call.
        return conn.send(packed, self.timeout)

    def register_script(self, source: str | bytes) -> str:
        """Remember a Lua script; returns its SHA1 for `evalsha`. Nothing is sent yet."""
        body = source.encode() if isinstance(source, str) else source
        sha = hashlib.sha1(body, usedforsecurity=False).hexdigest()  # a name, not a secret
        self._scripts[sha] = body
        return sha

    async def evalsha(
        self, sha: str, keys: Sequence[bytes | str], args: Sequence[bytes | str | int | float] = ()
    ) -> Any:
        """EVALSHA; when the server does not have the script (restart, SCRIPT FLUSH), EVAL it once
        from the registered source, which also loads it for the next calls."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except RespError as exc:
            source = self._scripts.get(sha)
            if source is None or not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.execute("EVAL", source, len(keys), *keys, *args)

    async def close(self) -> None:
        """Close the connection; calls in flight and later calls fail with RespConnectionError."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.fail(RespConnectionError("Redis client closed"))

    # -- connecting -------------------------------------------------------------------------------

    async def _execute_connecting(self, packed: bytes) -> Any:
        """The slow path: wait for the (shared) connect, within this call's own deadline."""
        if self._closed:
            raise RespConnectionError("Redis client closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        loop = self._loop
        conn = self._conn
        if conn is not None:  # connected since this coroutine was made (it may be awaited late)
            return await conn.send(packed, self.timeout)
        deadline = None if self.timeout is None else loop.time() + self.timeout
        task = self._connecting
        if task is None:
            task = self._connecting = loop.create_task(self._open())
            task.add_done_callback(self._connect_done)
        # shield: a caller that gives up must not cancel the connect the others are waiting for
        try:
            async with asyncio.timeout_at(deadline):
                conn = await asyncio.shield(task)
        except TimeoutError:
            raise TimeoutError("could not connect to Redis in time") from None
        except asyncio.CancelledError:
            if task.cancelled() and self._closed:  # close() stopped the connect, not our caller
                raise RespConnectionError("Redis client closed") from None
            raise
        if self._closed:
            raise RespConnectionError("Redis client closed")
        return await conn.send(packed, None if deadline is None else deadline - loop.time())

    async def _open(self) -> _Connection:
        loop = self._loop
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except TimeoutError:
            raise TimeoutError(f"connect to Redis at {self.host}:{self.port} timed out") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise RespConnectionError(
                f"connect to Redis at {self.host}:{self.port} failed: {reason}"
            ) from exc
        try:
            # Await the handshake before anyone else may send: commands pipelined behind a failed
            # SELECT would run in db 0.
            if self._password is not None:
                auth = (
                    ("AUTH", self._password) if self._user is None else ("AUTH", self._user, self._password)
                )
                await conn.send(pack_command(auth), self.connect_timeout)
            if self.db:
                await conn.send(pack_command(("SELECT", self.db)), self.connect_timeout)
        except BaseException as exc:
            conn.fail(RespConnectionError("Redis connection handshake failed"))
            if isinstance(exc, RespError):  # wrong password, db out of range: a configuration error
                raise RespError(f"Redis refused the connection handshake: {exc}") from None
            raise
        if self._closed:
            conn.fail(RespConnectionError("Redis client closed"))
        else:
            self._conn = conn
        return conn

    def _connect_done(self, task: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved here, so an attempt nobody waited for logs no warning

    def _connection_closed(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
